"""Cleaning: vectorized pandas string operations, with the number of rows each step removed.

Pair sources (a `text_pair` column) are cleaned on both texts; a pair is a duplicate when both match.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from qlora_pipeline.config import DataConfig

log = logging.getLogger(__name__)

# Control characters, and invisible ones that only steer display: zero-width spaces and joiners, the byte-order mark,
# soft hyphen, word joiner, and the bidirectional marks, embeddings, overrides and isolates (RTL text itself stays).
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u00ad\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff]"
URL = r"(?:https?://|www\.)\S+"
MENTION = r"(^|[^\w@])@\w+"  # not inside an e-mail address; no look-behind, so pyarrow's RE2 runs it
PAIR_SEPARATOR = "\x1f"  # joins text and text_pair into one key; cleaning removed control characters


def normalize_text(texts: pd.Series, unicode_nfkc: bool) -> pd.Series:
    """NFKC (optional), control characters removed, runs of white space folded to one space, trimmed."""
    out = texts.astype(str)
    if unicode_nfkc:
        out = out.str.normalize("NFKC")
    out = out.str.replace(CONTROL_CHARS, "", regex=True)
    return out.str.replace(r"\s+", " ", regex=True).str.strip()


def rewrite(texts: pd.Series, cfg: DataConfig) -> pd.Series:
    """Normalize, then the optional URL / mention masks and lower-casing."""
    out = normalize_text(texts, cfg.normalize_unicode)
    if cfg.mask_urls:
        out = out.str.replace(URL, "<url>", regex=True)
    if cfg.mask_mentions:
        out = out.str.replace(MENTION, r"\1@user", regex=True)
    if cfg.lowercase:
        out = out.str.lower()
    return out


def normalized_key(texts: pd.Series) -> pd.Series:
    """What near-duplicate detection compares: NFKC, case-folded, without white space and punctuation.

    A text made only of punctuation keeps its exact form as key, so `!!!` and `?` stay distinct.
    """
    key = texts.str.normalize("NFKC").str.casefold().str.replace(r"[\W_]+", "", regex=True)
    return key.where(key != "", texts)


def length_stats(texts: pd.Series) -> dict[str, float]:
    """Text lengths in characters, as the data summary records them."""
    lengths = texts.str.len()
    quantiles = lengths.quantile([0.5, 0.95])
    return {
        "min": int(lengths.min()),
        "median": round(float(quantiles[0.5]), 1),
        "mean": round(float(lengths.mean()), 1),
        "p95": round(float(quantiles[0.95]), 1),
        "max": int(lengths.max()),
    }


def row_key(frame: pd.DataFrame, normalized: bool) -> pd.Series:
    texts = normalized_key(frame["text"]) if normalized else frame["text"]
    if "text_pair" not in frame:
        return texts
    pairs = normalized_key(frame["text_pair"]) if normalized else frame["text_pair"]
    return texts + PAIR_SEPARATOR + pairs


def clean(frame: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Return the cleaned rows (original order kept) and how many rows each step removed."""
    removed: dict[str, int] = {}
    columns = ["text", "text_pair"] if "text_pair" in frame else ["text"]

    def drop(mask: pd.Series, reason: str) -> pd.DataFrame:
        removed[reason] = int(mask.sum())
        return frame.loc[~mask]

    frame = drop(frame[columns].isna().any(axis=1), "missing_text")
    before = frame[columns]
    frame = frame.assign(**{c: rewrite(frame[c], cfg) for c in columns})
    rewritten = int((frame[columns] != before.astype(str)).any(axis=1).sum())
    if rewritten:
        log.info("cleaning rewrote %d texts (Unicode form, control or invisible characters, white space)", rewritten)
    frame = drop((frame[columns] == "").any(axis=1), "empty_after_cleaning")
    lengths = pd.concat([frame[c].str.len() for c in columns], axis=1)
    frame = drop(lengths.min(axis=1) < cfg.min_length, "too_short")
    if cfg.max_length is not None:
        frame = drop(lengths.loc[frame.index].max(axis=1) > cfg.max_length, "too_long")
    key = row_key(frame, cfg.dedupe_normalized)
    if cfg.drop_conflicting:
        # A text labelled both ways (in one corpus or across corpora) teaches nothing and poisons evaluation.
        labels_per_text = frame["label"].groupby(key, sort=False).transform("nunique")
        frame = drop(labels_per_text > 1, "conflicting_labels")
        key = key.loc[frame.index]
    if cfg.dedupe:
        exact = row_key(frame, normalized=False)
        frame = drop(exact.duplicated(keep="first"), "duplicates")
        key = key.loc[frame.index]
    if cfg.dedupe_normalized:
        frame = drop(key.duplicated(keep="first"), "near_duplicates")
    for reason, count in removed.items():
        if count:
            log.info("cleaning removed %d rows: %s", count, reason)
    return frame.reset_index(drop=True), removed

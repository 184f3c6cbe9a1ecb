"""Cleaning: vectorized pandas string operations, with the number of rows each step removed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from qlora_pipeline.config import DataConfig

log = logging.getLogger(__name__)

CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200c\u200d\ufeff]"


def normalize_text(texts: pd.Series, unicode_nfkc: bool) -> pd.Series:
    """NFKC (optional), control characters removed, runs of white space folded to one space, trimmed."""
    out = texts.astype(str)
    if unicode_nfkc:
        out = out.str.normalize("NFKC")
    out = out.str.replace(CONTROL_CHARS, "", regex=True)
    return out.str.replace(r"\s+", " ", regex=True).str.strip()


def clean(frame: pd.DataFrame, cfg: DataConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """Return the cleaned rows (original order kept) and how many rows each step removed."""
    removed: dict[str, int] = {}

    def drop(mask: pd.Series, reason: str) -> pd.DataFrame:
        removed[reason] = int(mask.sum())
        return frame.loc[~mask]

    frame = drop(frame["text"].isna(), "missing_text")
    frame = frame.assign(text=normalize_text(frame["text"], cfg.normalize_unicode))
    frame = drop(frame["text"] == "", "empty_after_cleaning")
    lengths = frame["text"].str.len()
    frame = drop(lengths < cfg.min_length, "too_short")
    if cfg.max_length is not None:
        frame = drop(frame["text"].str.len() > cfg.max_length, "too_long")
    if cfg.drop_conflicting:
        # A text labelled both ways (in one corpus or across corpora) teaches nothing and poisons evaluation.
        labels_per_text = frame.groupby("text", sort=False)["label"].transform("nunique")
        frame = drop(labels_per_text > 1, "conflicting_labels")
    if cfg.dedupe:
        frame = drop(frame.duplicated(subset="text", keep="first"), "duplicates")
    for reason, count in removed.items():
        if count:
            log.info("cleaning removed %d rows: %s", count, reason)
    return frame.reset_index(drop=True), removed

"""Stratified, seeded train / validation / test splits, with a fingerprint of exactly what each split holds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
from sklearn.model_selection import train_test_split

from qlora_pipeline.config import SPLIT_NAMES
from qlora_pipeline.data.clean import row_key
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import DataConfig


@dataclass(frozen=True)
class Splits:
    """Three frames with columns `id, dataset, text, label` (label: index into `label_names`).

    Pair sources add `text_pair` (the second text, never null); single-text runs have no `text_pair` column.
    With data.balance upsample, train may repeat rows (same id); validation and test are never resampled.
    """

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: tuple[str, ...]

    def get(self, name: str) -> pd.DataFrame:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def of_dataset(self, dataset: str) -> Splits:
        """The rows of one dataset in each split (experiment.per_dataset), index reset."""
        train, validation, test = (
            self.get(name).loc[self.get(name)["dataset"] == dataset].reset_index(drop=True) for name in SPLIT_NAMES
        )
        return Splits(train=train, validation=validation, test=test, label_names=self.label_names)

    def fingerprint(self) -> str:
        """sha256 over every split's ids, labels and texts (and second texts) in order: equal, identical data."""
        digest = hashlib.sha256()
        for name in SPLIT_NAMES:
            digest.update(f"[{name}]\n".encode())
            frame = self.get(name)
            texts = frame["text"]
            if "text_pair" in frame:
                texts = texts + "\t" + frame["text_pair"].fillna("")
            for row_id, label, text in zip(frame["id"], frame["label"], texts, strict=True):
                digest.update(f"{row_id}\t{label}\t{text}\n".encode())
        return digest.hexdigest()


def strata(frame: pd.DataFrame) -> pd.Series:
    return frame["dataset"].astype(str) + "/" + frame["label"].astype(str)


def sample_per_dataset(frame: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """Keep at most `max_samples` rows of each dataset, stratified by label (and the source's own split)."""
    if max_samples is None:
        return frame
    parts = []
    for _, part in frame.groupby("dataset", sort=False):
        if len(part) > max_samples:
            part, _ = train_test_split(
                part, train_size=max_samples, stratify=_sample_strata(part), random_state=seed, shuffle=True
            )
            part = part.sort_index()
        parts.append(part)
    return pd.concat(parts).reset_index(drop=True)


def _sample_strata(part: pd.DataFrame) -> pd.Series:
    """Label, and the source's own split where it has one, so sampling keeps every split's share."""
    if "split" in part and part["split"].notna().any():
        return part["label"].astype(str) + "/" + part["split"].astype(str)
    return part["label"]


def _split_off(frame: pd.DataFrame, fraction: float, seed: int, what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    groups = strata(frame)
    counts = groups.value_counts()
    needed = max(2, int(round(1 / min(fraction, 1 - fraction))) if fraction > 0 else 2)
    small = counts[counts < needed]
    if not small.empty:
        shown = ", ".join(f"{k} has {v}" for k, v in small.items())
        raise DataError(
            f"too few rows to split off {what} ({fraction:.0%}) stratified by dataset and class: {shown}; "
            "lower data.val_ratio / data.test_ratio or raise data.max_samples"
        )
    rest, held = train_test_split(frame, test_size=fraction, stratify=groups, random_state=seed, shuffle=True)
    return rest, held


def make_splits(frame: pd.DataFrame, cfg: DataConfig, label_names: tuple[str, ...], seed: int) -> Splits:
    """Split stratified by dataset and label; rows with a `split` (the source's own) keep it.

    A source that brings train but no validation or test has those carved from its train rows by the ratios.
    Texts are unique after cleaning, so no text is in two splits.
    """
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLIT_NAMES}
    given = frame["split"].notna() if "split" in frame else pd.Series(False, index=frame.index)
    free = frame.loc[~given]
    if not free.empty:
        for name, part in zip(SPLIT_NAMES, _ratio_split(free, cfg, seed, "", True, True), strict=True):
            parts[name].append(part)
    for dataset, group in frame.loc[given].groupby("dataset", sort=False):
        own = {name: group.loc[group["split"] == name] for name in SPLIT_NAMES}
        if own["train"].empty:
            raise DataError(f"data source '{dataset}': its own train split has no rows left after cleaning")
        carve_val, carve_test = own["validation"].empty, own["test"].empty
        where = f" of '{dataset}' (its own train split)"
        train, validation, test = _ratio_split(own["train"], cfg, seed, where, carve_val, carve_test)
        for name, part in (("train", train), ("validation", validation), ("test", test)):
            parts[name].append(part if not part.empty else own[name])
    train, validation, test = (_join(parts[name]) for name in SPLIT_NAMES)
    splits = Splits(train=train, validation=validation, test=test, label_names=label_names)
    for name in SPLIT_NAMES:
        present = set(splits.get(name)["label"])
        if len(present) < 2:
            only = f"a single class ({label_names[next(iter(present))]})" if present else "no rows"
            raise DataError(
                f"the {name} split holds {only}; it needs at least two classes to train and evaluate: "
                "check the labels or raise data.max_samples"
            )
    return splits


def _ratio_split(
    frame: pd.DataFrame, cfg: DataConfig, seed: int, where: str, carve_val: bool, carve_test: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    empty = frame.iloc[:0]
    rest, test = _split_off(frame, cfg.test_ratio, seed, f"the test split{where}") if carve_test else (frame, empty)
    if not carve_val:
        return rest, empty, test
    val_fraction = cfg.val_ratio / (1 - cfg.test_ratio) if carve_test else cfg.val_ratio
    train, validation = _split_off(rest, val_fraction, seed, f"the validation split{where}")
    return train, validation, test


def _join(parts: list[pd.DataFrame]) -> pd.DataFrame:
    joined = parts[0] if len(parts) == 1 else pd.concat(parts)
    return joined.drop(columns="split", errors="ignore").reset_index(drop=True)


def cross_split_overlap(splits: Splits, normalized: bool = False) -> int:
    """How many rows of validation or test also appear in an earlier split, exactly or after normalization.

    Compares whole rows (text, or text + text_pair); 0 whenever the matching dedupe is on.
    """
    seen = set(row_key(splits.train, normalized))
    overlap = 0
    for name in ("validation", "test"):
        keys = row_key(splits.get(name), normalized)
        overlap += int(keys.isin(seen).sum())
        seen.update(keys)
    return overlap

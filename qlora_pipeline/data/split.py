"""Stratified, seeded train / validation / test splits, with a fingerprint of exactly what each split holds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd
from sklearn.model_selection import train_test_split

from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import DataConfig

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: tuple[str, ...]

    def get(self, name: str) -> pd.DataFrame:
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def fingerprint(self) -> str:
        """sha256 over every split's ids, labels and texts in order: equal fingerprints, identical data."""
        digest = hashlib.sha256()
        for name in SPLIT_NAMES:
            digest.update(f"[{name}]\n".encode())
            frame = self.get(name)
            for row_id, label, text in zip(frame["id"], frame["label"], frame["text"], strict=True):
                digest.update(f"{row_id}\t{label}\t{text}\n".encode())
        return digest.hexdigest()


def strata(frame: pd.DataFrame) -> pd.Series:
    return frame["dataset"].astype(str) + "/" + frame["label"].astype(str)


def sample_per_dataset(frame: pd.DataFrame, max_samples: int | None, seed: int) -> pd.DataFrame:
    """Keep at most `max_samples` rows of each dataset, stratified by label."""
    if max_samples is None:
        return frame
    parts = []
    for _, part in frame.groupby("dataset", sort=False):
        if len(part) > max_samples:
            part, _ = train_test_split(
                part, train_size=max_samples, stratify=part["label"], random_state=seed, shuffle=True
            )
            part = part.sort_index()
        parts.append(part)
    return pd.concat(parts).reset_index(drop=True)


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
    """Split stratified by dataset and label. Texts are unique after cleaning, so no text is in two splits."""
    rest, test = _split_off(frame, cfg.test_ratio, seed, "the test split")
    val_fraction = cfg.val_ratio / (1 - cfg.test_ratio)
    train, validation = _split_off(rest, val_fraction, seed, "the validation split")
    splits = Splits(
        train=train.reset_index(drop=True),
        validation=validation.reset_index(drop=True),
        test=test.reset_index(drop=True),
        label_names=label_names,
    )
    for name in SPLIT_NAMES:
        present = set(splits.get(name)["label"])
        if len(present) < 2:
            raise DataError(
                f"the {name} split holds a single class ({label_names[next(iter(present))]}); "
                "it needs both to train and evaluate: check the labels or raise data.max_samples"
            )
    return splits


def cross_split_overlap(splits: Splits) -> int:
    """How many texts of validation or test also appear in an earlier split (0 whenever dedupe is on)."""
    seen = set(splits.train["text"])
    overlap = 0
    for name in ("validation", "test"):
        texts = splits.get(name)["text"]
        overlap += int(texts.isin(seen).sum())
        seen.update(texts)
    return overlap

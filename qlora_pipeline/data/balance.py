"""Class balance of the train split: resample it, or compute class weights for the heads and the loss.

Only train is touched: validation and test keep the true class mix, so their scores stay honest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def class_weights(labels: pd.Series, n_classes: int) -> dict[int, float]:
    """total / (classes x count) per class, sklearn's 'balanced' weights; a class absent from train gets 0."""
    counts = labels.value_counts()
    total = len(labels)
    return {c: round(total / (n_classes * int(counts[c])), 6) if c in counts else 0.0 for c in range(n_classes)}


def rebalance(train: pd.DataFrame, method: str, seed: int) -> pd.DataFrame:
    """Upsample minority / downsample majority classes to the same count within each dataset (seeded).

    Rows are drawn without replacement where possible; upsampled copies keep their id, so a repeated text is
    visible as a repeated id. Row order: each dataset's rows in their previous order, extra copies after.
    """
    if method not in ("upsample", "downsample"):
        return train
    rng = np.random.default_rng(seed)
    parts = []
    for _, group in train.groupby("dataset", sort=False):
        counts = group["label"].value_counts()
        target = int(counts.max() if method == "upsample" else counts.min())
        keep = []
        for label in sorted(counts.index):
            index = group.index[group["label"].to_numpy() == label].to_numpy()
            if method == "downsample":
                keep.append(np.sort(rng.choice(index, size=target, replace=False)))
            else:
                extra = rng.choice(index, size=target - len(index), replace=True)
                keep.append(np.concatenate([index, extra]))
        chosen = np.concatenate(keep)
        original = np.unique(chosen)  # sorted: the rows' previous order
        extras = chosen[_repeats(chosen)]
        parts.append(group.loc[np.concatenate([original, extras])])
    return pd.concat(parts).reset_index(drop=True)


def _repeats(values: np.ndarray) -> np.ndarray:
    """True for every occurrence of a value after its first."""
    _, first = np.unique(values, return_index=True)
    mask = np.ones(len(values), dtype=bool)
    mask[first] = False
    return mask


def balance_record(
    before: pd.DataFrame,
    after: pd.DataFrame,
    method: str,
    weights: dict[int, float] | None,
    label_names: tuple[str, ...],
) -> dict[str, Any]:
    def per_class(frame: pd.DataFrame) -> dict[str, int]:
        return {label_names[int(c)]: int(n) for c, n in frame["label"].value_counts().sort_index().items()}

    return {
        "method": method,
        "train_rows_before": len(before),
        "train_rows_after": len(after),
        "train_classes_before": per_class(before),
        "train_classes_after": per_class(after),
        "class_weights": {label_names[c]: w for c, w in weights.items()} if weights else None,
    }

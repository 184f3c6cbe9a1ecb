"""Seeded bootstrap 95% confidence intervals, vectorized over resamples.

A resample is a row of counts (how often each example was drawn), so every metric of every resample is a
matrix product or a cumulative sum over the count matrix: no Python loop over sklearn calls. The formulas
match sklearn's on the same resample (tests check this): accuracy, F1, precision, recall, MCC from confusion
counts; ROC-AUC as the trapezoid over distinct thresholds; PR-AUC as sklearn's average precision; Brier as mean
squared error; ECE from per-bin weighted sums (a row's confidence bin does not change between resamples).
"""

from __future__ import annotations

import numpy as np

from qlora_pipeline.evaluation.calibration import confidence_bins

# Metrics that get an interval. PR-AUC and ROC-AUC only when both classes are present.
CI_METRICS = ("accuracy", "macro_f1", "f1", "precision", "recall", "mcc", "roc_auc", "pr_auc", "brier", "ece")
# Resamples per block: bounds memory at block x n floats (8 MB per 10k rows).
BLOCK = 100


def resample_counts(rng: np.random.Generator, n: int, size: int, strata: np.ndarray | None = None) -> np.ndarray:
    """`size` x `n` matrix: how often each row is drawn in each resample (each row sums to n).

    With `strata` (one value per row), rows are drawn within each stratum, so every resample keeps the
    stratum sizes (stratified bootstrap: a rare class is never missing from a resample).
    """
    if strata is None:
        draws = rng.integers(0, n, size=(size, n))
        offsets = (np.arange(size) * n)[:, None]
        return np.bincount((draws + offsets).ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
    counts = np.zeros((size, n))
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        counts[:, members] = resample_counts(rng, len(members), size)
    return counts


def confusion_counts(weights: np.ndarray, labels: np.ndarray, prediction: np.ndarray, k: int) -> np.ndarray:
    """Resamples x k x k confusion matrices (rows true, columns predicted)."""
    cell = labels * k + prediction
    onehot = np.zeros((len(cell), k * k))
    onehot[np.arange(len(cell)), cell] = 1.0
    return (weights @ onehot).reshape(-1, k, k)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (sklearn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def calibration_error(weights: np.ndarray, correct: np.ndarray, confidence: np.ndarray, bins: int) -> np.ndarray:
    """Top-label ECE per resample, binned as `calibration.expected_calibration_error` bins it."""
    index = confidence_bins(confidence, bins)
    onehot = np.zeros((len(index), bins))
    onehot[np.arange(len(index)), index] = 1.0
    gap = np.abs(weights @ (onehot * correct[:, None]) - weights @ (onehot * confidence[:, None]))
    return gap.sum(axis=1) / weights.sum(axis=1)


def f1_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Resamples x k per-class F1 (0 where a class is neither true nor predicted, as sklearn's zero_division=0)."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    denominator = cm.sum(axis=2) + cm.sum(axis=1)
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def mcc_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Matthews correlation as sklearn computes it from the confusion matrix (0 when undefined)."""
    t = cm.sum(axis=2)
    p = cm.sum(axis=1)
    c = np.trace(cm, axis1=1, axis2=2)
    s = cm.sum(axis=(1, 2))
    cov_ytyp = c * s - (t * p).sum(axis=1)
    cov_ypyp = s**2 - (p * p).sum(axis=1)
    cov_ytyt = s**2 - (t * t).sum(axis=1)
    denominator = np.sqrt(cov_ytyt * cov_ypyp)
    return np.divide(cov_ytyp, denominator, out=np.zeros_like(cov_ytyp), where=denominator > 0)


def ranking_metrics(weights: np.ndarray, positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC-AUC and average precision of `score` for the binary `positive` mask, per resample (NaN if one class).

    Rows already sorted by descending score (the binary case, see bootstrap_intervals) skip the reordering.
    """
    order = np.argsort(-score, kind="mergesort")
    presorted = bool(np.array_equal(order, np.arange(len(order))))
    w = weights if presorted else weights[:, order]
    sorted_score = score[order]
    tp = np.cumsum(w * positive[order], axis=1)
    total = np.cumsum(w, axis=1)
    # A threshold sits at the last row of each group of tied scores.
    last = np.r_[sorted_score[1:] != sorted_score[:-1], True]
    if not last.all():
        tp, total = tp[:, last], total[:, last]
    fp = total - tp
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    d_tp = np.diff(tp, axis=1, prepend=0)
    d_fp = np.diff(fp, axis=1, prepend=0)
    area = np.einsum("ij,ij->i", d_fp, tp - d_tp / 2)  # trapezoids: d_fp x (previous tp + tp) / 2
    precision_sum = np.einsum("ij,ij->i", d_tp, tp / np.maximum(total, 1))  # d_tp > 0 implies total > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        auc, ap = area / (n_pos * n_neg), precision_sum / n_pos
    undefined = (n_pos == 0) | (n_neg == 0)
    return np.where(undefined, np.nan, auc), np.where(undefined, np.nan, ap)


def bootstrap_block(
    weights: np.ndarray, labels: np.ndarray, proba: np.ndarray, prediction: np.ndarray, ece_bins: int = 15
) -> dict:
    """Every CI metric for each resample in `weights` (resamples x rows)."""
    k = proba.shape[1]
    n = weights.sum(axis=1)
    cm = confusion_counts(weights, labels, prediction, k)
    per_class_f1 = f1_from_confusion(cm)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    per_class_precision, per_class_recall = ratio(tp, cm.sum(axis=1)), ratio(tp, cm.sum(axis=2))
    present = (cm.sum(axis=2) + cm.sum(axis=1)) > 0
    out = {
        "accuracy": np.trace(cm, axis1=1, axis2=2) / n,
        "macro_f1": (per_class_f1 * present).sum(axis=1) / present.sum(axis=1),
        "mcc": mcc_from_confusion(cm),
        "ece": calibration_error(weights, labels == prediction, proba.max(axis=1), ece_bins),
    }
    if k == 2:
        out["f1"] = per_class_f1[:, 1]
        out["precision"], out["recall"] = per_class_precision[:, 1], per_class_recall[:, 1]
        out["brier"] = weights @ ((proba[:, 1] - labels) ** 2) / n
        out["roc_auc"], out["pr_auc"] = ranking_metrics(weights, labels == 1, proba[:, 1])
    else:
        out["f1"] = out["macro_f1"]
        # sklearn's macro average runs over the classes present in labels or predictions, as macro_f1 does.
        out["precision"] = (per_class_precision * present).sum(axis=1) / present.sum(axis=1)
        out["recall"] = (per_class_recall * present).sum(axis=1) / present.sum(axis=1)
        onehot = np.eye(k)[labels]
        out["brier"] = weights @ ((proba - onehot) ** 2).sum(axis=1) / n
        aucs, aps = zip(*(ranking_metrics(weights, labels == c, proba[:, c]) for c in range(k)), strict=True)
        out["roc_auc"] = np.mean(aucs, axis=0)
        out["pr_auc"] = np.mean(aps, axis=0)
    return out


def bootstrap_intervals(
    labels: np.ndarray,
    proba: np.ndarray,
    prediction: np.ndarray,
    resamples: int,
    seed: int,
    ece_bins: int = 15,
    stratified: bool = False,
) -> dict[str, list[float] | None]:
    """Percentile 95% intervals for CI_METRICS; None for a metric undefined in most resamples.

    `stratified` resamples within each true class, keeping the class counts of the evaluated set.
    """
    rng = np.random.default_rng(seed)
    if proba.shape[1] == 2:  # sort once by score so the ranking metrics need no per-block reordering
        order = np.argsort(-proba[:, 1], kind="mergesort")
        labels, proba, prediction = labels[order], proba[order], prediction[order]
    samples: dict[str, list[np.ndarray]] = {name: [] for name in CI_METRICS}
    for start in range(0, resamples, BLOCK):
        weights = resample_counts(rng, len(labels), min(BLOCK, resamples - start), labels if stratified else None)
        for name, values in bootstrap_block(weights, labels, proba, prediction, ece_bins).items():
            samples[name].append(values)
    intervals: dict[str, list[float] | None] = {}
    for name in CI_METRICS:
        values = np.concatenate(samples[name])
        values = values[~np.isnan(values)]
        if len(values) < resamples / 2:
            intervals[name] = None
        else:
            low, high = np.percentile(values, [2.5, 97.5])
            intervals[name] = [float(low), float(high)]
    return intervals

"""Metrics from scikit-learn, overall and per dataset, with seeded bootstrap intervals; the predictions table."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_recall_fscore_support,
    roc_auc_score,
)

from qlora_pipeline.errors import DataError
from qlora_pipeline.evaluation.bootstrap import bootstrap_intervals
from qlora_pipeline.evaluation.calibration import expected_calibration_error

# The metrics shown in report tables, in this order.
HEADLINE = ("accuracy", "macro_f1", "f1", "precision", "recall", "roc_auc", "pr_auc", "mcc", "brier", "ece")
# The metrics bar charts compare (runs side by side, datasets side by side): each on a 0-1 scale.
COMPARED = ("accuracy", "macro_f1", "roc_auc", "pr_auc", "mcc", "brier", "ece")


def accuracy_macro_f1(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """The two headline numbers of a quick check (validation during training, threshold calibration)."""
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
    }


def predictions_frame(
    split: pd.DataFrame, proba: np.ndarray, prediction: np.ndarray, label_names: tuple[str, ...]
) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "id": split["id"].to_numpy(),
            "dataset": split["dataset"].to_numpy(),
            "text": split["text"].to_numpy(),
            "label": split["label"].to_numpy(),
            "label_name": [label_names[i] for i in split["label"]],
            "prediction": prediction,
            "prediction_name": [label_names[i] for i in prediction],
        }
    )
    if "text_pair" in split:  # a pair task: both texts, so an error can be read and the row predicted again
        frame.insert(3, "text_pair", split["text_pair"].to_numpy())
    for index, name in enumerate(label_names):
        frame[f"prob_{name}"] = proba[:, index]
    return frame


def proba_columns(label_names: tuple[str, ...] | list[str]) -> list[str]:
    return [f"prob_{name}" for name in label_names]


def check_probabilities(predictions: pd.DataFrame, label_names: tuple[str, ...] | list[str]) -> None:
    """Refuse NaN probabilities: a metric computed around them would be silently wrong."""
    bad = predictions[proba_columns(label_names)].isna().any(axis=1)
    if bad.any():
        first = predictions.loc[bad, "id"].iloc[0]
        raise DataError(
            f"{int(bad.sum())} of {len(predictions)} rows have NaN probabilities (first: id {first}); "
            "the model produced invalid scores, check its inputs and numerical precision"
        )


def compute_metrics(
    labels: np.ndarray,
    proba: np.ndarray,
    prediction: np.ndarray,
    label_names: tuple[str, ...] | list[str],
    ece_bins: int = 15,
) -> dict[str, Any]:
    n_classes = len(label_names)
    binary = n_classes == 2
    average = "binary" if binary else "macro"
    every = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(labels, prediction, labels=every, zero_division=0)
    p, r, f, _ = precision_recall_fscore_support(labels, prediction, average=average, zero_division=0)
    metrics: dict[str, Any] = {
        "n": len(labels),
        "accuracy": accuracy_score(labels, prediction),
        "macro_f1": f1_score(labels, prediction, average="macro", zero_division=0),
        "f1": f,
        "precision": p,
        "recall": r,
        "mcc": matthews_corrcoef(labels, prediction),
        "brier": brier_score_loss(labels, proba[:, 1]) if binary else brier_score_loss(labels, proba, labels=every),
        "ece": expected_calibration_error(labels == prediction, proba.max(axis=1), ece_bins),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "n": int(support[i]),
            }
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(labels, prediction, labels=every).tolist(),
    }
    present = np.unique(labels)
    if len(present) < 2 or (not binary and len(present) < n_classes):
        metrics["roc_auc"] = metrics["pr_auc"] = None
        missing = ", ".join(name for i, name in enumerate(label_names) if i not in present)
        metrics["auc_undefined"] = "one class" if len(present) < 2 else "a class is missing"
        metrics["notes"] = [f"ROC-AUC and PR-AUC undefined: no examples of {missing}"]
    elif binary:
        metrics["roc_auc"] = roc_auc_score(labels, proba[:, 1])
        metrics["pr_auc"] = average_precision_score(labels, proba[:, 1])
    else:
        metrics["roc_auc"] = roc_auc_score(labels, proba, multi_class="ovr", average="macro")
        metrics["pr_auc"] = average_precision_score(np.eye(n_classes)[labels], proba, average="macro")
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in metrics.items()}


def evaluate(
    predictions: pd.DataFrame,
    label_names: tuple[str, ...] | list[str],
    *,
    ece_bins: int = 15,
    bootstrap: int = 0,
    seed: int = 0,
    stratified: bool = False,
) -> dict[str, Any]:
    """Metrics overall and for each dataset in the predictions table, each with bootstrap intervals under "ci"."""
    check_probabilities(predictions, label_names)
    columns = proba_columns(label_names)

    def metrics_of(frame: pd.DataFrame) -> dict[str, Any]:
        labels, proba = frame["label"].to_numpy(), frame[columns].to_numpy(dtype=np.float64)
        prediction = frame["prediction"].to_numpy()
        metrics = compute_metrics(labels, proba, prediction, label_names, ece_bins)
        if bootstrap:
            metrics["ci"] = bootstrap_intervals(labels, proba, prediction, bootstrap, seed, ece_bins, stratified)
            for name in ("roc_auc", "pr_auc"):
                if metrics[name] is None:
                    metrics["ci"][name] = None
        return metrics

    results: dict[str, Any] = {"overall": metrics_of(predictions), "per_dataset": {}}
    for dataset, frame in predictions.groupby("dataset", sort=True):
        results["per_dataset"][str(dataset)] = metrics_of(frame)
    return results


def format_metric(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"


def metric_cell(metrics: dict[str, Any], name: str, with_ci: bool = False) -> str:
    """A table cell: the value, its interval when asked for, or why it is undefined."""
    value = metrics.get(name)
    if value is None and name in ("roc_auc", "pr_auc") and metrics.get("auc_undefined"):
        return f"n/a — {metrics['auc_undefined']}"
    cell = format_metric(value)
    interval = (metrics.get("ci") or {}).get(name) if with_ci else None
    return f"{cell} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else cell

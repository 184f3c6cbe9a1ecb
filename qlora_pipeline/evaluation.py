"""Metrics from scikit-learn, overall and per dataset, and the predictions table they are computed from."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

# The metrics shown in report tables, in this order.
HEADLINE = ("accuracy", "macro_f1", "f1", "precision", "recall", "roc_auc")


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
    for index, name in enumerate(label_names):
        frame[f"prob_{name}"] = proba[:, index]
    return frame


def compute_metrics(labels: np.ndarray, proba: np.ndarray, prediction: np.ndarray, n_classes: int) -> dict[str, Any]:
    binary = n_classes == 2
    average = "binary" if binary else "macro"
    metrics: dict[str, Any] = {
        "n": len(labels),
        "accuracy": accuracy_score(labels, prediction),
        "macro_f1": f1_score(labels, prediction, average="macro", zero_division=0),
        "f1": f1_score(labels, prediction, average=average, zero_division=0),
        "precision": precision_score(labels, prediction, average=average, zero_division=0),
        "recall": recall_score(labels, prediction, average=average, zero_division=0),
        "confusion_matrix": confusion_matrix(labels, prediction, labels=list(range(n_classes))).tolist(),
    }
    if len(np.unique(labels)) < 2:
        metrics["roc_auc"] = None
        metrics["notes"] = ["ROC-AUC undefined: only one class present"]
    elif binary:
        metrics["roc_auc"] = roc_auc_score(labels, proba[:, 1])
    else:
        metrics["roc_auc"] = roc_auc_score(labels, proba, multi_class="ovr", average="macro")
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in metrics.items()}


def evaluate(predictions: pd.DataFrame, label_names: tuple[str, ...]) -> dict[str, Any]:
    """Metrics overall and for each dataset in the predictions table."""
    proba_columns = [f"prob_{name}" for name in label_names]

    def metrics_of(frame: pd.DataFrame) -> dict[str, Any]:
        return compute_metrics(
            frame["label"].to_numpy(),
            frame[proba_columns].to_numpy(),
            frame["prediction"].to_numpy(),
            len(label_names),
        )

    results: dict[str, Any] = {"overall": metrics_of(predictions), "per_dataset": {}}
    for dataset, frame in predictions.groupby("dataset", sort=True):
        results["per_dataset"][str(dataset)] = metrics_of(frame)
    return results


def format_metric(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"

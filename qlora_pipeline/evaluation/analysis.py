"""Error analysis and the curve data that figures and the dashboard draw: computed once, saved as JSON.

Curves are thinned to at most CURVE_POINTS points so evaluation_results.json stays small for 100k rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from qlora_pipeline.evaluation.calibration import reliability
from qlora_pipeline.evaluation.metrics import accuracy_macro_f1, proba_columns

CURVE_POINTS = 200
SCORE_BINS = 20


def thin(*arrays: np.ndarray) -> list[list[float]]:
    """Keep at most CURVE_POINTS evenly spaced points, always the first and the last."""
    n = len(arrays[0])
    keep = np.unique(np.linspace(0, n - 1, min(n, CURVE_POINTS)).round().astype(int))
    return [np.asarray(a, dtype=np.float64)[keep].round(6).tolist() for a in arrays]


def curves(predictions: pd.DataFrame, label_names: list[str], ece_bins: int) -> dict[str, Any]:
    """ROC and PR curves (positive class, or one-vs-rest per class), reliability bins, score histograms."""
    labels = predictions["label"].to_numpy()
    proba = predictions[proba_columns(label_names)].to_numpy(dtype=np.float64)
    classes = [1] if len(label_names) == 2 else list(range(len(label_names)))
    roc, pr = {}, {}
    for c in classes:
        truth = labels == c
        if truth.all() or not truth.any():
            continue  # undefined with one class; the metrics say so
        fpr, tpr, _ = roc_curve(truth, proba[:, c])
        precision, recall, _ = precision_recall_curve(truth, proba[:, c])
        roc[label_names[c]] = dict(zip(("fpr", "tpr"), thin(fpr, tpr), strict=True))
        pr[label_names[c]] = dict(zip(("recall", "precision"), thin(recall[::-1], precision[::-1]), strict=True))
    return {
        "roc": roc,
        "pr": pr,
        "reliability": reliability(labels == predictions["prediction"].to_numpy(), proba.max(axis=1), ece_bins),
        "scores": score_histograms(labels, proba, label_names),
    }


def score_histograms(labels: np.ndarray, proba: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Histogram of the score a figure shows per true class: P(positive) for binary, P(true class) otherwise."""
    binary = len(label_names) == 2
    score = proba[:, 1] if binary else proba[np.arange(len(labels)), labels]
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    counts = {
        name: np.histogram(score[labels == c], bins=edges)[0].tolist()
        for c, name in enumerate(label_names)
        if (labels == c).any()
    }
    what = f"P({label_names[1]})" if binary else "P(true class)"
    return {"score": what, "edges": edges.round(6).tolist(), "counts": counts}


def confident_errors(predictions: pd.DataFrame, label_names: list[str], limit: int) -> list[dict[str, Any]]:
    """The wrong predictions the model was most sure of, most confident first (ties broken by id)."""
    proba = predictions[proba_columns(label_names)].to_numpy(dtype=np.float64)
    frame = predictions.assign(confidence=proba.max(axis=1))
    wrong = frame[frame["label"] != frame["prediction"]]
    wrong = wrong.sort_values(["confidence", "id"], ascending=[False, True], kind="mergesort").head(limit)
    return [
        {
            "id": str(row.id),
            "text": str(row.text),
            "label": str(row.label_name),
            "prediction": str(row.prediction_name),
            "confidence": round(float(row.confidence), 6),
        }
        for row in wrong.itertuples()
    ]


def by_length(predictions: pd.DataFrame, buckets: int) -> list[dict[str, Any]]:
    """Accuracy and macro-F1 per text-length (characters) quantile bucket."""
    lengths = predictions["text"].astype(str).str.len()
    codes, edges = pd.qcut(lengths, q=buckets, labels=False, retbins=True, duplicates="drop")
    rows = []
    for bucket in range(len(edges) - 1):
        part = predictions[codes.to_numpy() == bucket]
        if part.empty:
            continue
        rows.append(
            {
                # qcut buckets are (low, high] except the first; lengths are whole characters.
                "chars": f"{int(edges[0]) if bucket == 0 else int(edges[bucket]) + 1}–{int(edges[bucket + 1])}",
                "n": len(part),
                **accuracy_macro_f1(part["label"].to_numpy(), part["prediction"].to_numpy()),
            }
        )
    return rows

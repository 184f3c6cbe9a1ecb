"""Calibration: top-label confidence in equal-width bins. One binning for the ECE metric, its bootstrap interval
and the reliability diagram, so the three always agree."""

from __future__ import annotations

import numpy as np


def confidence_bins(confidence: np.ndarray, bins: int) -> np.ndarray:
    """The bin index (0 .. bins-1) of each confidence in [0, 1]; a bin is (low, high], the first also holds 0."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray, bins: int) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| weighted by bin size."""
    index = confidence_bins(confidence, bins)
    counts = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, correct, bins) - np.bincount(index, confidence, bins))
    return float(gap.sum() / max(counts.sum(), 1))


def reliability(correct: np.ndarray, confidence: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Accuracy against mean confidence per non-empty bin: the reliability diagram's points."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = confidence_bins(confidence, bins)
    counts = np.bincount(index, minlength=bins)
    accuracy = np.bincount(index, correct, bins)
    mean_confidence = np.bincount(index, confidence, bins)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "n": int(counts[b]),
            "accuracy": float(accuracy[b] / counts[b]),
            "confidence": float(mean_confidence[b] / counts[b]),
        }
        for b in range(bins)
        if counts[b]
    ]

"""Metrics, bootstrap intervals and error analysis on small synthetic predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from qlora_pipeline.config import ConfigError, load_config
from qlora_pipeline.errors import DataError
from qlora_pipeline.evaluation.analysis import by_length, confident_errors
from qlora_pipeline.evaluation.bootstrap import bootstrap_block, bootstrap_intervals, resample_counts
from qlora_pipeline.evaluation.metrics import compute_metrics, evaluate, expected_calibration_error, metric_cell

BINARY = ["negative", "positive"]


def synthetic(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return labels, proba, proba.argmax(axis=1)


def frame(labels: np.ndarray, proba: np.ndarray, prediction: np.ndarray, names: list[str]) -> pd.DataFrame:
    data = {
        "id": [f"r{i}" for i in range(len(labels))],
        "dataset": "d",
        "text": ["x" * (i % 37 + 1) for i in range(len(labels))],
        "label": labels,
        "label_name": [names[i] for i in labels],
        "prediction": prediction,
        "prediction_name": [names[i] for i in prediction],
    }
    return pd.DataFrame(data | {f"prob_{n}": proba[:, i] for i, n in enumerate(names)})


@pytest.mark.parametrize("k", [2, 3])
def test_vectorized_bootstrap_equals_sklearn_on_each_resample(k: int) -> None:
    labels, proba, prediction = synthetic(300, k)
    proba = proba.round(2)  # ties exercise the threshold grouping
    proba[:, -1] = 1 - proba[:, :-1].sum(axis=1)
    weights = resample_counts(np.random.default_rng(1), len(labels), 5)
    block = bootstrap_block(weights, labels, proba, prediction, ece_bins=10)
    average = "binary" if k == 2 else "macro"
    for b, row in enumerate(weights):
        idx = np.repeat(np.arange(len(labels)), row.astype(int))
        y, p, pred = labels[idx], proba[idx], prediction[idx]
        assert block["accuracy"][b] == pytest.approx((y == pred).mean())
        assert block["macro_f1"][b] == pytest.approx(f1_score(y, pred, average="macro"))
        assert block["precision"][b] == pytest.approx(precision_score(y, pred, average=average, zero_division=0))
        assert block["recall"][b] == pytest.approx(recall_score(y, pred, average=average, zero_division=0))
        assert block["ece"][b] == pytest.approx(expected_calibration_error(y == pred, p.max(axis=1), 10))
        assert block["mcc"][b] == pytest.approx(matthews_corrcoef(y, pred))
        if k == 2:
            assert block["roc_auc"][b] == pytest.approx(roc_auc_score(y, p[:, 1]))
            assert block["pr_auc"][b] == pytest.approx(average_precision_score(y, p[:, 1]))
        else:
            assert block["roc_auc"][b] == pytest.approx(roc_auc_score(y, p, multi_class="ovr"))
            assert block["pr_auc"][b] == pytest.approx(average_precision_score(np.eye(k)[y], p))


def test_bootstrap_is_seeded_and_brackets_the_point_estimate() -> None:
    labels, proba, prediction = synthetic(400, 2)
    first = bootstrap_intervals(labels, proba, prediction, 300, seed=7)
    assert first == bootstrap_intervals(labels, proba, prediction, 300, seed=7)
    low, high = first["accuracy"]
    assert low < (labels == prediction).mean() < high


def test_stratified_resamples_keep_the_class_counts() -> None:
    labels = np.array([0] * 97 + [1] * 3)
    weights = resample_counts(np.random.default_rng(0), len(labels), 50, strata=labels)
    assert (weights[:, labels == 1].sum(axis=1) == 3).all()
    assert (weights.sum(axis=1) == len(labels)).all()
    assert len({tuple(row) for row in weights}) == 50  # still resampled, not copied


def test_stratified_bootstrap_reaches_the_intervals_from_the_config() -> None:
    assert load_config("quick_test", ["evaluation.bootstrap_stratified=true"]).evaluation.bootstrap_stratified
    labels, proba, prediction = synthetic(400, 2)
    table = frame(labels, proba, prediction, BINARY)
    plain = evaluate(table, BINARY, bootstrap=300, seed=3)["overall"]
    stratified = evaluate(table, BINARY, bootstrap=300, seed=3, stratified=True)["overall"]
    assert stratified["ci"] != plain["ci"]
    low, high = stratified["ci"]["recall"]
    assert low < stratified["recall"] < high


def test_bootstrap_zero_disables_intervals() -> None:
    labels, proba, prediction = synthetic(50, 2)
    assert "ci" not in evaluate(frame(labels, proba, prediction, BINARY), BINARY, bootstrap=0)["overall"]


def test_single_class_set_reports_auc_as_undefined_without_crashing() -> None:
    labels, proba, prediction = synthetic(40, 2)
    labels[:] = 1
    overall = evaluate(frame(labels, proba, prediction, BINARY), BINARY, bootstrap=200)["overall"]
    assert overall["roc_auc"] is None and overall["ci"]["roc_auc"] is None
    assert metric_cell(overall, "roc_auc") == "n/a — one class"
    assert metric_cell(overall, "pr_auc", with_ci=True) == "n/a — one class"


def test_nan_probabilities_are_refused_with_the_row_count() -> None:
    labels, proba, prediction = synthetic(30, 2)
    proba[[3, 8, 9], 0] = np.nan
    with pytest.raises(DataError, match="3 of 30 rows have NaN probabilities"):
        evaluate(frame(labels, proba, prediction, BINARY), BINARY)


def test_multiclass_brier_is_mean_squared_error_over_one_hot() -> None:
    labels, proba, prediction = synthetic(200, 3)
    brier = compute_metrics(labels, proba, prediction, ["a", "b", "c"])["brier"]
    assert brier == pytest.approx(((proba - np.eye(3)[labels]) ** 2).sum(axis=1).mean())


def test_ece_is_zero_when_confidence_equals_accuracy_and_large_when_overconfident() -> None:
    correct = np.array([1, 1, 1, 0] * 25, dtype=float)
    assert expected_calibration_error(correct, np.full(100, 0.75), 10) == pytest.approx(0.0)
    assert expected_calibration_error(correct, np.full(100, 0.99), 10) == pytest.approx(0.24)


def test_per_dataset_metrics_are_computed_on_each_dataset_alone() -> None:
    labels, proba, prediction = synthetic(100, 2)
    table = frame(labels, proba, prediction, BINARY)
    table.loc[50:, "dataset"] = "e"
    results = evaluate(table, BINARY)
    assert results["per_dataset"]["e"]["n"] == 50
    assert results["per_dataset"]["e"]["accuracy"] == pytest.approx((labels[50:] == prediction[50:]).mean())


def test_confident_errors_are_wrong_and_sorted_by_confidence() -> None:
    labels, proba, prediction = synthetic(200, 2)
    errors = confident_errors(frame(labels, proba, prediction, BINARY), BINARY, 5)
    assert len(errors) == 5
    assert all(e["label"] != e["prediction"] for e in errors)
    confidences = [e["confidence"] for e in errors]
    assert confidences == sorted(confidences, reverse=True)


def test_length_buckets_cover_every_row() -> None:
    labels, proba, prediction = synthetic(200, 2)
    assert sum(b["n"] for b in by_length(frame(labels, proba, prediction, BINARY), 4)) == 200


def test_bootstrap_count_is_validated_with_its_field_path() -> None:
    with pytest.raises(ConfigError, match="evaluation.bootstrap must be 0 \\(off\\) or >= 100, got 5"):
        load_config("quick_test", ["evaluation.bootstrap=5"])

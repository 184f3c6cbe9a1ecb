"""The head registry: fitting, options, class weights, thresholds, save and reload."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import make_classification
from sklearn.metrics import precision_score

from qlora_pipeline.cli import main
from qlora_pipeline.config import ClassifierConfig
from qlora_pipeline.embeddings.classifiers import HEADS, check_heads, fit_head
from qlora_pipeline.errors import ConfigError
from qlora_pipeline.evaluation.trained_head import load_head, tune_threshold

CFG = ClassifierConfig(options={"xgboost": {"n_estimators": 20}, "mlp": {"hidden_layer_sizes": [32]}})


def data(classes: int = 2, weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    features, labels = make_classification(
        n_samples=240, n_features=16, n_informative=8, n_classes=classes, weights=weights, random_state=0
    )
    return features.astype(np.float32), labels


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("classes", [2, 3])
def test_every_head_fits_and_reloads_with_identical_probabilities(name: str, classes: int, tmp_path: Path) -> None:
    features, labels = data(classes)
    head = fit_head(name, features[:180], labels[:180], CFG, seed=0)
    proba = head.predict_proba(features[180:])
    assert proba.shape == (60, classes)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert (head.predict(proba) == labels[180:]).mean() > 1.3 / classes  # better than chance
    head.threshold = 0.3
    reloaded = load_head(head.save(tmp_path))
    assert reloaded.threshold == 0.3
    assert np.array_equal(reloaded.predict_proba(features[180:]), proba)


def test_xgboost_is_saved_in_its_own_format_with_its_options(tmp_path: Path) -> None:
    features, labels = data()
    head = fit_head("xgboost", features, labels, CFG, seed=0)
    head.save(tmp_path)
    assert (tmp_path / "xgboost.ubj").is_file()
    booster = load_head(tmp_path / "xgboost.joblib").model.steps[-1][1]
    assert booster.get_booster().num_boosted_rounds() == 20


def test_class_weights_move_predictions_toward_the_weighted_class() -> None:
    features, labels = data(weights=[0.85, 0.15])
    plain = fit_head("logreg", features, labels, CFG, seed=0)
    weighted = fit_head("logreg", features, labels, CFG, seed=0, class_weights={0: 1.0, 1: 5.0})
    balanced = fit_head("logreg", features, labels, dataclasses.replace(CFG, class_weight="balanced"), seed=0)
    plain_n, weighted_n, balanced_n = (h.predict(h.predict_proba(features)).sum() for h in (plain, weighted, balanced))
    assert weighted_n > plain_n and balanced_n > plain_n


@pytest.mark.parametrize("method", ["soft_vote", "stacking"])
def test_ensemble_combines_the_configured_members(method: str) -> None:
    features, labels = data()
    cfg = dataclasses.replace(
        CFG, options={**CFG.options, "ensemble": {"members": ["logreg", "xgboost"], "method": method}}
    )
    check_heads(cfg)
    head = fit_head("ensemble", features, labels, cfg, seed=0)
    ensemble = head.model.steps[-1][1]
    assert [name for name, _ in ensemble.estimators] == ["logreg", "xgboost"]
    assert type(ensemble).__name__ == ("StackingClassifier" if method == "stacking" else "VotingClassifier")


def test_precision_threshold_reaches_the_target() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    proba = np.clip(labels * 0.3 + rng.random(500) * 0.7, 0, 1)
    threshold = tune_threshold(labels, proba, "precision", target_precision=0.9)
    assert precision_score(labels, proba >= threshold) >= 0.9
    assert precision_score(labels, proba >= 0.5) < 0.9  # the default threshold would not


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"xgboost": {"n_estimator": 5}}, "xgboost does not take 'n_estimator' (did you mean 'n_estimators'?)"),
        ({"svm": {"kernel": "rbf"}}, "svm does not take 'kernel'; it takes: C, class_weight"),
        ({"forest": {}}, "classifier.options: unknown head 'forest'; registered: logreg, xgboost, svm, mlp, ensemble"),
        ({"ensemble": {"members": ["logreg"]}}, "ensemble.members must be 2 or more distinct heads"),
    ],
)
def test_bad_head_options_are_one_clear_config_error(options: dict[str, dict[str, object]], expected: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_heads(ClassifierConfig(options=options))


def test_bad_head_option_from_the_cli_is_exit_2_before_any_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quick-test", "--output-dir", str(tmp_path), "--set", "classifier.options={logreg: {alpha: 1}}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlora: error: classifier.options.logreg: logreg does not take 'alpha'")
    assert len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_unknown_head_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="unknown head 'svm2'; registered: logreg, xgboost, svm, mlp, ensemble"):
        check_heads(ClassifierConfig(heads=["svm2"]))

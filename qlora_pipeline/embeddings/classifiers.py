"""Classifier heads on embeddings: a registry selected by name in the config, checked before a run starts.

A head is an sklearn-style estimator behind an optional StandardScaler. Its hyperparameters are its
estimator's own parameters, set under `classifier.options.<head>` and checked before a run starts.
A fitted head is a `TrainedHead` (evaluation/trained_head.py), saved as the TF-IDF baseline is.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from qlora_pipeline.errors import ConfigError
from qlora_pipeline.evaluation.trained_head import TrainedHead

if TYPE_CHECKING:
    from qlora_pipeline.config import ClassifierConfig

log = logging.getLogger(__name__)


def make_logreg(cfg: ClassifierConfig, seed: int, options: dict[str, Any]) -> Any:
    return LogisticRegression(**{"C": cfg.C, "max_iter": cfg.max_iter, "random_state": seed, **options})


def make_xgboost(cfg: ClassifierConfig, seed: int, options: dict[str, Any]) -> Any:
    from xgboost import XGBClassifier

    # Shallow trees on a column subsample: embeddings are dense and many-dimensional, training sets small.
    defaults: dict[str, Any] = {"n_estimators": 300, "max_depth": 4, "learning_rate": 0.1, "subsample": 0.9}
    defaults |= {"colsample_bytree": 0.5, "tree_method": "hist", "random_state": seed}
    return XGBClassifier(**{**defaults, **options})


def make_svm(cfg: ClassifierConfig, seed: int, options: dict[str, Any]) -> Any:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import LinearSVC

    svm = LinearSVC(**{"C": cfg.C, "max_iter": cfg.max_iter, "random_state": seed, **options})
    return CalibratedClassifierCV(svm, method="sigmoid", cv=3)  # Platt scaling: probabilities for thresholds


def make_mlp(cfg: ClassifierConfig, seed: int, options: dict[str, Any]) -> Any:
    from sklearn.neural_network import MLPClassifier

    # One hidden layer, early stopping on a seeded 10% hold-out: enough capacity, little overfitting.
    defaults: dict[str, Any] = {"hidden_layer_sizes": (256,), "early_stopping": True, "max_iter": 300}
    return MLPClassifier(**{**defaults, "random_state": seed, **options})


def make_ensemble(cfg: ClassifierConfig, seed: int, options: dict[str, Any]) -> Any:
    from sklearn.ensemble import StackingClassifier, VotingClassifier

    members = [(name, HEADS[name](cfg, seed, cfg.options.get(name, {}))) for name in ensemble_members(cfg)]
    if options.get("method", "soft_vote") == "stacking":
        final = LogisticRegression(max_iter=cfg.max_iter, random_state=seed)
        return StackingClassifier(members, final_estimator=final, stack_method="predict_proba", cv=3)
    return VotingClassifier(members, voting="soft")


HEADS: dict[str, Callable[[ClassifierConfig, int, dict[str, Any]], Any]] = {
    "logreg": make_logreg,
    "xgboost": make_xgboost,
    "svm": make_svm,
    "mlp": make_mlp,
    "ensemble": make_ensemble,
}
ENSEMBLE_OPTIONS = {"members": ["logreg", "svm"], "method": "soft_vote"}  # defaults; method: soft_vote | stacking


def ensemble_members(cfg: ClassifierConfig) -> list[str]:
    return list(cfg.options.get("ensemble", {}).get("members", ENSEMBLE_OPTIONS["members"]))


def accepted_options(name: str) -> list[str]:
    """The option names a head takes: its estimator's parameters (the ensemble's: members, method)."""
    if name == "ensemble":
        return list(ENSEMBLE_OPTIONS)
    if name == "svm":
        from sklearn.svm import LinearSVC

        return sorted(LinearSVC().get_params())
    estimator = HEADS[name](_DEFAULT_CFG, 0, {})
    return sorted(estimator.get_params(deep=False))


def check_heads(cfg: ClassifierConfig) -> None:
    """Refuse, before any work, an unknown head, an option a head does not take, or a bad ensemble."""
    registered = ", ".join(HEADS)
    for where, names in (("classifier.heads", cfg.heads), ("classifier.options", list(cfg.options))):
        unknown = [name for name in names if name not in HEADS]
        if unknown:
            raise ConfigError(f"{where}: unknown head {', '.join(map(repr, unknown))}; registered: {registered}")
    for name, options in cfg.options.items():
        takes = accepted_options(name)
        for option in options:
            if option not in takes:
                close = difflib.get_close_matches(option, takes, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"classifier.options.{name}: {name} does not take '{option}'{hint}; it takes: {', '.join(takes)}"
                )
    if "ensemble" in cfg.heads or "ensemble" in cfg.options:
        members = ensemble_members(cfg)
        bad = [m for m in members if m not in HEADS or m == "ensemble"]
        if bad or len(members) < 2 or len(set(members)) != len(members):
            raise ConfigError(
                f"classifier.options.ensemble.members must be 2 or more distinct heads from "
                f"{', '.join(h for h in HEADS if h != 'ensemble')}, got {members}"
            )
        method = cfg.options.get("ensemble", {}).get("method", "soft_vote")
        if method not in ("soft_vote", "stacking"):
            raise ConfigError(f"classifier.options.ensemble.method must be soft_vote or stacking, got {method!r}")


def fit_head(
    name: str,
    features: np.ndarray,
    labels: np.ndarray,
    cfg: ClassifierConfig,
    seed: int,
    class_weights: dict[int, float] | None = None,
) -> TrainedHead:
    """Fit head `name` (optionally behind a StandardScaler). Class weights, given or from
    `cfg.class_weight == "balanced"`, become per-sample weights, which every registered head accepts."""
    steps = [StandardScaler()] if cfg.standardize else []
    model = make_pipeline(*steps, HEADS[name](cfg, seed, cfg.options.get(name, {})))
    if class_weights is None and cfg.class_weight == "balanced":
        classes, counts = np.unique(labels, return_counts=True)
        class_weights = {int(c): len(labels) / (len(classes) * n) for c, n in zip(classes, counts, strict=True)}
    fit_params = {}
    if class_weights is not None:
        weights = np.array([class_weights.get(int(label), 1.0) for label in labels], dtype=np.float64)
        fit_params[f"{model.steps[-1][0]}__sample_weight"] = weights
    model.fit(features, labels, **fit_params)
    return TrainedHead(name, model)


def _default_cfg() -> ClassifierConfig:
    from qlora_pipeline.config import ClassifierConfig

    return ClassifierConfig()


_DEFAULT_CFG = _default_cfg()

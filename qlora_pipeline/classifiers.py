"""Classifier heads on embeddings, a registry selected by name in the config, and the TF-IDF baseline.

A head is an sklearn-style estimator behind an optional StandardScaler. Its hyperparameters are its
estimator's own parameters, set under `classifier.options.<head>` and checked before a run starts.
Heads are saved with joblib, except XGBoost, whose booster is saved in its own format (`<name>.ubj`).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_recall_curve
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from qlora_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from qlora_pipeline.config import ClassifierConfig

log = logging.getLogger(__name__)

# The TF-IDF baseline head trained beside every run; reports compare the primary head with it.
BASELINE = "tfidf_logreg"


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


@dataclass
class TrainedHead:
    name: str
    model: Pipeline
    threshold: float | None = None  # binary only: P(positive class) at or above which we predict it

    def predict_proba(self, features: Any) -> np.ndarray:
        """Class probabilities in float64, each row summing to one (heads fitted on float32 vectors answer in
        float32, whose rows miss one by ~1e-7, and sklearn's probabilistic metrics warn about that)."""
        proba = np.asarray(self.model.predict_proba(features), dtype=np.float64)
        return proba / proba.sum(axis=1, keepdims=True)

    def predict(self, proba: np.ndarray) -> np.ndarray:
        if self.threshold is not None and proba.shape[1] == 2:
            return (proba[:, 1] >= self.threshold).astype(int)
        return proba.argmax(axis=1)  # multi-class: argmax of the (calibrated) probabilities

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.joblib"
        record: dict[str, Any] = {"name": self.name, "threshold": self.threshold}
        final = self.model.steps[-1][1]
        if type(final).__name__ == "XGBClassifier":  # the booster in XGBoost's own, version-stable format
            final.save_model(folder / f"{self.name}.ubj")
            record |= {"steps": self.model.steps[:-1], "xgboost": f"{self.name}.ubj"}
        else:
            record["model"] = self.model
        joblib.dump(record, path)
        return path


def load_head(path: Path) -> TrainedHead:
    """Load a head written by `TrainedHead.save` (its `.joblib` file)."""
    record = joblib.load(path)
    if "xgboost" in record:
        from xgboost import XGBClassifier

        booster = XGBClassifier()
        booster.load_model(Path(path).parent / record["xgboost"])
        model = Pipeline([*record["steps"], ("xgbclassifier", booster)])
        return TrainedHead(record["name"], model, record["threshold"])
    return TrainedHead(record["name"], record["model"], record["threshold"])


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


def tune_threshold(labels: np.ndarray, positive_proba: np.ndarray, metric: str, target_precision: float = 0.9) -> float:
    """The threshold on P(positive) that maximizes `metric` ("f1" or "macro_f1") on these labels; for
    "precision", the lowest threshold whose precision reaches `target_precision` (the most recall there)."""
    if metric == "precision":
        precision, _, thresholds = precision_recall_curve(labels, positive_proba)
        reaching = np.flatnonzero(precision[:-1] >= target_precision)
        if len(reaching):
            return float(thresholds[reaching[0]])
        best = int(np.argmax(precision[:-1]))
        log.warning(
            "no threshold reaches precision %.3f on validation; using the most precise one (%.3f)",
            target_precision,
            precision[best],
        )
        return float(thresholds[best])
    candidates = np.unique(np.concatenate([positive_proba, [0.5]]))
    average = "binary" if metric == "f1" else "macro"
    scores = [f1_score(labels, (positive_proba >= t).astype(int), average=average, zero_division=0) for t in candidates]
    best = int(np.argmax(scores))  # first best: the lowest threshold among ties
    return float(candidates[best])


def fit_baseline(texts: list[str], labels: np.ndarray, seed: int) -> TrainedHead:
    """TF-IDF over character 1-3-grams (works for Chinese without a word segmenter) + logistic regression."""
    model = make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True),
        LogisticRegression(C=4.0, max_iter=2000, random_state=seed),
    )
    model.fit(texts, labels)
    return TrainedHead(BASELINE, model)


def _default_cfg() -> ClassifierConfig:
    from qlora_pipeline.config import ClassifierConfig

    return ClassifierConfig()


_DEFAULT_CFG = _default_cfg()

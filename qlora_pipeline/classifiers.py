"""Classifier heads on embeddings, a registry selected by name in the config, and the TF-IDF baseline."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import joblib
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from qlora_pipeline.errors import ConfigError

if TYPE_CHECKING:
    from qlora_pipeline.config import ClassifierConfig

log = logging.getLogger(__name__)


def make_logreg(cfg: ClassifierConfig, seed: int) -> Any:
    return LogisticRegression(
        C=cfg.C,
        max_iter=cfg.max_iter,
        class_weight=None if cfg.class_weight == "none" else cfg.class_weight,
        random_state=seed,
    )


HEADS: dict[str, Callable[[ClassifierConfig, int], Any]] = {"logreg": make_logreg}


def check_heads(names: list[str]) -> None:
    unknown = [name for name in names if name not in HEADS]
    if unknown:
        raise ConfigError(
            f"classifier.heads: unknown head {', '.join(map(repr, unknown))}; registered: {', '.join(HEADS)}"
        )


@dataclass
class TrainedHead:
    name: str
    model: Pipeline
    threshold: float | None = None  # binary only: P(positive class) at or above which we predict it

    def predict_proba(self, features: Any) -> np.ndarray:
        return np.asarray(self.model.predict_proba(features), dtype=np.float64)

    def predict(self, proba: np.ndarray) -> np.ndarray:
        if self.threshold is not None and proba.shape[1] == 2:
            return (proba[:, 1] >= self.threshold).astype(int)
        return proba.argmax(axis=1)

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.name}.joblib"
        joblib.dump({"name": self.name, "model": self.model, "threshold": self.threshold}, path)
        return path


def fit_head(name: str, features: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig, seed: int) -> TrainedHead:
    steps = [StandardScaler()] if cfg.standardize else []
    model = make_pipeline(*steps, HEADS[name](cfg, seed))
    model.fit(features, labels)
    return TrainedHead(name, model)


def tune_threshold(labels: np.ndarray, positive_proba: np.ndarray, metric: str) -> float:
    """The threshold on P(positive) that maximizes `metric` ("f1" or "macro_f1") on these labels."""
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
    return TrainedHead("tfidf_logreg", model)

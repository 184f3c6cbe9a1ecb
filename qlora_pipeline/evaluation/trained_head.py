"""A trained sklearn head: class probabilities, a decision threshold tuned on validation, joblib save and load.

The embeddings path's classifiers (`embeddings/classifiers.py`) and the TF-IDF baseline (`baseline.py`) are such
heads. Heads are saved with joblib, except XGBoost, whose booster is saved in its own format (`<name>.ubj`); the
SHA-256 of each saved file goes into the folder's checksums.json (`integrity.py`), which `qlora predict` checks
before unpickling a head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.metrics import f1_score, precision_recall_curve
from sklearn.pipeline import Pipeline

from qlora_pipeline.integrity import record_checksums

log = logging.getLogger(__name__)


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
        saved = [path.name]
        if type(final).__name__ == "XGBClassifier":  # the booster in XGBoost's own, version-stable format
            final.save_model(folder / f"{self.name}.ubj")
            record |= {"steps": self.model.steps[:-1], "xgboost": f"{self.name}.ubj"}
            saved.append(f"{self.name}.ubj")
        else:
            record["model"] = self.model
        joblib.dump(record, path)
        record_checksums(folder, saved)
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

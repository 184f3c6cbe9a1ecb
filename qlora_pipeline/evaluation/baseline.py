"""The TF-IDF baseline trained beside every run, on the same splits: what the data supports without the model.

Character 1-3-grams need no word segmenter, so Chinese works as well as English. Reports compare the primary
head with it, and `qlora predict --head tfidf_logreg` scores with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from qlora_pipeline.evaluation.trained_head import TrainedHead

BASELINE = "tfidf_logreg"
PAIR_SEPARATOR = " \u2016 "  # what joins a pair's two texts into the one text the baseline reads


def baseline_texts(frame: Any) -> list[str]:
    """What the baseline reads: the text, or for pair tasks both texts joined by a separator."""
    if "text_pair" not in frame:
        return list(frame["text"])
    return [f"{a}{PAIR_SEPARATOR}{b}" for a, b in zip(frame["text"], frame["text_pair"], strict=True)]


def fit_baseline(texts: list[str], labels: np.ndarray, seed: int) -> TrainedHead:
    """TF-IDF over character 1-3-grams (works for Chinese without a word segmenter) + logistic regression."""
    model = make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True),
        LogisticRegression(C=4.0, max_iter=2000, random_state=seed),
    )
    model.fit(texts, labels)
    return TrainedHead(BASELINE, model)

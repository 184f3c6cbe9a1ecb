"""Time evaluation + every figure + dashboard for 100,000 synthetic predictions: python scripts/bench_evaluation.py

Two heads, two datasets, 1000 bootstrap resamples (the default). The target is under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from qlora_pipeline.config import EvaluationConfig
from qlora_pipeline.evaluation.metrics import proba_columns
from qlora_pipeline.evaluation.results import evaluate_split
from qlora_pipeline.stages import visualize_run

NAMES = ["negative", "positive"]


def synthetic(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    positive = np.clip(0.5 + (labels - 0.5) * 0.5 + rng.normal(0, 0.25, n), 0.001, 0.999)
    frame = pd.DataFrame(
        {
            "id": np.arange(n).astype(str),
            "dataset": np.where(np.arange(n) % 2 == 0, "alpha", "beta"),
            "text": ["review text " * (i % 40 + 1) for i in range(n)],
            "label": labels,
            "label_name": np.array(NAMES)[labels],
            "prediction": (positive >= 0.5).astype(int),
        }
    )
    frame["prediction_name"] = np.array(NAMES)[frame["prediction"]]
    frame[proba_columns(NAMES)] = np.c_[1 - positive, positive]
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--stratified", action="store_true", help="stratified bootstrap (within each class)")
    args = parser.parse_args()
    options = EvaluationConfig(bootstrap=args.bootstrap, bootstrap_stratified=args.stratified)
    heads = {"logreg": synthetic(args.rows, 1), "tfidf_logreg": synthetic(args.rows, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        start = time.perf_counter()
        evaluate_split(run_dir, "test", heads, NAMES, options, seed=0)
        evaluated = time.perf_counter()
        visualize_run(run_dir, figures=True)
        done = time.perf_counter()
        pngs = len(list(run_dir.rglob("*.png")))
    print(f"{args.rows} predictions x 2 heads, 2 datasets, {args.bootstrap} bootstrap resamples")
    print(f"  evaluation (metrics, CIs, curves, errors, files): {evaluated - start:6.2f} s")
    print(f"  figures ({pngs} PNG) + dashboard + summaries:      {done - evaluated:6.2f} s")
    print(f"  total:                                            {done - start:6.2f} s")


if __name__ == "__main__":
    main()

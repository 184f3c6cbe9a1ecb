"""The evaluation stage's files, per dataset and split: evaluation_results.json and predictions.csv, in
`<dataset folder>/<split>/` (`runs.dataset_folder`: the name itself, or a safe form of a name such as 评论).
Summaries, figures, the dashboard and the report read them back (`collect_results`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from qlora_pipeline.evaluation.analysis import by_length, confident_errors, curves
from qlora_pipeline.evaluation.metrics import evaluate
from qlora_pipeline.runs import dataset_folder, inside, write_json

RESULTS_FILE = "evaluation_results.json"


def evaluate_split(
    run_dir: Path,
    split: str,
    predictions: dict[str, pd.DataFrame],
    label_names: list[str],
    options: Any,
    seed: int,
) -> dict[str, Any]:
    """Score every head's predictions on one split; write the per-dataset files. The first head is primary.

    `options` is the config's EvaluationConfig. Returns {head: {"overall": …, "per_dataset": …}} for metrics.json.
    """
    metrics = {
        head: evaluate(
            frame,
            label_names,
            ece_bins=options.ece_bins,
            bootstrap=options.bootstrap,
            seed=seed,
            stratified=options.bootstrap_stratified,
        )
        for head, frame in predictions.items()
    }
    primary = next(iter(predictions))
    for dataset, frame in predictions[primary].groupby("dataset", sort=True):
        # A dataset's name never writes outside the run: a safe folder name, checked to stay inside.
        folder = inside(run_dir, dataset_folder(str(dataset)), split)
        folder.mkdir(parents=True, exist_ok=True)
        if options.save_predictions:
            frame.to_csv(folder / "predictions.csv", index=False)
        results = {
            "dataset": str(dataset),
            "split": split,
            "label_names": list(label_names),
            "primary_head": primary,
            "heads": {head: m["per_dataset"][str(dataset)] for head, m in metrics.items()},
            "curves": {
                head: curves(p[p["dataset"] == dataset], label_names, options.ece_bins)
                for head, p in predictions.items()
            },
            "confident_errors": confident_errors(frame, label_names, options.error_examples),
            "by_length": by_length(frame, options.length_buckets),
        }
        write_json(folder / RESULTS_FILE, results)
    return metrics


def collect_results(run_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{split: {dataset: evaluation_results}} for every results file in the run directory."""
    collected: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(run_dir.glob(f"*/*/{RESULTS_FILE}")):
        results = json.loads(path.read_text(encoding="utf-8"))
        collected.setdefault(results["split"], {})[results["dataset"]] = results
    return collected

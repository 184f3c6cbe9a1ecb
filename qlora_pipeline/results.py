"""The evaluation stage's files, per dataset and split: evaluation_results.json, predictions.csv,
evaluation_summary.md. Figures, the dashboard and the report read these files back (`collect_results`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from qlora_pipeline.analysis import by_length, confident_errors, curves
from qlora_pipeline.evaluation import HEADLINE, evaluate, metric_cell
from qlora_pipeline.runs import write_json

RESULTS_FILE = "evaluation_results.json"
SUMMARY_FILE = "evaluation_summary.md"


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
        folder = run_dir / str(dataset) / split
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


def escape(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    flat = flat if len(flat) <= limit else flat[: limit - 1] + "…"
    return flat.replace("|", "\\|")


def summary_markdown(results: dict[str, Any], figures: list[str]) -> str:
    names, primary = results["label_names"], results["primary_head"]
    heads = results["heads"]
    main = heads[primary]
    lines = [f"# {results['dataset']} — {results['split']} (n = {main['n']})", ""]
    lines += ["Values with bootstrap 95% intervals in brackets where computed.", ""]
    lines += ["| head | " + " | ".join(HEADLINE) + " |", "|---" * (len(HEADLINE) + 1) + "|"]
    lines += [
        f"| {h} | " + " | ".join(metric_cell(m, k, with_ci=True) for k in HEADLINE) + " |" for h, m in heads.items()
    ]
    lines += ["", f"## Per class ({primary})", "", "| class | precision | recall | f1 | n |", "|---|---|---|---|---|"]
    for name, row in main["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['n']} |")
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
    lines += ["| true \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {names[i]} | " + " | ".join(map(str, row)) + " |" for i, row in enumerate(main["confusion_matrix"])]
    lines += ["", "## By text length (characters)", "", "| length | n | accuracy | macro_f1 |", "|---|---|---|---|"]
    lines += [f"| {b['chars']} | {b['n']} | {b['accuracy']:.4f} | {b['macro_f1']:.4f} |" for b in results["by_length"]]
    lines += ["", "## Most confidently wrong", ""]
    if results["confident_errors"]:
        lines += ["| confidence | label | prediction | id | text |", "|---|---|---|---|---|"]
        lines += [
            f"| {e['confidence']:.3f} | {e['label']} | {e['prediction']} | {escape(e['id'])} | {escape(e['text'])} |"
            for e in results["confident_errors"]
        ]
    else:
        lines.append("No wrong predictions.")
    if figures:
        lines += ["", "## Figures", "", *(f"![{Path(f).stem}]({f})" for f in figures)]
    return "\n".join(lines) + "\n"


def write_summaries(run_dir: Path) -> list[Path]:
    """evaluation_summary.md beside each results file, linking the figures already in that folder."""
    paths = []
    for split in collect_results(run_dir).values():
        for results in split.values():
            folder = run_dir / results["dataset"] / results["split"]
            figures = sorted(p.name for p in folder.glob("*.png"))
            path = folder / SUMMARY_FILE
            path.write_text(summary_markdown(results, figures), encoding="utf-8")
            paths.append(path)
    return paths

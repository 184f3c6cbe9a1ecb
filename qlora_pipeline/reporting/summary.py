"""evaluation_summary.md beside each split's evaluation_results.json: metrics of every head, per class, confusion
matrix, by text length, the most confidently wrong predictions, and links to the figures in that folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_pipeline.evaluation.metrics import HEADLINE, metric_cell
from qlora_pipeline.evaluation.results import collect_results
from qlora_pipeline.reporting.markdown import flat, table
from qlora_pipeline.runs import dataset_folder, inside

SUMMARY_FILE = "evaluation_summary.md"


def summary_markdown(results: dict[str, Any], figures: list[str]) -> str:
    names, primary = results["label_names"], results["primary_head"]
    heads = results["heads"]
    main = heads[primary]
    lines = [f"# {results['dataset']} — {results['split']} (n = {main['n']})", ""]
    lines += ["Values with bootstrap 95% intervals in brackets where computed.", ""]
    lines += table(
        ["head", *HEADLINE], [[h, *(metric_cell(m, k, with_ci=True) for k in HEADLINE)] for h, m in heads.items()]
    )
    lines += [f"## Per class ({primary})", ""]
    lines += table(
        ["class", "precision", "recall", "f1", "n"],
        [
            [name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", str(r["n"])]
            for name, r in main["per_class"].items()
        ],
    )
    lines += ["## Confusion matrix (rows: true, columns: predicted)", ""]
    lines += table(
        ["true \\ predicted", *names], [[names[i], *map(str, row)] for i, row in enumerate(main["confusion_matrix"])]
    )
    lines += ["## By text length (characters)", ""]
    lines += table(
        ["length", "n", "accuracy", "macro_f1"],
        [[b["chars"], str(b["n"]), f"{b['accuracy']:.4f}", f"{b['macro_f1']:.4f}"] for b in results["by_length"]],
    )
    lines += ["## Most confidently wrong", ""]
    errors = [
        [f"{e['confidence']:.3f}", e["label"], e["prediction"], flat(e["id"], 200), flat(e["text"], 200)]
        for e in results["confident_errors"]
    ]
    lines += (
        table(["confidence", "label", "prediction", "id", "text"], errors) if errors else ["No wrong predictions.", ""]
    )
    if figures:
        lines += ["## Figures", "", *(f"![{Path(f).stem}]({f})" for f in figures)]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_summaries(run_dir: Path, collected: dict[str, dict[str, dict[str, Any]]] | None = None) -> list[Path]:
    """evaluation_summary.md beside each results file, linking the figures already in that folder (`collected`:
    the run's `collect_results`, when the caller has read them already)."""
    paths = []
    for split in (collect_results(run_dir) if collected is None else collected).values():
        for results in split.values():
            folder = inside(run_dir, dataset_folder(results["dataset"]), results["split"])
            figures = sorted(p.name for p in folder.glob("*.png"))
            path = folder / SUMMARY_FILE
            path.write_text(summary_markdown(results, figures), encoding="utf-8")
            paths.append(path)
    return paths

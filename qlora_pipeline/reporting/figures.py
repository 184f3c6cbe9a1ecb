"""PNG figures, pure functions `(results, out_dir) -> path`. Matplotlib's object API (no pyplot state), Agg; each is
built and saved with the fonts of `fonts.py` (Chinese class and dataset names draw, not boxes).

`results` is one dataset/split's evaluation_results.json (see evaluation/results.py); every figure is drawn from it, so
figures can be redrawn from a finished run without the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline.evaluation.metrics import COMPARED
from qlora_pipeline.evaluation.results import collect_results
from qlora_pipeline.reporting.fonts import with_figure_fonts
from qlora_pipeline.runs import dataset_folder, inside

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TRAINING_LOGS = ("training_log.csv", "training_log.jsonl", "training_log.json")


def new_figure(width: float = 6.0, height: float = 4.5) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    return figure, figure.add_subplot()


def save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def where(results: dict[str, Any]) -> str:
    return f"{results['dataset']} / {results['split']}"


@with_figure_fonts
def plot_confusion_matrix(results: dict[str, Any], out_dir: Path) -> Path:
    import numpy as np

    names, primary = results["label_names"], results["primary_head"]
    matrix = np.array(results["heads"][primary]["confusion_matrix"])
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure, ax = new_figure(1.6 + 0.9 * len(names), 1.2 + 0.9 * len(names))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        colour = "white" if share[i, j] > 0.5 else "black"
        ax.text(j, i, f"{count}\n{share[i, j]:.0%}", ha="center", va="center", color=colour)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix — {primary}\n{where(results)}")
    figure.colorbar(image, ax=ax, label="share of true class")
    return save(figure, out_dir / "confusion_matrix.png")


@with_figure_fonts
def plot_curve(results: dict[str, Any], out_dir: Path, kind: str) -> Path | None:
    """ROC (kind "roc") or precision-recall (kind "pr") curves of every head; None when undefined (one class)."""
    x_key, y_key = ("fpr", "tpr") if kind == "roc" else ("recall", "precision")
    metric = "roc_auc" if kind == "roc" else "pr_auc"
    figure, ax = new_figure()
    drawn = 0
    for head, head_curves in results["curves"].items():
        for name, curve in head_curves[kind].items():
            label = head if len(head_curves[kind]) == 1 else f"{head}: {name}"
            value = results["heads"][head].get(metric)
            suffix = f" ({metric} {value:.3f})" if value is not None and len(head_curves[kind]) == 1 else ""
            ax.plot(
                curve[x_key], curve[y_key], label=label + suffix, drawstyle="steps-post" if kind == "pr" else "default"
            )
            drawn += 1
    if not drawn:
        return None
    if kind == "roc":
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC — {where(results)}")
    else:
        ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall — {where(results)}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize="small")
    return save(figure, out_dir / f"{kind}_curve.png")


@with_figure_fonts
def plot_reliability(results: dict[str, Any], out_dir: Path) -> Path:
    figure, ax = new_figure()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for head, head_curves in results["curves"].items():
        bins = head_curves["reliability"]
        ece = results["heads"][head]["ece"]
        ax.plot(
            [b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=f"{head} (ECE {ece:.3f})"
        )
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel="mean confidence (top label)", ylabel="accuracy")
    ax.set_title(f"Reliability — {where(results)}")
    ax.legend(loc="upper left", fontsize="small")
    return save(figure, out_dir / "reliability.png")


@with_figure_fonts
def plot_score_distribution(results: dict[str, Any], out_dir: Path) -> Path:
    primary = results["primary_head"]
    scores = results["curves"][primary]["scores"]
    edges = scores["edges"]
    figure, ax = new_figure()
    for name, counts in scores["counts"].items():
        ax.stairs(counts, edges, label=f"true {name}", fill=True, alpha=0.45)
    ax.set(
        xlabel=scores["score"], ylabel="examples", title=f"Score distribution by class — {primary}\n{where(results)}"
    )
    ax.legend(fontsize="small")
    return save(figure, out_dir / "score_distribution.png")


def plot_evaluation(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Every per-dataset figure for one split's results."""
    paths = [plot_confusion_matrix(results, out_dir)]
    paths += [p for p in (plot_curve(results, out_dir, "roc"), plot_curve(results, out_dir, "pr")) if p]
    return paths + [plot_reliability(results, out_dir), plot_score_distribution(results, out_dir)]


@with_figure_fonts
def plot_dataset_comparison(split_results: dict[str, dict[str, Any]], out_dir: Path, split: str) -> Path:
    """Grouped bars: headline metrics of every head on every dataset of one split."""
    import numpy as np

    datasets = sorted(split_results)
    heads = list(split_results[datasets[0]]["heads"])
    groups = [(d, h) for d in datasets for h in heads]
    figure, ax = new_figure(max(6.0, 1.2 * len(COMPARED) * max(1, len(groups)) / 3), 4.5)
    width = 0.8 / len(groups)
    x = np.arange(len(COMPARED))
    for i, (dataset, head) in enumerate(groups):
        metrics = split_results[dataset]["heads"][head]
        values = [metrics.get(m) if metrics.get(m) is not None else np.nan for m in COMPARED]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{dataset} · {head}")
    ax.set_xticks(x, COMPARED)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(ylabel="score", ylim=(min(0.0, ax.get_ylim()[0]), 1.0), title=f"Metrics per dataset — {split}")
    ax.legend(fontsize="small", ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    return save(figure, out_dir / f"dataset_comparison_{split}.png")


def read_training_log(path: Path) -> list[dict[str, Any]]:
    """Rows of step + numbers from a CSV, JSON lines, or JSON (a list, or a trainer_state-like log_history)."""
    if path.suffix == ".csv":
        import csv

        with path.open(encoding="utf-8", newline="") as handle:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    text = path.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else None
    if rows is None:
        data = json.loads(text)
        rows = data.get("log_history", []) if isinstance(data, dict) else data
    return rows


@with_figure_fonts
def plot_training_curves(log_path: Path, out_dir: Path) -> Path:
    """Loss curves (left) and any other logged metric (right) against the optimizer step."""
    rows = [r for r in read_training_log(log_path) if "step" in r]
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, ([], []))[0].append(row["step"])
                series[key][1].append(value)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, other_ax = figure.subplots(1, 2)
    for key, (steps, values) in sorted(series.items()):
        (loss_ax if "loss" in key else other_ax).plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
    loss_ax.set(xlabel="step", ylabel="loss", title="Training and validation loss")
    other_ax.set(xlabel="step", ylabel="value", title="Other logged values")
    for ax in (loss_ax, other_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.suptitle(f"Training curves ({log_path.name})")
    return save(figure, out_dir / "training_curves.png")


def plot_run(run_dir: Path, collected: dict[str, dict[str, dict[str, Any]]] | None = None) -> list[Path]:
    """Every figure for a finished run: per dataset and split, per split across datasets, training curves.
    `collected`: the run's `collect_results`, when the caller has read them already."""
    paths = []
    for split, per_dataset in (collect_results(run_dir) if collected is None else collected).items():
        for dataset, results in per_dataset.items():
            paths += plot_evaluation(results, inside(run_dir, dataset_folder(dataset), split))
        paths.append(plot_dataset_comparison(per_dataset, run_dir / "figures", split))
    for name in TRAINING_LOGS:
        if (run_dir / name).is_file():
            paths.append(plot_training_curves(run_dir / name, run_dir / "figures"))
            break
    return paths

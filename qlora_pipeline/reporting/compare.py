"""`qlora compare`: the config fields that differ between runs and their metrics per dataset, side by side.

Written as markdown (default: `compare_<run>_vs_<run>.md` beside the first run, so outputs/ collects them) with a
bar chart of the same name (.png), and printed to the console.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import UserError
from qlora_pipeline.evaluation.metrics import COMPARED, metric_cell
from qlora_pipeline.evaluation.per_dataset import ZERO_SHOT
from qlora_pipeline.evaluation.per_dataset import head_name as per_dataset_head
from qlora_pipeline.evaluation.text_metrics import LOSS_METRICS, TEXT_METRICS
from qlora_pipeline.integrity import verify_manifest
from qlora_pipeline.reporting.fonts import with_figure_fonts
from qlora_pipeline.reporting.markdown import table
from qlora_pipeline.runs import flatten, read_json, run_state


@dataclass(frozen=True)
class RunSummary:
    name: str
    path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    label_names: list[str]


def load_run(path: Path) -> RunSummary:
    """A finished run's config, metrics and labels: refused while it runs, when it did not succeed (a dead `running`
    one reads as interrupted), or when those files differ from what its manifest.json recorded."""
    status = run_state(path)
    if status and status.get("state") != "succeeded":
        why = f" ({status['error']})" if status.get("error") else ""
        raise UserError(f"{path} is {status.get('state')}{why}: compare runs that succeeded")
    files = {name: path / f"{name}.json" for name in ("config", "metrics", "data_summary")}
    for file in files.values():
        if not file.is_file():
            raise UserError(f"{path} has no {file.name}: pass finished run directories (outputs/run_XXX)")
    if status:  # a run directory the pipeline wrote (hand-made ones have no status.json)
        verify_manifest(path, [f.name for f in files.values()])
    record, metrics, data = (read_json(f) for f in files.values())
    # An instruction (sft) run has no classes: its "task" is the generated answers.
    return RunSummary(path.name, path, record["config"], metrics, list(data.get("label_names", [])))


def is_instruction_run(run: RunSummary) -> bool:
    return run.metrics.get("task") == "instructions"


def compared_metrics(runs: list[RunSummary]) -> tuple[str, ...]:
    """The classification metrics, or for instruction runs loss, perplexity and the reference scores."""
    return (*LOSS_METRICS, *TEXT_METRICS) if is_instruction_run(runs[0]) else COMPARED


def check_same_task(runs: list[RunSummary]) -> None:
    if len({is_instruction_run(r) for r in runs}) > 1:
        kinds = "; ".join(f"{r.name}: {'instructions (sft)' if is_instruction_run(r) else 'classes'}" for r in runs)
        raise UserError(f"instruction (sft) runs and classification runs cannot be compared: {kinds}")
    tasks = {tuple(r.label_names) for r in runs}
    if len(tasks) > 1:
        described = "; ".join(f"{r.name}: {', '.join(r.label_names)}" for r in runs)
        raise UserError(f"runs of different tasks (different label sets) cannot be compared: {described}")


def config_rows(runs: list[RunSummary]) -> list[list[str]]:
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    return [
        [f"`{key}`", *(json.dumps(f.get(key), ensure_ascii=False) for f in flat)]
        for key in keys
        if len({json.dumps(f.get(key)) for f in flat}) > 1
    ]


def metric_rows(runs: list[RunSummary], split: str) -> list[list[str]]:
    names = compared_metrics(runs)
    datasets = sorted({d for r in runs for m in r.metrics["splits"].get(split, {}).values() for d in m["per_dataset"]})
    rows = []
    for scope in ["overall", *datasets] if len(datasets) > 1 else ["overall"]:
        for run in runs:
            for name in shown_heads(run.metrics):
                head = run.metrics["splits"].get(split, {}).get(name)
                if head is None:
                    continue
                metrics = head["overall"] if scope == "overall" else head["per_dataset"].get(scope)
                if metrics is not None:
                    rows.append(
                        [scope, f"{run.name} ({name})", *(metric_cell(metrics, k, with_ci=True) for k in names)]
                    )
    return rows


def shown_heads(metrics: dict[str, Any]) -> list[str]:
    """The primary head, and beside it the per-dataset models (experiment.per_dataset) and the zero-shot scores of
    an lm_label run (an sft run: the base model without its adapter), so a comparison shows what per-dataset training
    and fine-tuning each added."""
    primary = metrics["primary_head"]
    if metrics.get("task") == "instructions":  # an sft run: the tuned model and the base without its adapter
        return [primary, "base"]
    return [primary, *(name for name in (per_dataset_head(primary), ZERO_SHOT) if name != primary)]


@with_figure_fonts
def plot_comparison(runs: list[RunSummary], split: str, path: Path) -> Path:
    import numpy as np

    from qlora_pipeline.reporting.figures import new_figure, save

    figure, ax = new_figure(8, 4.5)
    width = 0.8 / len(runs)
    instructions = is_instruction_run(runs[0])
    names = TEXT_METRICS if instructions else COMPARED  # perplexity's scale would flatten the other bars
    x = np.arange(len(names))
    for i, run in enumerate(runs):
        overall = run.metrics["splits"].get(split, {}).get(run.metrics["primary_head"], {}).get("overall", {})
        values = [overall.get(k) if overall.get(k) is not None else np.nan for k in names]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{run.name} ({run.metrics['primary_head']})")
    ax.set_xticks(x, names)
    ax.axhline(0, color="black", linewidth=0.8)
    label = "score (0-100; exact match a share)" if instructions else "score (brier, ece: lower is better)"
    ax.set(ylabel=label, title=f"Runs compared — {split}, all datasets")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=min(len(runs), 4))
    return save(figure, path)


def default_output(paths: list[Path]) -> Path:
    return paths[0].resolve().parent / f"compare_{'_vs_'.join(p.resolve().name for p in paths)}.md"


def compare(run_paths: list[str | Path], out: str | Path | None = None) -> tuple[str, Path]:
    """Build the comparison; write markdown and chart. Returns (markdown, path of the markdown file)."""
    paths = [Path(p) for p in run_paths]
    if len(paths) < 2:
        raise UserError("compare needs at least two run directories")
    runs = [load_run(p) for p in paths]
    if len({r.name for r in runs}) < len(runs):  # run_001 of several folders (a sweep's trials): say which
        runs = [replace(r, name=f"{r.path.parent.name}/{r.name}") for r in runs]
    check_same_task(runs)
    target = Path(out) if out is not None else default_output(paths)
    target.parent.mkdir(parents=True, exist_ok=True)
    names = [r.name for r in runs]
    lines = [f"# Comparison: {' vs '.join(names)}", "", "## Config fields that differ", ""]
    differing = config_rows(runs)
    lines += table(["field", *names], differing) if differing else ["The configs are identical.", ""]
    splits = [s for s in ("validation", "test") if any(s in r.metrics["splits"] for r in runs)]
    for split in splits:
        lines += [f"## Metrics — {split} (primary head, and per-dataset / zero-shot where run; 95% CI in brackets)", ""]
        lines += table(["dataset", "run", *compared_metrics(runs)], metric_rows(runs, split))
    if splits:
        chart = plot_comparison(runs, splits[-1], target.with_suffix(".png"))
        lines += [f"![comparison chart]({chart.name})", ""]
    markdown = "\n".join(lines)
    target.write_text(markdown, encoding="utf-8")
    return markdown, target

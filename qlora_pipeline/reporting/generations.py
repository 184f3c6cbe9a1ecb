"""What an instruction (sft) run reports, read from its files: the data and what ran, loss, perplexity and reference
scores of the tuned model against the base without its adapter (the lift), a few answers side by side, a figure of
the scores, and the dashboard's generations tab (prompt, reference, base answer, tuned answer)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from qlora_pipeline.evaluation.text_metrics import LOSS_METRICS, LOWER_IS_BETTER, TEXT_METRICS
from qlora_pipeline.models.tiny import BUILTIN_PREFIX
from qlora_pipeline.reporting.markdown import flat, table
from qlora_pipeline.runs import read_json

GENERATIONS_FILE = "generations.jsonl"  # per dataset and split, written by sft/evaluate.py
SHOWN_IN_REPORT = 5
SHOWN_IN_DASHBOARD = 200
METRICS = (*LOSS_METRICS, *TEXT_METRICS)
LABELS = {
    "loss": "loss",
    "perplexity": "perplexity",
    "chrf": "chrF",
    "bleu": "BLEU (zh)",
    "rouge_l": "ROUGE-L",
    "exact_match": "exact match",
}
HEAD_LABELS = {"sft": "tuned (base + adapter)", "base": "base without adapter"}


def value(number: Any) -> str:
    return "n/a" if number is None else f"{number:.4f}" if isinstance(number, float) else str(number)


def generation_files(run_dir: Path) -> list[Path]:
    """Every generations.jsonl of the run, per dataset and split."""
    return sorted(run_dir.glob(f"*/*/{GENERATIONS_FILE}"))


def read_generations(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


# ---- experiment_report.md -------------------------------------------------------------------------------


def what_ran_rows(config: dict[str, Any], training: dict[str, Any] | None) -> list[list[str]]:
    """Prompts, truncation, packing and decoding, as configured and as resolved against the tokenizer."""
    sft, generation = config.get("sft", {}), config.get("generation", {})
    t = config.get("training", {})
    rows = [
        ["data format", str(sft.get("format"))],
        ["prompt format (requested)", str(sft.get("prompt_format"))],
        ["max length / truncation", f"{t.get('max_length')} tokens / {sft.get('truncation')}"],
        ["packing", "yes" if sft.get("packing") else "no (each batch padded to its longest example)"],
        [
            "decoding",
            (
                f"sampling (temperature {generation.get('temperature')}, top_p {generation.get('top_p')}, "
                f"top_k {generation.get('top_k')}, seeded)"
                if generation.get("do_sample")
                else "greedy"
            )
            + f", at most {generation.get('max_new_tokens')} new tokens",
        ],
    ]
    for split, counts in ((training or {}).get("truncation") or {}).items():
        rows.append(
            [
                f"truncation ({split})",
                f"{counts['truncated']} of {counts['examples']} examples cut: {counts['prompt_tokens_cut']} prompt "
                f"tokens, {counts['answer_tokens_cut']} answer tokens ({counts['answers_cut']} answers); "
                f"{counts['dropped']} dropped with no answer left",
            ]
        )
    return rows


def data_lines(data: dict[str, Any]) -> list[str]:
    sources = [[s["name"], s["format"], f"`{s['origin']}`", str(s["rows_read"])] for s in data["sources"]]
    removed = ", ".join(f"{k} {v}" for k, v in data["removed"].items() if v) or "none"
    rows = [
        [split, dataset, str(count)]
        for split, counts in data["splits"].items()
        for dataset, count in counts["per_dataset"].items()
    ]
    prompt, answer = data["prompt_length"], data["answer_length"]
    turns = data.get("answers_per_record", {})
    return [
        "## Data",
        "",
        *table(["source", "format", "origin", "records read"], sources),
        f"{data['rows_read']} records read, {data['rows_after_cleaning']} after cleaning, "
        f"{data['rows_after_sampling']} used. Removed: {removed}.",
        "",
        *table(["split", "dataset", "records"], rows),
        f"Prompt length (characters): median {prompt['median']}, p95 {prompt['p95']}, max {prompt['max']}; answer "
        f"length: median {answer['median']}, p95 {answer['p95']}, max {answer['max']}. Multi-turn records: "
        f"{turns.get('multi_turn_records', 0)}. Splits are drawn by prompt; prompts in more than one split: "
        f"{data['cross_split_overlap']}.",
        "",
        *(
            [
                "Not applied to instruction records (texts are kept as written): "
                + ", ".join(data["settings_not_applied"])
                + ".",
                "",
            ]
            if data.get("settings_not_applied")
            else []
        ),
        f"Data fingerprint: `{data['fingerprint']}`",
        "",
    ]


def results_lines(run_dir: Path, metrics: dict[str, Any], config: dict[str, Any]) -> list[str]:
    lines = [
        "## Results",
        "",
        "Loss and perplexity per answer token over every record of the split; the reference scores (0-100; exact "
        "match a share) over the answers generated for its sampled prompts. Δ is tuned minus base: the lift.",
        "",
    ]
    for split, per_head in metrics["splits"].items():
        ours = per_head["sft"]["overall"]
        rows = [
            [HEAD_LABELS.get(head, head), *(value(m["overall"].get(k)) for k in METRICS)]
            for head, m in per_head.items()
        ]
        lift = metrics.get("lift", {}).get(split) or {}
        if lift:
            rows.append(["Δ tuned − base", *(("n/a" if lift.get(k) is None else f"{lift[k]:+.4f}") for k in METRICS)])
        lines += [
            f"### {split} ({ours['n']} records, {ours['generated']} answers generated)",
            "",
            *table(["model", *(LABELS[k] for k in METRICS)], rows),
        ]
    lines += verdict_lines(metrics, config)
    signatures = metrics.get("signatures") or {}
    if signatures:
        lines += ["Metric signatures: " + "; ".join(f"{k} `{v}`" for k, v in signatures.items()) + ".", ""]
    lines += example_lines(run_dir)
    return lines


def verdict_lines(metrics: dict[str, Any], config: dict[str, Any]) -> list[str]:
    split = "test" if "test" in metrics["splits"] else next(iter(metrics["splits"]))
    lift = metrics.get("lift", {}).get(split) or {}
    if not lift:
        return []
    better = [
        LABELS[k] for k in METRICS if lift.get(k) is not None and (lift[k] < 0 if k in LOWER_IS_BETTER else lift[k] > 0)
    ]
    worse = [
        LABELS[k] for k in METRICS if lift.get(k) is not None and (lift[k] > 0 if k in LOWER_IS_BETTER else lift[k] < 0)
    ]
    lines = [
        "### Against the base model",
        "",
        f"On {split}, the adapter improves {', '.join(better) or 'nothing'}"
        + (f" and worsens {', '.join(worse)}" if worse else "")
        + " compared with the same base model without it, on the same prompts.",
        "",
    ]
    if str(config.get("model", {}).get("name_or_path", "")).startswith(BUILTIN_PREFIX):
        lines += [
            "The model is the package's built-in tiny Qwen3-architecture checkpoint with random weights: its answers "
            "carry no meaning. This run proves the code paths (NF4 loading, answer-only LoRA training, generation, "
            "scoring); point `model.name_or_path` at a real Qwen chat checkpoint for real results.",
            "",
        ]
    return lines


def example_lines(run_dir: Path) -> list[str]:
    lines = []
    for path in generation_files(run_dir):
        rows = read_generations(path, SHOWN_IN_REPORT)
        if not rows:
            continue
        folder = path.parent.relative_to(run_dir).as_posix()
        lines += [f"### Answers: {folder} (first {len(rows)}; all in [{folder}/{path.name}]({folder}/{path.name}))", ""]
        lines += table(
            ["prompt", "reference", "base without adapter", "tuned"],
            [
                [
                    flat(_last_request(r), 160),
                    flat(r["reference"], 160),
                    flat(r.get("base_answer", "—") or "(empty)", 160),
                    flat(r["answer"] or "(empty)", 160),
                ]
                for r in rows
            ],
        )
    return lines


def _last_request(row: dict[str, Any]) -> str:
    """The last user turn of a generated prompt (with its input), what the answer responds to."""
    users = [t for t in row.get("messages", []) if t.get("role") == "user"]
    if not users:
        return str(row.get("prompt", ""))
    last = users[-1]
    return last["content"] + (f" / {last['input']}" if last.get("input") else "")


# ---- figures/generation_metrics.png ---------------------------------------------------------------------


def plot_generation_metrics(run_dir: Path) -> Path | None:
    """Grouped bars: the reference scores of the tuned and the base model per split (exact match as a percentage)."""
    import numpy as np

    from qlora_pipeline.reporting.figures import new_figure, save

    metrics = read_json(run_dir / "metrics.json", optional=True)
    if not metrics or metrics.get("task") != "instructions":
        return None
    bars = [
        (split, head, m["overall"]) for split, per_head in metrics["splits"].items() for head, m in per_head.items()
    ]
    figure, ax = new_figure(8.0, 4.5)
    width = 0.8 / len(bars)
    x = np.arange(len(TEXT_METRICS))
    for i, (split, head, overall) in enumerate(bars):
        values = [
            np.nan if overall.get(k) is None else overall[k] * (100 if k == "exact_match" else 1) for k in TEXT_METRICS
        ]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"{split} · {HEAD_LABELS.get(head, head)}")
    ax.set_xticks(x, [LABELS[k] + (" (%)" if k == "exact_match" else "") for k in TEXT_METRICS])
    ax.set(ylabel="score (0-100)", title="Reference scores of the generated answers")
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2)
    return save(figure, run_dir / "figures" / "generation_metrics.png")


# ---- dashboard.html -------------------------------------------------------------------------------------


def dashboard_tabs(run_dir: Path) -> list[tuple[str, str, str]]:
    """(key, label, html) of the generations tab: per split the scores, then per dataset every generated answer
    beside its prompt, reference and the base model's answer."""
    metrics = read_json(run_dir / "metrics.json", optional=True)
    if not metrics or metrics.get("task") != "instructions":
        return []
    parts = ["<h2>Generations</h2>"]
    for split, per_head in metrics["splits"].items():
        header = "".join(f"<th>{html.escape(LABELS[k])}</th>" for k in METRICS)
        body = "".join(
            f"<tr><td>{html.escape(HEAD_LABELS.get(head, head))}</td>"
            + "".join(f"<td>{html.escape(value(m['overall'].get(k)))}</td>" for k in METRICS)
            + "</tr>"
            for head, m in per_head.items()
        )
        parts += [f"<h3>{html.escape(split)}</h3>", f"<table><tr><th>model</th>{header}</tr>{body}</table>"]
    for path in generation_files(run_dir):
        rows = read_generations(path, SHOWN_IN_DASHBOARD)
        folder = path.parent.relative_to(run_dir).as_posix()
        cells = "".join(
            "<tr>"
            + "".join(
                f'<td style="white-space: pre-wrap">{html.escape(str(text))}</td>'
                for text in (r["prompt"], r["reference"], r.get("base_answer", "—"), r["answer"])
            )
            + "</tr>"
            for r in rows
        )
        parts += [
            f"<h3>{html.escape(folder)} ({len(rows)} shown)</h3>",
            "<table><tr><th>prompt</th><th>reference</th><th>base without adapter</th><th>tuned</th></tr>"
            f"{cells}</table>",
        ]
    return [("generations", "Generations", "".join(parts))]

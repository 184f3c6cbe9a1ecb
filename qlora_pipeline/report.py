"""experiment_report.md, written from the files in the run directory, so it tells the truth about failed runs too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qlora_pipeline.evaluation import HEADLINE, format_metric
from qlora_pipeline.tiny_model import BUILTIN_PREFIX

BASELINE = "tfidf_logreg"


def load_optional(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_report(run_dir: Path, status: dict[str, Any]) -> Path:
    record = load_optional(run_dir / "config.json") or {}
    data = load_optional(run_dir / "data_summary.json")
    metrics = load_optional(run_dir / "metrics.json")
    reproduction = load_optional(run_dir / "reproduction.json")
    config = record.get("config", {})
    lines = [f"# Experiment report: {config.get('experiment', {}).get('name', '?')} ({run_dir.name})", ""]
    lines += status_section(status)
    lines += what_ran_section(config, record.get("model"), record.get("embedding"))
    if data:
        lines += data_section(data)
    if metrics:
        lines += results_section(metrics, config)
    if reproduction:
        lines += reproduction_section(reproduction)
    lines += timings_section(status)
    lines += environment_section(record.get("environment") or {})
    lines += artifacts_section(run_dir)
    path = run_dir / "experiment_report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out + [""]


def status_section(status: dict[str, Any]) -> list[str]:
    state = status.get("state", "unknown")
    lines = [
        f"**Status: {state.upper()}** — started {status.get('started_at')}, {status.get('elapsed_s')} s",
        "",
    ]
    if state != "succeeded":
        lines += [
            f"> **This run did not succeed ({state}).** Its results are incomplete and must not be used.",
            f"> Error: `{status.get('error')}`" if status.get("error") else "> (no error recorded)",
            "",
        ]
    return lines


def what_ran_section(
    config: dict[str, Any], model: dict[str, Any] | None, embedding: dict[str, Any] | None = None
) -> list[str]:
    if not config:
        return []
    exp, cfg_model, emb, clf = (config.get(k, {}) for k in ("experiment", "model", "embedding", "classifier"))
    sources = ", ".join(f"{s['name']} ({s['type']})" for s in config.get("data", {}).get("sources", []))
    rows = [
        ["mode", exp.get("mode", "")],
        ["seed", str(exp.get("seed", ""))],
        ["data sources", sources],
        ["max samples per dataset", str(config.get("data", {}).get("max_samples"))],
        ["model", cfg_model.get("name_or_path", "")],
        ["quantization requested", cfg_model.get("quantization", "")],
    ]
    if model:
        rows += [
            ["quantization used", model["quantization"]],
            ["compute dtype", model["compute_dtype"]],
            ["device", model["device"]],
            ["model files", f"`{model['source']}`"],
        ]
        rows += [["note", note] for note in model.get("notes", [])]
    rows += [
        ["pooling / max length", f"{emb.get('pooling')} / {emb.get('max_length')} tokens"],
        ["instruction", repr(emb.get("instruction"))],
        *embedding_rows(embedding or {}),
        [
            "heads",
            ", ".join(clf.get("heads", [])) + (f" + baseline {BASELINE}" if clf.get("baseline") else ""),
        ],
        ["threshold tuning", clf.get("threshold_metric", "none")],
    ]
    return ["## What ran", "", *table(["setting", "value"], rows)]


def embedding_rows(embedding: dict[str, Any]) -> list[list[str]]:
    rows = []
    splits = embedding.get("splits", {}).values()
    if splits:
        hits, total = sum(s["cache_hits"] for s in splits), sum(s["texts"] for s in splits)
        rows.append(["embedding cache", f"{hits} of {total} vectors reused" if embedding.get("cache") else "off"])
        if 0 < hits < total:  # see cache.py: a vector depends on its batch-mates at float-rounding level
            rows.append(["note", "vectors partly cached by other runs: a cold-cache rerun may differ by ~1e-7"])
    fidelity = embedding.get("quantization_fidelity")
    if fidelity:
        rows.append(
            [
                "quantization fidelity",
                f"mean cosine {fidelity['mean_cosine']:.4f} (min {fidelity['min_cosine']:.4f}) to the unquantized "
                f"model ({fidelity['reference']}) on {fidelity['texts']} training texts",
            ]
        )
    return rows


def data_section(data: dict[str, Any]) -> list[str]:
    names = data["label_names"]
    rows = []
    for split, counts in data["splits"].items():
        for dataset, per_class in counts["per_dataset"].items():
            rows.append([split, dataset, *(str(per_class.get(n, 0)) for n in names), str(sum(per_class.values()))])
    removed = ", ".join(f"{k} {v}" for k, v in data["removed"].items() if v) or "none"
    length = data["text_length"]
    return [
        "## Data",
        "",
        f"{data['rows_read']} rows read, {data['rows_after_cleaning']} after cleaning, "
        f"{data['rows_after_sampling']} used. Removed: {removed}.",
        "",
        *table(["split", "dataset", *names, "total"], rows),
        f"Text length (characters): min {length['min']}, median {length['median']}, mean {length['mean']}, "
        f"p95 {length['p95']}, max {length['max']}. Texts in more than one split: {data['cross_split_overlap']}.",
        "",
        f"Data fingerprint: `{data['fingerprint']}`",
        "",
    ]


def results_section(metrics: dict[str, Any], config: dict[str, Any]) -> list[str]:
    primary = metrics["primary_head"]
    lines = ["## Results", ""]
    for split, per_head in metrics["splits"].items():
        rows = [[head, *(format_metric(m["overall"].get(k)) for k in HEADLINE)] for head, m in per_head.items()]
        if BASELINE in per_head and primary in per_head:
            ours, base = per_head[primary]["overall"], per_head[BASELINE]["overall"]
            rows.append([f"Δ {primary} − baseline", *(delta(ours.get(k), base.get(k)) for k in HEADLINE)])
        lines += [f"### {split} (n = {next(iter(per_head.values()))['overall']['n']})", ""]
        lines += table(["head", *HEADLINE], rows)
        datasets = next(iter(per_head.values()))["per_dataset"]
        if len(datasets) > 1:
            rows = [
                [dataset, head, *(format_metric(m["per_dataset"][dataset].get(k)) for k in HEADLINE)]
                for dataset in datasets
                for head, m in per_head.items()
            ]
            lines += table(["dataset", "head", *HEADLINE], rows)
    lines += verdict_lines(metrics, config)
    return lines


def delta(ours: Any, base: Any) -> str:
    if ours is None or base is None:
        return "n/a"
    return f"{ours - base:+.4f}"


def verdict_lines(metrics: dict[str, Any], config: dict[str, Any]) -> list[str]:
    primary = metrics["primary_head"]
    split = "test" if "test" in metrics["splits"] else next(iter(metrics["splits"]))
    per_head = metrics["splits"][split]
    if BASELINE not in per_head:
        return []
    ours, base = per_head[primary]["overall"], per_head[BASELINE]["overall"]
    lines = [
        "### Against the baseline",
        "",
        f"On {split}, {primary} on the embeddings scores accuracy {format_metric(ours['accuracy'])} and "
        f"ROC-AUC {format_metric(ours.get('roc_auc'))}; the TF-IDF character n-gram baseline on the same splits "
        f"scores {format_metric(base['accuracy'])} and {format_metric(base.get('roc_auc'))}. "
        + (
            "The embeddings beat the baseline."
            if (ours.get("roc_auc") or 0) > (base.get("roc_auc") or 0)
            else "**The embeddings do not beat the baseline.**"
        ),
        "",
    ]
    if str(config.get("model", {}).get("name_or_path", "")).startswith(BUILTIN_PREFIX):
        lines += [
            "The model is the package's built-in tiny Qwen3-architecture checkpoint with random weights: its "
            "embeddings carry next to no meaning, so near-chance scores are expected. This run proves the code "
            "paths (4-bit loading, encoding, heads, evaluation), not the method; the baseline shows what the data "
            "itself supports. Point `model.name_or_path` at a real Qwen checkpoint for real results.",
            "",
        ]
    return lines


def reproduction_section(reproduction: dict[str, Any]) -> list[str]:
    verdict = "MATCH — every metric and every prediction is identical" if reproduction["matches"] else "MISMATCH"
    rows = [[c["what"], "yes" if c["match"] else "**no**", c["detail"]] for c in reproduction["checks"]]
    return [
        "## Reproduction",
        "",
        f"Reproduces `{reproduction['original']}`: **{verdict}**.",
        "",
        *table(["check", "identical", "detail"], rows),
    ]


def timings_section(status: dict[str, Any]) -> list[str]:
    rows = [[name, s["state"], f"{s.get('seconds', 0):.2f}"] for name, s in status.get("stages", {}).items()]
    return ["## Stage timings", "", *table(["stage", "state", "seconds"], rows)] if rows else []


def environment_section(env: dict[str, Any]) -> list[str]:
    if not env:
        return []
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)
    git = env.get("git")
    commit = f"{git['commit'][:12]}{' (uncommitted changes)' if git['dirty'] else ''}" if git else "not a git checkout"
    return [
        "## Environment",
        "",
        f"Python {env.get('python')} on {env.get('platform')} ({env.get('cpu_count')} CPUs); code {commit}.",
        "",
        f"Packages: {packages}.",
        "",
    ]


def artifacts_section(run_dir: Path) -> list[str]:
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    files = [f for f in files if not f.startswith(".")] + ["experiment_report.md"]
    return ["## Artifacts", "", *(f"- [{f}]({f})" for f in sorted(set(files))), ""]

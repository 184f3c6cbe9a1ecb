"""experiment_report.md, written from the files in the run directory, so it tells the truth about failed runs too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlora_pipeline.evaluation.baseline import BASELINE
from qlora_pipeline.evaluation.metrics import HEADLINE, format_metric, metric_cell
from qlora_pipeline.evaluation.per_dataset import ZERO_SHOT
from qlora_pipeline.evaluation.per_dataset import head_name as per_dataset_head
from qlora_pipeline.evaluation.results import RESULTS_FILE
from qlora_pipeline.models.tiny import BUILTIN_PREFIX
from qlora_pipeline.reporting import generations
from qlora_pipeline.reporting.markdown import table
from qlora_pipeline.runs import read_json, write_text_atomic

ENCODED = ("config", "detected")  # a source read in an encoding other than the default UTF-8 says which
ON_WHAT = {  # the primary head, in the verdict
    "qlora": "(the fine-tuned NF4 model with its LoRA adapter)",
    "qlora_per_dataset": "(one fine-tuned LoRA adapter per dataset on the NF4 model)",
}
WHAT = {"qlora": "fine-tuned adapter's scores", "qlora_per_dataset": "fine-tuned adapters' scores"}
REFERENCES = ((ZERO_SHOT, "zero_shot (lift)"), (BASELINE, "baseline"))  # Δ rows under the primary head


def write_report(run_dir: Path, status: dict[str, Any]) -> Path:
    record = read_json(run_dir / "config.json", optional=True) or {}
    data = read_json(run_dir / "data_summary.json", optional=True)
    metrics = read_json(run_dir / "metrics.json", optional=True)
    reproduction = read_json(run_dir / "reproduction.json", optional=True)
    config = record.get("config", {})
    lines = [f"# Experiment report: {config.get('experiment', {}).get('name', '?')} ({run_dir.name})", ""]
    lines += status_section(status)
    lines += quick_lines(config)
    lines += what_ran_section(config, record.get("model"), record.get("training"), record.get("embedding"))
    instructions = config.get("experiment", {}).get("mode") == "sft"  # the instruction path reports its own way
    if data:
        lines += generations.data_lines(data) if instructions else data_section(data)
    if metrics:
        lines += (
            generations.results_lines(run_dir, metrics, config) if instructions else results_section(metrics, config)
        )
    lines += figures_section(run_dir)
    if reproduction:
        lines += reproduction_section(reproduction)
    lines += timings_section(status)
    lines += environment_section(record.get("environment") or {})
    lines += artifacts_section(run_dir, record.get("tracking"))
    path = run_dir / "experiment_report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")  # a run killed while writing it keeps the previous one whole
    return path


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


def quick_lines(config: dict[str, Any]) -> list[str]:
    """A quick run (`qlora run --quick`) says so before anything else: its scores are not the recipe's."""
    if not config.get("experiment", {}).get("quick"):
        return []
    data, training = config.get("data", {}), config.get("training", {})
    steps = training.get("max_steps")
    return [
        f"> **Quick run** (`--quick`): at most {data.get('max_samples')} examples per dataset, "
        + (f"{steps} optimizer steps" if steps else f"{training.get('epochs')} epoch")
        + ", a small evaluation. It checks the recipe end to end on your data; its scores are not the "
        "recipe's result (run without --quick for that).",
        "",
    ]


def what_ran_section(
    config: dict[str, Any],
    model: dict[str, Any] | None,
    training: dict[str, Any] | None = None,
    embedding: dict[str, Any] | None = None,
) -> list[str]:
    if not config:
        return []
    exp, cfg_model, emb, clf = (config.get(k, {}) for k in ("experiment", "model", "embedding", "classifier"))
    sources = ", ".join(f"{s['name']} ({s['type']})" for s in config.get("data", {}).get("sources", []))
    rows = [
        ["mode", exp.get("mode", "")],
        ["seed", str(exp.get("seed", ""))],
        *([["quick run", "yes (--quick): small and fast, not the recipe's result"]] if exp.get("quick") else []),
        *([["models", models_text(exp)]] if exp.get("per_dataset") else []),
        ["data sources", sources],
        ["max samples per dataset", str(config.get("data", {}).get("max_samples"))],
        ["model", cfg_model.get("name_or_path", "")],
        ["quantization requested", cfg_model.get("quantization", "")],
    ]
    if cfg_model.get("trust_remote_code"):
        rows.append(["trust_remote_code", "**on**: Python code shipped with the model was allowed to run"])
    if model:
        rows += [
            ["quantization used", model["quantization"]],
            ["compute dtype", model["compute_dtype"]],
            ["device", model["device"]],
            ["model files", f"`{model['source']}`"],
        ]
        rows += [["note", note] for note in model.get("notes", [])]
        rows += load_report_rows(model.get("load_report") or {})
    if exp.get("mode") == "qlora":
        return ["## What ran", "", *table(["setting", "value"], rows + training_rows(config, training))]
    if exp.get("mode") == "sft":
        rows += training_rows(config, training) + generations.what_ran_rows(config, training)
        return ["## What ran", "", *table(["setting", "value"], rows)]
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


def load_report_rows(report: dict[str, list[str]]) -> list[list[str]]:
    """from_pretrained's missing, unexpected and mismatched keys (config.json has them all)."""
    names = {
        "missing": "weights not in the checkpoint (drawn fresh)",
        "mismatched": "weights of another shape in the checkpoint (drawn fresh)",
        "unexpected": "checkpoint weights left unused",
    }
    rows = []
    for key, what in names.items():
        found = report.get(key) or []
        if found:
            shown = ", ".join(f"`{k}`" for k in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            rows.append([what, f"{len(found)}: {shown}"])
    return rows


def models_text(exp: dict[str, Any]) -> str:
    """experiment.per_dataset: which models the run trained, and where they are."""
    own = "one per dataset (models/<dataset>/)"
    return f"pooled (models/all/) and {own}" if exp.get("pooled", True) else f"{own} only, no pooled model"


def schedule_text(training: dict[str, Any]) -> str:
    """`cosine, warmup 0.03` (a fraction of the steps) or `linear, warmup 100 steps`; runs before lr_scheduler
    existed trained with cosine."""
    steps = training.get("warmup_steps")
    warmup = f"warmup {steps} steps" if steps is not None else f"warmup {training.get('warmup_ratio')}"
    return f"{training.get('lr_scheduler', 'cosine')}, {warmup}"


def training_rows(config: dict[str, Any], training: dict[str, Any] | None) -> list[list[str]]:
    """The QLoRA recipe as configured, and what training measured (parameters, throughput, memory)."""
    t = config.get("training", {})
    rows = [
        [
            "LoRA",
            f"r {t.get('lora_r')}, alpha {t.get('lora_alpha')}, dropout {t.get('lora_dropout')} "
            f"on {t.get('target_modules')}",
        ],
        [
            "optimizer / learning rate",
            f"{t.get('optimizer')} / {t.get('learning_rate')} ({schedule_text(t)})",
        ],
        ["batch", batch_text(t, training)],
    ]
    if config.get("experiment", {}).get("mode") != "sft":  # the instruction path: the LM's own loss, no head
        rows += [
            ["loss / class weights", f"{t.get('loss')} / {t.get('class_weights')}"],
            ["head", str(t.get("head", "classification"))],
        ]
    if training:
        share = 100 * training["trainable_parameters"] / training["total_parameters"]
        rows += [
            [
                "trainable parameters",
                f"{training['trainable_parameters']:,} of {training['total_parameters']:,} ({share:.2f}%)",
            ],
            [
                "training",
                f"{training['optimizer_steps']} steps in {training['train_seconds']} s, "
                f"{training['samples_per_second']} samples/s; peak RSS {training['peak_rss_mb']} MB",
            ],
        ]
        rows += [["training note", note] for note in training.get("notes", [])]
    return rows


def batch_text(t: dict[str, Any], training: dict[str, Any] | None) -> str:
    """Per-process batch x accumulation, and x processes when trained data-parallel (torchrun)."""
    text = f"{t.get('batch_size')} x {t.get('gradient_accumulation_steps')} accumulation steps"
    if training and training.get("world_size", 1) > 1:
        world, effective = training["world_size"], training["effective_batch_size"]
        text += f" x {world} processes = {effective} per optimizer step (DDP)"
    return text


def embedding_rows(embedding: dict[str, Any]) -> list[list[str]]:
    rows = []
    splits = embedding.get("splits", {}).values()
    if splits:
        hits, total = sum(s["cache_hits"] for s in splits), sum(s["texts"] for s in splits)
        rows.append(["embedding cache", f"{hits} of {total} vectors reused" if embedding.get("cache") else "off"])
        if 0 < hits < total:  # see embeddings/cache.py: a vector depends on its batch-mates at float-rounding level
            rows.append(["note", "vectors partly cached by other runs: a cold-cache rerun may differ by ~1e-7"])
    if embedding.get("processes", 1) > 1:
        per_process = ", ".join(str(n) for n in embedding.get("computed_per_process", []))
        rows.append(["encoding processes", f"{embedding['processes']} (vectors computed by each: {per_process})"])
    fidelity = embedding.get("quantization_fidelity")
    if embedding.get("model_loaded") is False:  # absent in runs older than the key: say nothing
        also = " (and the fidelity sample's unquantized ones)" if fidelity and not fidelity.get("model_loaded") else ""
        rows.append(["model loading", f"skipped: every vector{also} was in the embedding cache"])
    if fidelity and fidelity.get("skipped"):
        rows.append(["quantization fidelity", f"skipped: {fidelity['skipped']}"])
    elif fidelity:
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
    sources = [
        [
            s["name"],
            f"`{s['origin']}`"
            + (f" ({s['encoding']}, {s['encoding_from']})" if s.get("encoding_from") in ENCODED else ""),
            str(s["rows_read"]),
            str(s.get("rows_label_dropped", 0)),
            str(s.get("rows_label_defaulted", 0)),
            ", ".join(f"{k} {v}" for k, v in (s.get("classes_read") or {}).items()),
        ]
        for s in data["sources"]
    ]
    removed = ", ".join(f"{k} {v}" for k, v in data["removed"].items() if v) or "none"
    length = data["text_length"]
    normalized = data.get("cross_split_overlap_normalized", "?")
    overlap = f"{data['cross_split_overlap']} exact, {normalized} after normalization"
    return [
        "## Data",
        "",
        *table(
            ["source", "origin", "rows read", "label not covered (dropped)", "given the default class", "classes read"],
            sources,
        ),
        f"{data['rows_read']} rows read, {data['rows_after_cleaning']} after cleaning, "
        f"{data['rows_after_sampling']} used. Removed: {removed}.",
        "",
        *table(["split", "dataset", *names, "total"], rows),
        f"Text length (characters): min {length['min']}, median {length['median']}, mean {length['mean']}, "
        f"p95 {length['p95']}, max {length['max']}. Texts in more than one split: {overlap}.",
        "",
        *balancing_lines(data.get("balancing")),
        f"Data fingerprint: `{data['fingerprint']}`",
        "",
    ]


def balancing_lines(balancing: dict[str, Any] | None) -> list[str]:
    if not balancing or balancing["method"] == "none":
        return ["Class balance: none applied (train keeps the class mix of the data).", ""]
    if balancing["method"] == "class_weights":
        weights = ", ".join(f"{k} {v:g}" for k, v in (balancing["class_weights"] or {}).items())
        return [f"Class balance: class weights over train (total / (classes x count)): {weights}.", ""]
    before = ", ".join(f"{k} {v}" for k, v in balancing["train_classes_before"].items())
    after = ", ".join(f"{k} {v}" for k, v in balancing["train_classes_after"].items())
    return [f"Class balance: train {balancing['method']}d per dataset, from {before} to {after}.", ""]


def results_section(metrics: dict[str, Any], config: dict[str, Any]) -> list[str]:
    primary = metrics["primary_head"]
    lines = ["## Results", "", "Bootstrap 95% confidence intervals in brackets where computed.", ""]
    for split, per_head in metrics["splits"].items():
        rows = [[head, *(metric_cell(m["overall"], k, with_ci=True) for k in HEADLINE)] for head, m in per_head.items()]
        for reference, label in REFERENCES:
            if reference in per_head and primary in per_head:
                ours, base = per_head[primary]["overall"], per_head[reference]["overall"]
                rows.append([f"Δ {primary} − {label}", *(delta(ours.get(k), base.get(k)) for k in HEADLINE)])
        lines += [f"### {split} (n = {next(iter(per_head.values()))['overall']['n']})", ""]
        lines += table(["head", *HEADLINE], rows)
        datasets = next(iter(per_head.values()))["per_dataset"]
        if len(datasets) > 1:
            rows = []
            for dataset in datasets:
                rows += [
                    [dataset, head, *(metric_cell(m["per_dataset"][dataset], k, with_ci=True) for k in HEADLINE)]
                    for head, m in per_head.items()
                ]
                for reference, label in REFERENCES:
                    if reference in per_head and primary in per_head:
                        ours, base = (per_head[h]["per_dataset"][dataset] for h in (primary, reference))
                        rows.append([dataset, f"Δ − {label}", *(delta(ours.get(k), base.get(k)) for k in HEADLINE)])
            lines += table(["dataset", "head", *HEADLINE], rows)
    if any(ZERO_SHOT in per_head for per_head in metrics["splits"].values()):
        lines += [
            f"`{ZERO_SHOT}` is the base model scoring the label words after the prompt before any training (argmax, "
            f"no threshold): the lift row is what fine-tuning added.",
            "",
        ]
    lines += pooled_vs_per_dataset_lines(metrics)
    lines += verdict_lines(metrics, config)
    return lines


def pooled_vs_per_dataset_lines(metrics: dict[str, Any]) -> list[str]:
    """experiment.per_dataset: each dataset's rows scored by the pooled model and by the dataset's own model."""
    pooled = metrics["primary_head"]
    own = per_dataset_head(pooled)
    splits = {split: heads for split, heads in metrics["splits"].items() if own in heads and pooled in heads}
    if not splits:
        return []
    shown = ("accuracy", "macro_f1", "roc_auc")
    rows = []
    for split, heads in splits.items():
        for dataset in heads[own]["per_dataset"]:
            a, b = heads[pooled]["per_dataset"][dataset], heads[own]["per_dataset"][dataset]
            rows.append([split, dataset, f"{a['n']}", *(f"{metric_cell(a, k)} → {metric_cell(b, k)}" for k in shown)])
            rows[-1] += [delta(b.get("macro_f1"), a.get("macro_f1"))]
    return [
        "### Pooled model vs one model per dataset",
        "",
        f"Each dataset's rows scored by the pooled model (`{pooled}`, trained on every dataset) → by the model "
        f"trained on that dataset alone (`{own}`, saved in models/<dataset>/).",
        "",
        *table(["split", "dataset", "n", *(f"{k}: pooled → own" for k in shown), "Δ macro_f1 (own − pooled)"], rows),
    ]


def figures_section(run_dir: Path) -> list[str]:
    """Links, relative to the report, to the dashboard, each split's summary and every figure."""
    lines = ["## Figures", ""]
    if (run_dir / "dashboard.html").is_file():
        lines += ["Interactive: [dashboard.html](dashboard.html) (self-contained, opens offline).", ""]
    for summary in sorted(run_dir.glob("*/*/evaluation_summary.md")):
        folder = summary.parent.relative_to(run_dir).as_posix()
        results = read_json(summary.parent / RESULTS_FILE, optional=True) or {}
        shown = f"{results['dataset']}/{results['split']}" if "dataset" in results and "split" in results else folder
        lines.append(f"### {shown}")
        lines += ["", f"Summary, per-class metrics, errors: [{folder}/{summary.name}]({folder}/{summary.name})", ""]
        lines += [f"![{p.stem}]({folder}/{p.name})" for p in sorted(summary.parent.glob("*.png"))] + [""]
    overview = sorted((run_dir / "figures").glob("*.png"))
    if overview:
        lines += ["### Across datasets", "", *(f"![{p.stem}](figures/{p.name})" for p in overview), ""]
    return lines if len(lines) > 2 else []


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
        f"On {split}, {primary} {ON_WHAT.get(primary, 'on the embeddings')} scores accuracy "
        f"{format_metric(ours['accuracy'])} and "
        f"ROC-AUC {format_metric(ours.get('roc_auc'))}; the TF-IDF character n-gram baseline on the same splits "
        f"scores {format_metric(base['accuracy'])} and {format_metric(base.get('roc_auc'))}. "
        + (
            f"The {WHAT.get(primary, 'embeddings')} beat the baseline."
            if (ours.get("roc_auc") or 0) > (base.get("roc_auc") or 0)
            else f"**The {WHAT.get(primary, 'embeddings')} do not beat the baseline.**"
        ),
        "",
    ]
    if str(config.get("model", {}).get("name_or_path", "")).startswith(BUILTIN_PREFIX):
        lines += [
            "The model is the package's built-in tiny Qwen3-architecture checkpoint with random weights: it "
            "carries next to no meaning, so near-chance scores are expected. This run proves the code paths "
            "(4-bit loading, "
            + ("LoRA training" if primary.startswith("qlora") else "encoding, heads")
            + ", evaluation), not the method; the baseline shows what the data itself supports. "
            "Point `model.name_or_path` at a real Qwen checkpoint for real results.",
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


def artifacts_section(run_dir: Path, tracking: dict[str, Any] | None = None) -> list[str]:
    files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
    files = [f for f in files if not f.startswith(".")] + ["experiment_report.md"]
    lines = ["## Artifacts", "", *(f"- [{f}]({f})" for f in sorted(set(files))), ""]
    if tracking and tracking.get("backend") == "mlflow":
        lines += [f"Also logged to MLflow: run `{tracking['run_id']}` in `{tracking['uri']}`.", ""]
    elif tracking:
        lines += [f"Also logged to TensorBoard: `{tracking['log_dir']}`.", ""]
    return lines

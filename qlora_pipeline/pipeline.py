"""The orchestrator: reads like the diagram. config → data → model → embeddings → heads → evaluate → report."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline.errors import UserError
from qlora_pipeline.report import write_report
from qlora_pipeline.runs import (
    Run,
    RunInterrupted,
    environment_info,
    now_iso,
    read_json,
    sigterm_interrupts,
    write_json,
)
from qlora_pipeline.tracking import flatten_config, open_tracker

if TYPE_CHECKING:
    from qlora_pipeline.config import Config
    from qlora_pipeline.data import PreparedData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    reproduction: dict[str, Any] | None


def run_experiment(
    config: Config,
    output_root: str | Path | None = None,
    reproduce_of: Path | None = None,
    resume: str | None = None,
) -> RunResult:
    """Run one experiment into a new run directory; the directory records failure as faithfully as success.
    `resume` (qlora mode): auto, none, or a run directory / checkpoint to continue (`checkpoints.resolve_resume`)."""
    from qlora_pipeline.classifiers import check_heads
    from qlora_pipeline.modeling import cpu_threads

    qlora = config.experiment.mode == "qlora"
    root = Path(output_root if output_root is not None else config.output.root)
    resume_from = None
    if not qlora:
        check_heads(config.classifier)  # before a run directory exists: a bad head option is a config error
        if resume not in (None, "none"):
            raise UserError("--resume applies to experiment.mode qlora (embedding runs have no checkpoints)")
    elif resume not in (None, "none"):
        from qlora_pipeline.checkpoints import resolve_resume

        resume_from = resolve_resume(resume, config, root)
    tracker = open_tracker(config.output, root, config.experiment.name)  # before a run directory exists
    run = Run.create(root)
    write_json(run.dir / "config.json", archive_record(config, run, reproduce_of))
    update_record(run, tracking=tracker.start(run.name, run.dir, flatten_config(config.to_dict())))
    try:
        with sigterm_interrupts(), cpu_threads(config.model.cpu_threads):
            if qlora:
                from qlora_pipeline.qlora_run import execute_qlora

                metrics = execute_qlora(config, run, resume_from)
            else:
                metrics = execute(config, run)
            reproduction = None
            if reproduce_of is not None:
                with run.stage("reproduce_check"):
                    from qlora_pipeline.reproduce import compare_runs

                    reproduction = compare_runs(reproduce_of, run.dir)
                    write_json(run.dir / "reproduction.json", reproduction)
            with run.stage("report"):
                run.state = "succeeded"
                write_report(run.dir, run.status())
    except (KeyboardInterrupt, RunInterrupted) as exc:
        run.finish("interrupted", exc)
        write_report(run.dir, run.status())
        tracker.finish(run.dir, run.status())
        raise
    except BaseException as exc:
        run.finish("failed", exc)
        write_report(run.dir, run.status())
        tracker.finish(run.dir, run.status())
        raise
    run.finish("succeeded")
    write_report(run.dir, run.status())  # again, now with the final state and every stage's timing
    tracker.finish(run.dir, run.status())
    return RunResult(run.dir, metrics, reproduction)


def execute(config: Config, run: Run) -> dict[str, Any]:
    import numpy as np

    from qlora_pipeline.classifiers import BASELINE, fit_baseline, fit_head, tune_threshold
    from qlora_pipeline.embeddings import embed_splits, quantization_fidelity
    from qlora_pipeline.evaluation import predictions_frame
    from qlora_pipeline.modeling import load_model

    seed = config.experiment.seed
    prepared = data_stage(config, run)
    splits = prepared.splits

    with run.stage("model"):
        loaded = load_model(config.model, task="encoder", seed=seed)
        update_record(run, model=model_record(loaded))

    with run.stage("embeddings"):
        tune = len(splits.label_names) == 2 and config.classifier.threshold_metric != "none"
        # The threshold is tuned on validation even when only test is evaluated.
        needed = list(dict.fromkeys(["train", *(["validation"] if tune else []), *config.evaluation.splits]))
        vectors, embedding_record = embed_splits({name: splits.get(name) for name in needed}, loaded, config.embedding)
        quantized, sample, dtype = loaded.quantization != "none", config.embedding.fidelity_sample, loaded.compute_dtype
        del loaded  # free the encoder before training heads
    if quantized and sample:
        with run.stage("quantization_fidelity"):
            picked = np.random.default_rng(seed).permutation(len(splits.train))[:sample]
            embedding_record["quantization_fidelity"] = quantization_fidelity(
                splits.train.iloc[picked], vectors["train"][picked], config.model, config.embedding, seed, dtype
            )
    update_record(run, embedding=embedding_record)

    with run.stage("classifiers"):
        labels = {name: splits.get(name)["label"].to_numpy() for name in needed}
        heads = [
            fit_head(name, vectors["train"], labels["train"], config.classifier, seed, prepared.class_weights)
            for name in config.classifier.heads
        ]
        if tune:
            for head in heads:
                positive = head.predict_proba(vectors["validation"])[:, 1]
                metric, target = config.classifier.threshold_metric, config.classifier.target_precision
                head.threshold = tune_threshold(labels["validation"], positive, metric, target)
                log.info("head %s: threshold %.4f tuned on validation", head.name, head.threshold)
        if config.classifier.baseline:
            heads.append(fit_baseline(baseline_texts(splits.train), labels["train"], seed))
        for head in heads:
            head.save(run.dir / "models" / "all")

    with run.stage("evaluation"):
        from qlora_pipeline.results import evaluate_split

        metrics: dict[str, Any] = {}
        for split in config.evaluation.splits:
            frame = splits.get(split)
            predictions = {}
            for head in heads:
                features = baseline_texts(frame) if head.name == BASELINE else vectors[split]
                proba = head.predict_proba(features)
                predictions[head.name] = predictions_frame(frame, proba, head.predict(proba), splits.label_names)
            label_names = list(splits.label_names)
            metrics[split] = evaluate_split(run.dir, split, predictions, label_names, config.evaluation, seed)
        write_json(run.dir / "metrics.json", {"primary_head": heads[0].name, "splits": metrics})

    with run.stage("visualize"):
        visualize_run(run.dir, config.evaluation.figures)
    return metrics


def data_stage(config: Config, run: Run) -> PreparedData:
    """Seed everything, then load, clean and split; data_summary.json and the fingerprint in config.json."""
    from qlora_pipeline.data import prepare_data

    seed_everything(config.experiment.seed)
    with run.stage("data"):
        prepared = prepare_data(config.data, config.experiment.seed)
        write_json(run.dir / "data_summary.json", prepared.summary)
        update_record(
            run, data={"fingerprint": prepared.summary["fingerprint"], "sources": prepared.summary["sources"]}
        )
    return prepared


def baseline_texts(frame: Any) -> list[str]:
    """What the TF-IDF baseline reads: the text, or for pair tasks both texts joined by a separator."""
    if "text_pair" not in frame:
        return list(frame["text"])
    return [f"{a} \u2016 {b}" for a, b in zip(frame["text"], frame["text_pair"], strict=True)]


def visualize_run(run_dir: Path, figures: bool) -> None:
    """Figures and dashboard (when enabled), then each split's evaluation_summary.md linking them."""
    from qlora_pipeline.results import write_summaries

    if figures:
        from qlora_pipeline.dashboard import write_dashboard
        from qlora_pipeline.visualize import plot_run

        plot_run(run_dir)
        write_dashboard(run_dir)
    write_summaries(run_dir)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def archive_record(config: Config, run: Run, reproduce_of: Path | None) -> dict[str, Any]:
    return {
        "run": run.name,
        "created_at": now_iso(),
        "seed": config.experiment.seed,
        "reproduce_of": str(reproduce_of) if reproduce_of else None,
        "config": config.to_dict(),
        "environment": environment_info(),
        "data": None,
        "model": None,
    }


def update_record(run: Run, **fields: Any) -> None:
    record = read_json(run.dir / "config.json")
    record.update(fields)
    write_json(run.dir / "config.json", record)


def model_record(loaded: Any) -> dict[str, Any]:
    return {
        "source": loaded.source,
        "revision": loaded.revision,
        "quantization": loaded.quantization,
        "compute_dtype": loaded.compute_dtype,
        "device": loaded.device,
        "notes": list(loaded.notes),
    }

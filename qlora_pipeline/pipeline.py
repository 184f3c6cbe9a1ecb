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
from qlora_pipeline.tracking import Tracker, flatten_config, open_tracker

if TYPE_CHECKING:
    from qlora_pipeline.config import Config
    from qlora_pipeline.data import PreparedData

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    reproduction: dict[str, Any] | None
    replica: bool = False  # a rank other than 0 under torchrun: it trained; rank 0 evaluated and wrote the run


def run_experiment(
    config: Config,
    output_root: str | Path | None = None,
    reproduce_of: Path | None = None,
    resume: str | None = None,
) -> RunResult:
    """Run one experiment into a new run directory; the directory records failure as faithfully as success.
    `resume` (qlora mode): auto, none, or a run directory / checkpoint to continue (`checkpoints.resolve_resume`).
    Under torchrun / accelerate launch every process calls this; rank 0 writes the run (see `distributed.py`)."""
    from qlora_pipeline import distributed

    if distributed.world_size() == 1:
        return _run_experiment(config, output_root, reproduce_of, resume)
    if config.experiment.mode != "qlora":
        raise UserError(
            f"experiment.mode {config.experiment.mode} runs in one process, but {distributed.world_size()} were "
            "launched (torchrun / accelerate launch); run it with plain `qlora run` (only qlora mode trains "
            "data-parallel)"
        )
    from qlora_pipeline.modeling import resolve_device
    from qlora_pipeline.tiny_model import resolve_model_path

    # Once a process group exists transformers' save_pretrained writes on rank 0 only: a built-in model is built
    # (by every rank at once, which is safe) before joining it.
    resolve_model_path(config.model.name_or_path)
    distributed.start(resolve_device(config.model))
    try:
        if distributed.is_replica():
            from qlora_pipeline.qlora_run import train_replica

            plan = distributed.share(None)
            if plan is None:
                raise UserError("rank 0 did not start the run (its error says why); this rank trained nothing")
            train_replica(config, Path(plan["run_dir"]), plan["resume"])
            return RunResult(Path(plan["run_dir"]), {}, None, replica=True)
        return _run_experiment(config, output_root, reproduce_of, resume)
    finally:
        distributed.stop()


def _run_experiment(
    config: Config, output_root: str | Path | None, reproduce_of: Path | None, resume: str | None
) -> RunResult:
    from qlora_pipeline import distributed
    from qlora_pipeline.modeling import cpu_threads

    qlora = config.experiment.mode == "qlora"
    root = Path(output_root if output_root is not None else config.output.root)
    try:
        run, tracker, resume_from = open_run(config, root, resume)
    except BaseException:
        distributed.share(None)  # the other ranks of a torchrun job wait for the run directory: there is none
        raise
    distributed.share({"run_dir": str(run.dir.resolve()), "resume": resume_from.name if resume_from else None})
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


def open_run(config: Config, root: Path, resume: str | None) -> tuple[Run, Tracker, Path | None]:
    """Check what can be checked before a run directory exists, then create it: (run, tracker, resume_from)."""
    from qlora_pipeline.classifiers import check_heads

    resume_from = None
    if config.experiment.mode != "qlora":
        check_heads(config.classifier)  # before a run directory exists: a bad head option is a config error
        if resume not in (None, "none"):
            raise UserError("--resume applies to experiment.mode qlora (embedding runs have no checkpoints)")
    elif resume not in (None, "none"):
        from qlora_pipeline.checkpoints import resolve_resume

        resume_from = resolve_resume(resume, config, root)
    tracker = open_tracker(config.output, root, config.experiment.name)  # before a run directory exists
    return Run.create(root), tracker, resume_from


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

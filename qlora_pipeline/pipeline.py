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

if TYPE_CHECKING:
    from qlora_pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    reproduction: dict[str, Any] | None


def run_experiment(
    config: Config, output_root: str | Path | None = None, reproduce_of: Path | None = None
) -> RunResult:
    """Run one experiment into a new run directory; the directory records failure as faithfully as success."""
    from qlora_pipeline.classifiers import check_heads

    if config.experiment.mode != "embeddings":
        raise UserError(
            f"experiment.mode '{config.experiment.mode}' is not available in this version; use 'embeddings'"
        )
    check_heads(config.classifier)
    run = Run.create(output_root if output_root is not None else config.output.root)
    write_json(run.dir / "config.json", archive_record(config, run, reproduce_of))
    try:
        with sigterm_interrupts():
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
        raise
    except BaseException as exc:
        run.finish("failed", exc)
        write_report(run.dir, run.status())
        raise
    run.finish("succeeded")
    write_report(run.dir, run.status())  # again, now with the final state and every stage's timing
    return RunResult(run.dir, metrics, reproduction)


def execute(config: Config, run: Run) -> dict[str, Any]:
    import numpy as np

    from qlora_pipeline.classifiers import fit_baseline, fit_head, tune_threshold
    from qlora_pipeline.data import prepare_data
    from qlora_pipeline.embeddings import embed_splits, quantization_fidelity
    from qlora_pipeline.evaluation import evaluate, predictions_frame
    from qlora_pipeline.modeling import load_model

    seed = config.experiment.seed
    seed_everything(seed)
    with run.stage("data"):
        prepared = prepare_data(config.data, seed)
        splits = prepared.splits
        write_json(run.dir / "data_summary.json", prepared.summary)
        update_record(
            run, data={"fingerprint": prepared.summary["fingerprint"], "sources": prepared.summary["sources"]}
        )

    with run.stage("model"):
        loaded = load_model(config.model, task="encoder", seed=seed)
        update_record(run, model=model_record(loaded))

    with run.stage("embeddings"):
        needed = ["train", *config.evaluation.splits]
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
            fit_head(name, vectors["train"], labels["train"], config.classifier, seed)
            for name in config.classifier.heads
        ]
        binary = len(splits.label_names) == 2
        if binary and config.classifier.threshold_metric != "none":
            for head in heads:
                positive = head.predict_proba(vectors["validation"])[:, 1]
                metric, target = config.classifier.threshold_metric, config.classifier.target_precision
                head.threshold = tune_threshold(labels["validation"], positive, metric, target)
                log.info("head %s: threshold %.4f tuned on validation", head.name, head.threshold)
        if config.classifier.baseline:
            heads.append(fit_baseline(splits.train["text"].tolist(), labels["train"], seed))
        for head in heads:
            head.save(run.dir / "models" / "all")

    with run.stage("evaluation"):
        metrics: dict[str, Any] = {}
        for split in config.evaluation.splits:
            frame = splits.get(split)
            metrics[split] = {}
            for head in heads:
                features = frame["text"].tolist() if head.name == "tfidf_logreg" else vectors[split]
                proba = head.predict_proba(features)
                predictions = predictions_frame(frame, proba, head.predict(proba), splits.label_names)
                metrics[split][head.name] = evaluate(predictions, splits.label_names)
                if head is heads[0] and config.evaluation.save_predictions:
                    save_predictions(run.dir, split, predictions)
            for dataset in sorted(frame["dataset"].unique()):
                folder = run.dir / dataset / split
                folder.mkdir(parents=True, exist_ok=True)
                per_head = {name: m["per_dataset"][dataset] for name, m in metrics[split].items()}
                write_json(folder / "evaluation_results.json", per_head)
        write_json(run.dir / "metrics.json", {"primary_head": heads[0].name, "splits": metrics})
    return metrics


def save_predictions(run_dir: Path, split: str, predictions: Any) -> None:
    for dataset, frame in predictions.groupby("dataset", sort=True):
        folder = run_dir / str(dataset) / split
        folder.mkdir(parents=True, exist_ok=True)
        frame.to_csv(folder / "predictions.csv", index=False)


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

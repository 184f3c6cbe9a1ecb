"""The QLoRA path of a run: data → model → training (checkpoints, resume, DDP) → calibration → save adapter →
evaluation (+ the TF-IDF baseline) → figures.

Evaluation goes through the same code as the embeddings path (`predictions_frame`, `evaluate_split`), with the
fine-tuned model as the primary head and the TF-IDF baseline beside it, so reports and comparisons read alike.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_pipeline import distributed
from qlora_pipeline.data.prepare import prepare_data
from qlora_pipeline.evaluation.baseline import baseline_texts, fit_baseline
from qlora_pipeline.evaluation.metrics import accuracy_macro_f1, format_metric, predictions_frame
from qlora_pipeline.evaluation.results import evaluate_split
from qlora_pipeline.evaluation.trained_head import tune_threshold
from qlora_pipeline.finetune import recipe
from qlora_pipeline.finetune.scoring import pair_column, predict_proba
from qlora_pipeline.runs import write_json
from qlora_pipeline.stages import data_stage, model_record, seed_everything, update_record, visualize_run
from qlora_pipeline.training import checkpoints
from qlora_pipeline.training.log import TRAINING_LOG, TRAINING_SUMMARY, write_training_log

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.config import Config
    from qlora_pipeline.runs import Run

log = logging.getLogger(__name__)

HEAD_NAME = "qlora"
DATA_PARALLEL = True  # under torchrun / accelerate launch: rank 0 runs `execute`, the other ranks `train_replica`


def preflight(config: Config, output_root: Path, resume: str | None) -> Path | None:
    """Before a run directory exists: the checkpoint `resume` names (auto, none, a run or a checkpoint), checked
    against this config (see `checkpoints.resolve_resume`)."""
    return checkpoints.resolve_resume(resume, config, output_root)


def execute(config: Config, run: Run, resume_from: Path | None = None) -> dict[str, Any]:
    """`resume_from`: a checkpoint of an interrupted run of this config (see `checkpoints.resolve_resume`)."""
    seed = config.experiment.seed
    prepared = data_stage(config, run)
    splits = prepared.splits
    label_names = list(splits.label_names)

    with run.stage("model"):
        tuned = recipe.setup(config, len(label_names), seed, label_names)
        update_record(run, model=model_record(tuned.loaded))

    with run.stage("training"):
        work_dir = run.dir / checkpoints.CHECKPOINTS_DIR
        if resume_from is not None:
            update_record(run, resumed_from=str(resume_from))
            tuned.notes.append(f"resumed from {resume_from} (its checkpoints copied into checkpoints/)")
            resume_from = checkpoints.adopt(resume_from, work_dir)
        # Under torchrun: the other ranks wait here until the checkpoints to resume from are copied.
        distributed.agree(prepared.summary["fingerprint"], "data fingerprint")
        marker = checkpoints.marker_callback(checkpoints.config_hash(config), run.name)
        validation = splits.get("validation")
        recipe.train(
            tuned,
            config,
            splits.train,
            validation,
            seed,
            work_dir,
            marker=marker,
            resume_from=resume_from,
            data_weights=prepared.class_weights,
        )
        write_training_log(tuned.log_history, run.dir / TRAINING_LOG)
        write_json(run.dir / TRAINING_SUMMARY, tuned.summary)
        update_record(run, training=tuned.summary)

    def score(frame: pd.DataFrame) -> np.ndarray:
        texts, train = frame["text"].tolist(), config.training
        pairs = pair_column(frame)
        return predict_proba(tuned.loaded, tuned.label_words, texts, train.max_length, train.batch_size, pairs)

    threshold, scored = None, {}  # scored: split -> probabilities, computed once for calibration and evaluation
    if len(label_names) == 2 and config.training.threshold_metric != "none":
        with run.stage("calibration"):
            scored = {name: score(splits.get(name)) for name in ("validation", "test")}
            threshold = calibrate(tuned, config, {name: (splits.get(name), p) for name, p in scored.items()})
            tuned.summary["threshold"] = threshold
            write_json(run.dir / TRAINING_SUMMARY, tuned.summary)
            update_record(run, training=tuned.summary)

    with run.stage("save"):
        recipe.save(tuned, run.dir / "models" / "all", label_names, threshold)

    with run.stage("evaluation"):
        baseline = fit_baseline(baseline_texts(splits.train), splits.train["label"].to_numpy(), seed)
        baseline.save(run.dir / "models" / "all")
        metrics: dict[str, Any] = {}
        for split in config.evaluation.splits:
            frame = splits.get(split)
            proba = scored[split] if split in scored else score(frame)
            base_proba = baseline.predict_proba(baseline_texts(frame))
            predicted = proba.argmax(axis=1) if threshold is None else (proba[:, 1] >= threshold["value"]).astype(int)
            predictions = {
                HEAD_NAME: predictions_frame(frame, proba, predicted, splits.label_names),
                baseline.name: predictions_frame(frame, base_proba, baseline.predict(base_proba), splits.label_names),
            }
            metrics[split] = evaluate_split(run.dir, split, predictions, label_names, config.evaluation, seed)
        summary: dict[str, Any] = {"primary_head": HEAD_NAME, "splits": metrics}
        if threshold is not None:
            summary["threshold_calibration"] = threshold  # the qlora head's predictions above use it
        write_json(run.dir / "metrics.json", summary)

    with run.stage("visualize"):
        visualize_run(run.dir, config.evaluation.figures)
    return metrics


def train_replica(config: Config, run_dir: Path, resume: str | None) -> None:
    """What a rank other than 0 does under torchrun: the data, model and training of `execute`, kept in
    step with rank 0 by DDP. It writes only what the Trainer writes per rank (its RNG state in each checkpoint
    of `run_dir`); rank 0 calibrates, evaluates and writes the run. `resume`: the checkpoint's folder name."""
    seed = config.experiment.seed
    seed_everything(seed)  # as `data_stage` does on rank 0
    prepared = prepare_data(config.data, seed)
    label_names = list(prepared.splits.label_names)
    tuned = recipe.setup(config, len(label_names), seed, label_names)  # lm_label's default words are the names
    distributed.agree(prepared.summary["fingerprint"], "data fingerprint")  # rank 0 has adopted `resume` by now
    work_dir = run_dir / checkpoints.CHECKPOINTS_DIR
    recipe.train(
        tuned,
        config,
        prepared.splits.train,
        prepared.splits.get("validation"),
        seed,
        work_dir,
        marker=checkpoints.marker_callback(checkpoints.config_hash(config), run_dir.name),
        resume_from=work_dir / resume if resume else None,
        data_weights=prepared.class_weights,
    )


def calibrate(tuned: Any, config: Config, scored: dict[str, tuple[pd.DataFrame, np.ndarray]]) -> dict[str, Any]:
    """Tune the P(positive) threshold on validation (`training.threshold_metric`); the same cut on the logit
    margin is log(t / (1 - t)). Before (argmax) and after, on validation and test, for metrics.json and the report."""
    train = config.training
    positives = {name: (frame["label"].to_numpy(), proba[:, 1]) for name, (frame, proba) in scored.items()}
    value = tune_threshold(*positives["validation"], train.threshold_metric)
    margin = float(np.log(value / (1 - value))) if 0 < value < 1 else float(np.sign(value - 0.5) * np.inf)
    record: dict[str, Any] = {"metric": train.threshold_metric, "value": value, "logit_margin": margin}
    for name, (labels, positive) in positives.items():
        record[name] = {
            "before": accuracy_macro_f1(labels, (positive >= 0.5).astype(int)),
            "after": accuracy_macro_f1(labels, (positive >= value).astype(int)),
        }
    change = ", ".join(
        f"{name} macro-F1 {format_metric(record[name]['before']['macro_f1'])} -> "
        f"{format_metric(record[name]['after']['macro_f1'])}"
        for name in scored
    )
    tuned.notes.append(
        f"threshold P(positive) >= {value:.4f} (logit margin {margin:.3f}) tuned for "
        f"{train.threshold_metric} on validation: {change}"
    )
    log.info(tuned.notes[-1])
    return record

"""The QLoRA path of a run: data → model → training (checkpoints, resume, DDP) → calibration → save adapter →
evaluation (+ the TF-IDF baseline) → figures.

Evaluation goes through the same code as the embeddings path (`predictions_frame`, `evaluate_split`), with the
fine-tuned model as the primary head and the TF-IDF baseline beside it, so reports and comparisons read alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_pipeline import distributed
from qlora_pipeline.data.prepare import prepare_data
from qlora_pipeline.errors import UserError
from qlora_pipeline.evaluation.baseline import baseline_texts, fit_baseline
from qlora_pipeline.evaluation.metrics import accuracy_macro_f1, format_metric, predictions_frame
from qlora_pipeline.evaluation.per_dataset import (
    ZERO_SHOT,
    Scores,
    check_dataset,
    empty_scores,
    fill,
    head_name,
    lift_record,
    ordered,
)
from qlora_pipeline.evaluation.results import evaluate_split
from qlora_pipeline.evaluation.trained_head import tune_threshold
from qlora_pipeline.finetune import recipe
from qlora_pipeline.finetune.scoring import pair_column, predict_proba
from qlora_pipeline.runs import write_json
from qlora_pipeline.stages import (
    data_stage,
    model_record,
    resume_checkpoints,
    seed_everything,
    update_record,
    visualize_run,
)
from qlora_pipeline.training import checkpoints
from qlora_pipeline.training.log import TRAINING_LOG, TRAINING_SUMMARY, write_training_log
from qlora_pipeline.training.trainer import check_early_stopping_metric

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.config import Config
    from qlora_pipeline.data.prepare import PreparedData
    from qlora_pipeline.runs import Run

log = logging.getLogger(__name__)

HEAD_NAME = "qlora"
DATA_PARALLEL = True  # under torchrun / accelerate launch: rank 0 runs `execute`, the other ranks `train_replica`


def preflight(config: Config, output_root: Path, resume: str | None) -> Path | None:
    """Before a run directory exists: the checkpoint `resume` names (auto, none, a run or a checkpoint), checked
    against this config (see `checkpoints.resolve_resume`)."""
    if config.experiment.per_dataset:
        check_per_dataset_launch(resume)
    return checkpoints.resolve_resume(resume, config, output_root)


def execute(config: Config, run: Run, resume_from: Path | None = None) -> dict[str, Any]:
    """`resume_from`: a checkpoint of an interrupted run of this config (see `checkpoints.resolve_resume`)."""
    seed = config.experiment.seed
    prepared = data_stage(config, run)
    splits = prepared.splits
    label_names = list(splits.label_names)
    if resume_from is not None:  # before the model loads: a checkpoint continues only on the data it trained on
        checkpoints.check_data(resume_from, prepared.summary["fingerprint"])
    check_early_stopping_metric(config.training, len(label_names), splits.get("validation")["label"].to_numpy())
    if not config.experiment.pooled:  # experiment.per_dataset alone: no pooled model
        return execute_per_dataset_only(config, run, prepared)

    with run.stage("model"):
        tuned = recipe.setup(config, len(label_names), seed, label_names)
        update_record(run, model=model_record(tuned.loaded))

    with run.stage("training"):
        fingerprint = prepared.summary["fingerprint"]
        work_dir, resume_from = resume_checkpoints(run, resume_from, tuned.notes, fingerprint)
        marker = checkpoints.marker_callback(checkpoints.config_hash(config), run.name, fingerprint)
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

    threshold, scored = None, {}  # scored: split -> probabilities, computed once for calibration and evaluation
    if len(label_names) == 2 and config.training.threshold_metric != "none":
        with run.stage("calibration"):
            scored = {name: score_frame(tuned, config, splits.get(name)) for name in ("validation", "test")}
            threshold = calibrate(tuned, config, {name: (splits.get(name), p) for name, p in scored.items()})
            tuned.summary["threshold"] = threshold
            write_json(run.dir / TRAINING_SUMMARY, tuned.summary)
            update_record(run, training=tuned.summary)

    with run.stage("save"):
        recipe.save(tuned, run.dir / "models" / "all", label_names, threshold)

    per_dataset: dict[str, Scores] = {}  # experiment.per_dataset: {qlora_per_dataset: scores}
    if config.experiment.per_dataset:
        per_dataset = train_per_dataset(config, run, prepared, zero_shot=False)

    def pooled(split: str, frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
        proba = scored[split] if split in scored else score_frame(tuned, config, frame)
        heads = {HEAD_NAME: predictions_frame(frame, proba, predicted_classes(proba, threshold), splits.label_names)}
        if tuned.label_words is not None:  # lm_label: the base model's label-word scores, before any training
            zero = zero_shot_proba(tuned, config, frame)
            heads[ZERO_SHOT] = predictions_frame(frame, zero, zero.argmax(axis=1), splits.label_names)
        return heads

    with run.stage("evaluation"):
        metrics = evaluate_run(config, run, prepared, pooled, per_dataset, HEAD_NAME, threshold)

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
        marker=checkpoints.marker_callback(
            checkpoints.config_hash(config), run_dir.name, prepared.summary["fingerprint"]
        ),
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


def evaluate_run(
    config: Config,
    run: Run,
    prepared: PreparedData,
    pooled: Callable[[str, pd.DataFrame], dict[str, pd.DataFrame]] | None,
    per_dataset: dict[str, Scores],
    primary: str,
    threshold: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every evaluation split scored by the pooled model's heads (`pooled(split, frame)`; None: no pooled model), the
    per-dataset adapters and the TF-IDF baseline (fitted and saved here), in `ordered`'s order; metrics.json with
    `primary` as the primary head and the calibrated `threshold` the pooled head used."""
    splits, seed = prepared.splits, config.experiment.seed
    baseline = fit_baseline(baseline_texts(splits.train), splits.train["label"].to_numpy(), seed)
    baseline.save(run.dir / "models" / "all")
    metrics: dict[str, Any] = {}
    for split in config.evaluation.splits:
        frame = splits.get(split)
        heads = pooled(split, frame) if pooled is not None else {}
        base_proba = baseline.predict_proba(baseline_texts(frame))
        heads[baseline.name] = predictions_frame(frame, base_proba, baseline.predict(base_proba), splits.label_names)
        own = {
            name: predictions_frame(frame, *scores[split], splits.label_names) for name, scores in per_dataset.items()
        }
        predictions = ordered(heads, own, first_pooled=pooled is not None)
        metrics[split] = evaluate_split(run.dir, split, predictions, list(splits.label_names), config.evaluation, seed)
    summary: dict[str, Any] = {"primary_head": primary, "splits": metrics}
    if threshold is not None:
        summary["threshold_calibration"] = threshold  # the pooled head's predictions above use it
    summary.update(lift_record(metrics, primary))
    write_json(run.dir / "metrics.json", summary)
    return metrics


def predicted_classes(proba: np.ndarray, threshold: dict[str, Any] | None) -> np.ndarray:
    """The predicted classes: P(positive) at or above the calibrated threshold (`calibrate`), else the argmax."""
    return proba.argmax(axis=1) if threshold is None else (proba[:, 1] >= threshold["value"]).astype(int)


# ---- the zero-shot baseline (lm_label) and one model per dataset (experiment.per_dataset) --------------------


def zero_shot_proba(tuned: Any, config: Config, frame: pd.DataFrame) -> np.ndarray:
    """The base model's label-word probabilities, the adapter switched off (peft's `disable_adapter`): what the
    prompt and label words score before any training, on the same rows and prompt as the tuned model."""
    with tuned.loaded.model.disable_adapter():
        return score_frame(tuned, config, frame)


def score_frame(tuned: Any, config: Config, frame: pd.DataFrame) -> np.ndarray:
    """Class probabilities of `frame`'s texts (or pairs) by a set-up or trained model, as `execute` scores them."""
    texts, train = frame["text"].tolist(), config.training
    return predict_proba(tuned.loaded, tuned.label_words, texts, train.max_length, train.batch_size, pair_column(frame))


def check_per_dataset_launch(resume: str | None) -> None:
    """Per-dataset adapters train one after another in one process, from scratch."""
    if distributed.world_size() > 1:
        raise UserError(
            "experiment.per_dataset trains in one process, but several were launched (torchrun / accelerate "
            "launch); run it with plain `qlora run`, or set experiment.per_dataset: false to train data-parallel"
        )
    if resume not in (None, "none"):
        raise UserError(
            "--resume does not apply to experiment.per_dataset runs (their per-dataset adapters are not resumed); "
            "start a new run"
        )


def train_per_dataset(config: Config, run: Run, prepared: PreparedData, zero_shot: bool) -> dict[str, Scores]:
    """One adapter per dataset, one after another: trained on that dataset's train rows (checkpoints in
    checkpoints/<dataset>/, its training log and summary in <dataset>/), its threshold tuned on its validation rows,
    saved in models/<dataset>/ where `qlora predict --dataset` finds it. Returns {qlora_per_dataset: scores}, each
    dataset's rows of every evaluation split scored by its own adapter; with `zero_shot` (lm_label without a pooled
    model) also {zero_shot: scores} of the base model."""
    import gc

    from qlora_pipeline.data.balance import class_weights

    splits, seed = prepared.splits, config.experiment.seed
    label_names = list(splits.label_names)
    tune = len(label_names) == 2 and config.training.threshold_metric != "none"
    wanted = list(config.evaluation.splits)
    scores = {head_name(HEAD_NAME): empty_scores(splits, wanted)}
    if zero_shot:
        scores[ZERO_SHOT] = empty_scores(splits, wanted)
    records: dict[str, Any] = {}
    for dataset in (source.name for source in config.data.sources):
        own = splits.of_dataset(dataset)
        check_dataset(own, dataset, tune)
        with run.stage(f"per_dataset_{dataset}"):
            tuned = recipe.setup(config, len(label_names), seed, label_names)
            weights = class_weights(own.train["label"], len(label_names)) if prepared.class_weights else None
            marker = checkpoints.marker_callback(checkpoints.config_hash(config), run.name)
            work_dir = run.dir / checkpoints.CHECKPOINTS_DIR / dataset
            recipe.train(tuned, config, own.train, own.validation, seed, work_dir, marker=marker, data_weights=weights)
            needed = dict.fromkeys([*(["validation"] if tune else []), *wanted])
            scored = {name: score_frame(tuned, config, own.get(name)) for name in needed}
            threshold = None
            if tune:
                threshold = calibrate(tuned, config, {name: (own.get(name), proba) for name, proba in scored.items()})
                tuned.summary["threshold"] = threshold
            recipe.save(tuned, run.dir / "models" / dataset, label_names, threshold)
            (run.dir / dataset).mkdir(exist_ok=True)
            write_training_log(tuned.log_history, run.dir / dataset / TRAINING_LOG)
            write_json(run.dir / dataset / TRAINING_SUMMARY, tuned.summary)
            records[dataset] = {"train_rows": len(own.train), **tuned.summary}
            for split in wanted:
                proba = scored[split]
                predicted = predicted_classes(proba, threshold)
                fill(scores[head_name(HEAD_NAME)], split, splits.get(split), dataset, proba, predicted)
                if zero_shot and tuned.label_words is not None:
                    zero = zero_shot_proba(tuned, config, own.get(split))
                    fill(scores[ZERO_SHOT], split, splits.get(split), dataset, zero, zero.argmax(axis=1))
            del tuned
            gc.collect()
    update_record(run, per_dataset={"datasets": records})
    return scores


def execute_per_dataset_only(config: Config, run: Run, prepared: PreparedData) -> dict[str, Any]:
    """experiment.pooled false: the per-dataset adapters alone (the primary head), the zero-shot scores of lm_label
    runs and the TF-IDF baseline beside them, evaluated as `execute` evaluates the pooled model."""
    per_dataset = train_per_dataset(config, run, prepared, zero_shot=config.training.head == "lm_label")
    with run.stage("evaluation"):
        metrics = evaluate_run(config, run, prepared, None, per_dataset, head_name(HEAD_NAME))
    with run.stage("visualize"):
        visualize_run(run.dir, config.evaluation.figures)
    return metrics

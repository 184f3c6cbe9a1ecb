"""The embeddings path of a run: data → model → embeddings (cached) → quantization fidelity → classifier heads
(+ the TF-IDF baseline) → evaluation → figures. Every head's predictions are evaluated the same way; the first
head in `classifier.heads` is the primary one that reports, comparisons and `qlora predict` use."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_pipeline.embeddings.classifiers import check_heads, fit_head
from qlora_pipeline.embeddings.encoding import embed_splits, quantization_fidelity
from qlora_pipeline.errors import UserError
from qlora_pipeline.evaluation.baseline import BASELINE, baseline_texts, fit_baseline
from qlora_pipeline.evaluation.metrics import predictions_frame
from qlora_pipeline.evaluation.per_dataset import Scores, check_dataset, empty_scores, fill, head_name, ordered
from qlora_pipeline.evaluation.results import evaluate_split
from qlora_pipeline.evaluation.trained_head import tune_threshold
from qlora_pipeline.models.loading import load_model
from qlora_pipeline.runs import write_json
from qlora_pipeline.stages import data_stage, model_record, update_record, visualize_run

if TYPE_CHECKING:
    from qlora_pipeline.config import Config
    from qlora_pipeline.data.split import Splits
    from qlora_pipeline.runs import Run

log = logging.getLogger(__name__)

DATA_PARALLEL = False  # one process: a launch of several (torchrun) is refused


def preflight(config: Config, output_root: Path, resume: str | None) -> Path | None:
    """Checks before a run directory exists: the heads and their options. Nothing to resume."""
    check_heads(config.classifier)
    if resume not in (None, "none"):
        raise UserError("--resume applies to experiment.mode qlora (embedding runs have no checkpoints)")
    return None


def execute(config: Config, run: Run, resume_from: Path | None = None) -> dict[str, Any]:
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
            for name in (config.classifier.heads if config.experiment.pooled else [])  # pooled false: per dataset only
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

    per_dataset = {}  # experiment.per_dataset: {head_per_dataset: scores}, see `fit_per_dataset`
    if config.experiment.per_dataset:
        with run.stage("per_dataset"):
            per_dataset = fit_per_dataset(config, run, splits, vectors, prepared.class_weights is not None)

    with run.stage("evaluation"):
        metrics: dict[str, Any] = {}
        for split in config.evaluation.splits:
            frame = splits.get(split)
            predictions = {}
            for head in heads:
                features = baseline_texts(frame) if head.name == BASELINE else vectors[split]
                proba = head.predict_proba(features)
                predictions[head.name] = predictions_frame(frame, proba, head.predict(proba), splits.label_names)
            own = {
                name: predictions_frame(frame, *scores[split], splits.label_names)
                for name, scores in per_dataset.items()
            }
            predictions = ordered(predictions, own, config.experiment.pooled)
            label_names = list(splits.label_names)
            metrics[split] = evaluate_split(run.dir, split, predictions, label_names, config.evaluation, seed)
        write_json(run.dir / "metrics.json", {"primary_head": next(iter(predictions)), "splits": metrics})

    with run.stage("visualize"):
        visualize_run(run.dir, config.evaluation.figures)
    return metrics


# ---- one model per dataset (experiment.per_dataset) ------------------------------------------------------------


def fit_per_dataset(
    config: Config, run: Run, splits: Splits, vectors: dict[str, np.ndarray], weighted: bool
) -> dict[str, Scores]:
    """Every classifier head fitted again on each dataset's train rows alone (its threshold tuned on that
    dataset's validation rows; `weighted`: data.balance class weights, from that dataset's train rows) and saved in
    models/<dataset>/, where `qlora predict --dataset` finds it. Returns {<head>_per_dataset: scores}, each dataset's
    rows of every evaluation split scored by its own model."""
    from qlora_pipeline.data.balance import class_weights

    seed, classes = config.experiment.seed, len(splits.label_names)
    tune = classes == 2 and config.classifier.threshold_metric != "none"
    wanted = list(config.evaluation.splits)
    scores = {head_name(name): empty_scores(splits, wanted) for name in config.classifier.heads}
    for dataset in (source.name for source in config.data.sources):
        own = splits.of_dataset(dataset)
        check_dataset(own, dataset, tune)
        rows = {name: (splits.get(name)["dataset"] == dataset).to_numpy() for name in vectors}
        labels = {name: own.get(name)["label"].to_numpy() for name in ("train", "validation")}
        weights = class_weights(own.train["label"], classes) if weighted else None
        for name in config.classifier.heads:
            head = fit_head(name, vectors["train"][rows["train"]], labels["train"], config.classifier, seed, weights)
            if tune:
                positive = head.predict_proba(vectors["validation"][rows["validation"]])[:, 1]
                metric, target = config.classifier.threshold_metric, config.classifier.target_precision
                head.threshold = tune_threshold(labels["validation"], positive, metric, target)
            head.save(run.dir / "models" / dataset)
            for split in wanted:
                proba = head.predict_proba(vectors[split][rows[split]])
                fill(scores[head_name(name)], split, splits.get(split), dataset, proba, head.predict(proba))
        log.info("per-dataset heads of %s: %d train rows, saved in models/%s", dataset, len(own.train), dataset)
    return scores

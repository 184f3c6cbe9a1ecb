"""The embeddings path of a run: data → model → embeddings (cached) → quantization fidelity → classifier heads
(+ the TF-IDF baseline) → evaluation → figures. Every head's predictions are evaluated the same way; the first
head in `classifier.heads` is the primary one that reports, comparisons and `qlora predict` use.

The model is loaded only when some vector is missing from the cache: a warm rerun reads every vector and
never loads it (config.json's model record and the report say so).

Under torchrun / accelerate launch (one process per GPU, or gloo on CPUs), every process prepares the same data
(checked by fingerprint), rank 0 asks the cache what is missing and sends that list to all, and each process
computes every N-th batch of it into the shared cache (`encoding.fill_cache`). After a barrier rank 0 reads
every vector back, computes whatever is still missing, and goes on alone: fidelity, heads, evaluation, report.
The batches are those one process would form, so the vectors, and the run's results, equal a one-process run's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_pipeline import distributed
from qlora_pipeline.data.prepare import prepare_data
from qlora_pipeline.embeddings.classifiers import check_heads, fit_head
from qlora_pipeline.embeddings.encoding import (
    Encoder,
    SplitPlan,
    Tally,
    check_max_length,
    embed_splits,
    fill_cache,
    plan_splits,
    quantization_fidelity,
    split_texts,
)
from qlora_pipeline.errors import UserError
from qlora_pipeline.evaluation.baseline import BASELINE, baseline_texts, fit_baseline
from qlora_pipeline.evaluation.metrics import predictions_frame
from qlora_pipeline.evaluation.per_dataset import Scores, check_dataset, empty_scores, fill, head_name, ordered
from qlora_pipeline.evaluation.results import evaluate_split
from qlora_pipeline.evaluation.trained_head import TrainedHead, tune_threshold
from qlora_pipeline.runs import write_json
from qlora_pipeline.stages import (
    data_stage,
    identity_record,
    model_record,
    seed_everything,
    update_record,
    visualize_run,
)

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.config import ClassifierConfig, Config
    from qlora_pipeline.data.split import Splits
    from qlora_pipeline.runs import Run

log = logging.getLogger(__name__)

DATA_PARALLEL = True  # under torchrun: rank 0 runs `execute`, the other ranks `train_replica` (they encode)


def preflight(config: Config, output_root: Path, resume: str | None) -> Path | None:
    """Checks before a run directory exists: the heads and their options; under a launcher, what the processes
    need to share their vectors. Nothing to resume."""
    check_heads(config.classifier)
    if resume not in (None, "none"):
        raise UserError("--resume applies to the training modes qlora and sft (embedding runs have no checkpoints)")
    processes = distributed.world_size()
    if processes > 1:
        if not config.embedding.cache:
            raise UserError(
                f"embedding.cache is false, but {processes} processes were launched: they hand their vectors to "
                "rank 0 through the cache; set embedding.cache true, or run in one process"
            )
        local = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
        if local != processes:
            raise UserError(
                f"{processes} processes on several machines ({local} on this one): embedding runs share vectors "
                "through the cache on one machine (its index is SQLite in WAL mode); launch one machine's GPUs "
                "(torchrun --nproc_per_node N)"
            )
    return None


def needed_splits(config: Config, splits: Splits) -> tuple[dict[str, pd.DataFrame], bool]:
    """The splits to encode (train, validation when a threshold is tuned on it, the evaluated ones), and whether
    a threshold is tuned."""
    tune = len(splits.label_names) == 2 and config.classifier.threshold_metric != "none"
    # The threshold is tuned on validation even when only test is evaluated.
    needed = list(dict.fromkeys(["train", *(["validation"] if tune else []), *config.evaluation.splits]))
    return {name: splits.get(name) for name in needed}, tune


def execute(config: Config, run: Run, resume_from: Path | None = None) -> dict[str, Any]:
    seed = config.experiment.seed
    prepared = data_stage(config, run)
    splits = prepared.splits
    frames, tune = needed_splits(config, splits)
    processes = distributed.world_size()
    distributed.agree(prepared.summary["fingerprint"], "data fingerprint")

    with run.stage("model"):  # what the cache holds decides whether the model is loaded at all
        encoder = Encoder(config.model, config.embedding, seed)
        check_max_length(encoder, config.embedding)
        plan = plan_splits(frames, encoder)
        if processes == 1 and not plan.complete:
            encoder.model()
        update_record(run, model=encoder_record(encoder))

    with run.stage("embeddings"):
        shares = encode_shares(frames, encoder, config, distributed.share(plan.todo)) if processes > 1 else None
        vectors, embedding_record = embed_splits(frames, encoder, config.embedding, plan if shares is None else None)
        if shares is not None:
            record_shares(embedding_record, frames, plan, shares)
            update_record(run, model=encoder_record(encoder))
        quantized, compute_dtype = encoder.identity.quantization != "none", encoder.identity.compute_dtype
        encoder.release()  # free the encoder before training heads
    sample = config.embedding.fidelity_sample
    if quantized and sample:
        with run.stage("quantization_fidelity"):
            picked = np.random.default_rng(seed).permutation(len(splits.train))[:sample]
            embedding_record["quantization_fidelity"] = quantization_fidelity(
                splits.train.iloc[picked], vectors["train"][picked], config.model, config.embedding, seed, compute_dtype
            )
    update_record(run, embedding=embedding_record)

    with run.stage("classifiers"):
        labels = {name: frame["label"].to_numpy() for name, frame in frames.items()}
        heads = [
            fit_head(name, vectors["train"], labels["train"], config.classifier, seed, prepared.class_weights)
            for name in (config.classifier.heads if config.experiment.pooled else [])  # pooled false: per dataset only
        ]
        if tune:
            for head in heads:
                tune_head(head, vectors["validation"], labels["validation"], config.classifier)
                log.info("head %s: threshold %.4f tuned on validation", head.name, head.threshold)
        if config.classifier.baseline:
            heads.append(fit_baseline(baseline_texts(splits.train), labels["train"], seed))
        for head in heads:
            head.save(run.dir / "models" / "all")

    per_dataset = {}  # experiment.per_dataset: {head_per_dataset: scores}, see `fit_per_dataset`
    if config.experiment.per_dataset:
        with run.stage("per_dataset"):
            per_dataset = fit_per_dataset(config, run, splits, vectors, prepared.class_weights is not None, tune)

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


def train_replica(config: Config, run_dir: Path, resume: str | None) -> None:
    """What a rank other than 0 does under torchrun (the orchestrator's hook for every path; nothing is trained
    here): prepare the same data, compute this process's share of the missing vectors into the shared cache,
    and leave. Rank 0 reads them back and writes the run. `run_dir` and `resume` are not used."""
    seed = config.experiment.seed
    seed_everything(seed)  # as `data_stage` does on rank 0
    prepared = prepare_data(config.data, seed)
    frames, _ = needed_splits(config, prepared.splits)
    distributed.agree(prepared.summary["fingerprint"], "data fingerprint")
    encoder = Encoder(config.model, config.embedding, seed)
    encode_shares(frames, encoder, config, distributed.share(None))


def encode_shares(
    frames: dict[str, pd.DataFrame], encoder: Encoder, config: Config, todo: dict[str, list[int]]
) -> list[dict[str, Tally]]:
    """Every process: its share of each split's missing vectors (`todo`, rank 0's list), into the cache; then a
    barrier, so that rank 0 finds them all. Returns, for every rank, what it did per split."""
    assert encoder.cache is not None  # preflight refuses a launch without the cache
    rank, processes = distributed.rank(), distributed.world_size()
    done = {}
    for name, frame in frames.items():
        texts, pairs = split_texts(frame)
        cfg, cache = config.embedding, encoder.cache
        done[name] = fill_cache(
            texts, encoder.model, cfg, cache, todo[name], pairs=pairs, rank=rank, processes=processes
        )
    return distributed.gather(done)  # also a barrier: every share is in the cache


def record_shares(
    record: dict[str, Any], frames: dict[str, pd.DataFrame], plan: SplitPlan, shares: list[dict[str, Tally]]
) -> None:
    """Rank 0's record of a multi-process encode: hits as its first lookup found them, the time of the slowest
    process (plus reading back), tokens and vectors of all processes."""
    for name, frame in frames.items():
        hits = plan.hits[name]
        split = record["splits"][name]
        real, padded = (sum(getattr(share[name], f) for share in shares) for f in ("real_tokens", "padded_tokens"))
        split.update(
            cache_hits=hits,
            computed=len(frame) - hits,
            seconds=round(split["seconds"] + max(share[name].seconds for share in shares), 3),
            real_to_padded_tokens=round(real / max(padded, 1), 4),
        )
    record["processes"] = len(shares)
    record["computed_per_process"] = [sum(tally.computed for tally in share.values()) for share in shares]


def tune_head(head: TrainedHead, features: np.ndarray, labels: np.ndarray, cfg: ClassifierConfig) -> None:
    """Set a binary head's decision threshold, tuned on validation vectors and labels."""
    positive = head.predict_proba(features)[:, 1]
    head.threshold = tune_threshold(labels, positive, cfg.threshold_metric, cfg.target_precision)


def encoder_record(encoder: Encoder) -> dict[str, Any]:
    """config.json's model record: what was loaded, or, when nothing had to be computed, what would have been."""
    if encoder.loaded:
        return model_record(encoder.model())
    return {
        **identity_record(encoder.identity),
        "loaded": False,  # every vector this run needs was in the embedding cache
    }


# ---- one model per dataset (experiment.per_dataset) ------------------------------------------------------------


def fit_per_dataset(
    config: Config, run: Run, splits: Splits, vectors: dict[str, np.ndarray], weighted: bool, tune: bool
) -> dict[str, Scores]:
    """Every classifier head fitted again on each dataset's train rows alone (with `tune`, as `needed_splits`
    decided it, its threshold tuned on that dataset's validation rows; `weighted`: data.balance class weights, from
    that dataset's train rows) and saved in models/<dataset>/, where `qlora predict --dataset` finds it. Returns
    {<head>_per_dataset: scores}, each dataset's rows of every evaluation split scored by its own model."""
    from qlora_pipeline.data.balance import class_weights

    seed, classes = config.experiment.seed, len(splits.label_names)
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
                tune_head(head, vectors["validation"][rows["validation"]], labels["validation"], config.classifier)
            head.save(run.dir / "models" / dataset)
            for split in wanted:
                proba = head.predict_proba(vectors[split][rows[split]])
                fill(scores[head_name(name)], split, splits.get(split), dataset, proba, head.predict(proba))
        log.info("per-dataset heads of %s: %d train rows, saved in models/%s", dataset, len(own.train), dataset)
    return scores

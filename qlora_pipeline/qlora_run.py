"""The qlora path of the pipeline: data → model → train → evaluate → save adapter → figures.

Evaluation goes through the same code as the embeddings path (`predictions_frame`, `evaluate_split`), with the
fine-tuned model as the primary head and the TF-IDF baseline beside it, so reports and comparisons read alike.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline.runs import write_json

if TYPE_CHECKING:
    from qlora_pipeline.config import Config
    from qlora_pipeline.runs import Run

log = logging.getLogger(__name__)

HEAD_NAME = "qlora"
TRAINING_LOG = "training_log.csv"
TRAINING_SUMMARY = "training_summary.json"


def execute_qlora(config: Config, run: Run) -> dict[str, Any]:
    from qlora_pipeline import finetune
    from qlora_pipeline.classifiers import fit_baseline
    from qlora_pipeline.data import prepare_data
    from qlora_pipeline.evaluation import predictions_frame
    from qlora_pipeline.pipeline import model_record, seed_everything, update_record, visualize_run
    from qlora_pipeline.results import evaluate_split

    seed = config.experiment.seed
    seed_everything(seed)
    with run.stage("data"):
        prepared = prepare_data(config.data, seed)
        splits = prepared.splits
        label_names = list(splits.label_names)
        write_json(run.dir / "data_summary.json", prepared.summary)
        update_record(
            run, data={"fingerprint": prepared.summary["fingerprint"], "sources": prepared.summary["sources"]}
        )

    with run.stage("model"):
        tuned = finetune.setup(config, len(label_names), seed)
        update_record(run, model=model_record(tuned.loaded))

    with run.stage("training"):
        with tempfile.TemporaryDirectory(prefix="trainer-") as work_dir:  # Trainer wants a folder; nothing is kept
            finetune.train(tuned, config, splits.train, splits.get("validation"), seed, Path(work_dir))
        write_training_log(tuned.log_history, run.dir / TRAINING_LOG)
        write_json(run.dir / TRAINING_SUMMARY, tuned.summary)
        update_record(run, training=tuned.summary)

    with run.stage("save"):
        finetune.save(tuned, run.dir / "models" / "all", label_names)

    with run.stage("evaluation"):
        baseline = fit_baseline(splits.train["text"].tolist(), splits.train["label"].to_numpy(), seed)
        baseline.save(run.dir / "models" / "all")
        metrics: dict[str, Any] = {}
        for split in config.evaluation.splits:
            frame = splits.get(split)
            texts = frame["text"].tolist()
            proba = finetune.predict_proba(tuned.loaded, texts, config.training.max_length, config.training.batch_size)
            base_proba = baseline.predict_proba(texts)
            predictions = {
                HEAD_NAME: predictions_frame(frame, proba, proba.argmax(axis=1), splits.label_names),
                baseline.name: predictions_frame(frame, base_proba, baseline.predict(base_proba), splits.label_names),
            }
            metrics[split] = evaluate_split(run.dir, split, predictions, label_names, config.evaluation, seed)
        write_json(run.dir / "metrics.json", {"primary_head": HEAD_NAME, "splits": metrics})

    with run.stage("visualize"):
        visualize_run(run.dir, config.evaluation.figures)
    return metrics


def write_training_log(rows: list[dict[str, Any]], path: Path) -> Path:
    """One row per logged step: step, epoch, loss, learning_rate, grad_norm, eval_* (blank where not logged)."""
    columns: list[str] = ["step"]
    for row in rows:
        columns += [key for key in row if key not in columns and isinstance(row[key], (int, float))]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path

"""The instruction path of a run: data → model → training (checkpoints, resume, DDP) → save adapter → evaluation
(loss, generations, reference scores, with and without the adapter) → figures.

The recipe's shared pieces (LoRA, Trainer settings, checkpoints, resume) live in `training/`, as for the QLoRA
classifier (`finetune/`); what is this path's own: instruction data (`data/instructions.py`), prompts and answer-only
examples (`prompts.py`), generation (`generation.py`) and its evaluation (`evaluate.py`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline import distributed
from qlora_pipeline.data.instructions import InstructionData, prepare_instructions
from qlora_pipeline.runs import write_json
from qlora_pipeline.sft import recipe
from qlora_pipeline.sft.evaluate import evaluate
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

if TYPE_CHECKING:
    from qlora_pipeline.config import Config
    from qlora_pipeline.runs import Run

log = logging.getLogger(__name__)

DATA_PARALLEL = True  # under torchrun / accelerate launch: rank 0 runs `execute`, the other ranks `train_replica`


def preflight(config: Config, output_root: Path, resume: str | None) -> Path | None:
    """Before a run directory exists: the checkpoint `resume` names (auto, none, a run or a checkpoint), checked
    against this config (see `checkpoints.resolve_resume`)."""
    return checkpoints.resolve_resume(resume, config, output_root)


def execute(config: Config, run: Run, resume_from: Path | None = None) -> dict[str, Any]:
    """`resume_from`: a checkpoint of an interrupted run of this config (see `checkpoints.resolve_resume`)."""
    seed = config.experiment.seed
    data = data_stage(config, run, lambda: prepare_instructions(config.data, config.sft, seed))
    fingerprint = data.summary["fingerprint"]
    if resume_from is not None:  # before the model loads: a checkpoint continues only on the data it trained on
        checkpoints.check_data(resume_from, fingerprint)

    with run.stage("model"):
        tuned = recipe.setup(config, seed)
        update_record(run, model=model_record(tuned.loaded), prompt_format=tuned.prompt.to_dict())

    with run.stage("training"):
        work_dir, resume_from = resume_checkpoints(run, resume_from, tuned.notes, fingerprint)
        train_rows, validation_rows, truncation = encode(tuned, config, data)
        recipe.train(
            tuned,
            config,
            train_rows,
            validation_rows,
            seed,
            work_dir,
            marker=checkpoints.marker_callback(checkpoints.config_hash(config), run.name, fingerprint),
            resume_from=resume_from,
        )
        tuned.summary["truncation"] = truncation
        tuned.summary["packing"] = config.sft.packing
        write_training_log(tuned.log_history, run.dir / TRAINING_LOG)
        write_json(run.dir / TRAINING_SUMMARY, tuned.summary)
        update_record(run, training=tuned.summary)

    with run.stage("save"):
        recipe.save(tuned, run.dir / "models" / "all", config.training.max_length)

    with run.stage("evaluation"):
        metrics = evaluate(tuned, config, data.splits, run.dir, seed)

    with run.stage("visualize"):
        if config.evaluation.figures:
            from qlora_pipeline.reporting.generations import plot_generation_metrics

            plot_generation_metrics(run.dir)
        visualize_run(run.dir, config.evaluation.figures)
    return metrics


def encode(
    tuned: recipe.Tuned, config: Config, data: InstructionData
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], dict[str, dict[str, int]]]:
    """Training and validation rows, and what truncation did to each split (all of train cut away: refused)."""
    from qlora_pipeline.errors import DataError

    train_rows, train_counts = recipe.encode(tuned, config, data.splits.train)
    validation_rows, validation_counts = recipe.encode(tuned, config, data.splits.validation)
    for name, rows, counts in (("train", train_rows, train_counts), ("validation", validation_rows, validation_counts)):
        if counts["dropped"]:
            log.warning(
                "%s: %d of %d examples lost every answer token to truncation (training.max_length %d, "
                "sft.truncation %s) and were dropped",
                name,
                counts["dropped"],
                counts["examples"],
                config.training.max_length,
                config.sft.truncation,
            )
        if not rows:
            raise DataError(
                f"every {name} example lost its whole answer to truncation ({counts['dropped']} of "
                f"{counts['examples']}): raise training.max_length ({config.training.max_length}) or use "
                "sft.truncation: keep_answer"
            )
    return train_rows, validation_rows, {"train": train_counts, "validation": validation_counts}


def train_replica(config: Config, run_dir: Path, resume: str | None) -> None:
    """What a rank other than 0 does under torchrun: the data, model and training of `execute`, kept in step with
    rank 0 by DDP; rank 0 evaluates and writes the run. `resume`: the checkpoint's folder name."""
    seed = config.experiment.seed
    seed_everything(seed)
    data = prepare_instructions(config.data, config.sft, seed)
    tuned = recipe.setup(config, seed)
    distributed.agree(data.summary["fingerprint"], "data fingerprint")  # rank 0 has adopted `resume` by now
    train_rows, validation_rows, _ = encode(tuned, config, data)
    work_dir = run_dir / checkpoints.CHECKPOINTS_DIR
    recipe.train(
        tuned,
        config,
        train_rows,
        validation_rows,
        seed,
        work_dir,
        marker=checkpoints.marker_callback(checkpoints.config_hash(config), run_dir.name, data.summary["fingerprint"]),
        resume_from=work_dir / resume if resume else None,
    )

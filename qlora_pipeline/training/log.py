"""What a training run records: the Trainer's per-step log without what varies run to run, training_log.csv, and
the process's peak memory."""

from __future__ import annotations

import csv
import logging
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_pipeline.training.checkpoints import checkpoint_step

if TYPE_CHECKING:
    from qlora_pipeline.config import TrainingConfig

log = logging.getLogger(__name__)

ADAPTER_DIR = "lora_adapter"  # the saved adapter, in models/<dataset>/ of a run
TRAINING_LOG = "training_log.csv"
TRAINING_SUMMARY = "training_summary.json"


def reproducible_log(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Trainer's per-step log without what varies run to run (timings, throughput) or sums the run up."""
    return [
        {k: v for k, v in row.items() if not k.endswith(("_runtime", "_per_second"))}
        for row in history
        if "train_runtime" not in row
    ]


def write_training_log(rows: list[dict[str, Any]], path: Path) -> Path:
    """One row per logged step: step, epoch, loss, learning_rate, grad_norm, eval_* (blank where not logged)."""
    numeric = {key for row in rows for key, value in row.items() if isinstance(value, (int, float))}
    # A fixed order: rows restored from a checkpoint (resume) come back with their keys sorted.
    first = [key for key in ("step", "epoch", "loss", "grad_norm", "learning_rate") if key in numeric or key == "step"]
    columns = first + sorted(numeric - set(first))
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def training_summary(
    trainer: Any,
    train_cfg: TrainingConfig,
    *,
    notes: list[str],
    log_history: list[dict[str, Any]],
    parameters: tuple[int, int],
    counts: dict[str, int],
    seconds: float,
    resume_from: Path | None,
    best_metric_name: str,
    loss: str,
) -> dict[str, Any]:
    """Steps, best checkpoint, throughput, batch and memory, for training_summary.json and config.json; `counts`
    (tokens and examples of an epoch) and `parameters` (trainable, total) as the path measured them. Appends the
    notes for data-parallel training and early stopping to `notes`."""
    state, world = trainer.state, int(trainer.args.world_size)
    steps_here = state.global_step - ((checkpoint_step(resume_from) or 0) if resume_from else 0)
    # Under torchrun every process takes its own batch_size per micro-step: the optimizer sees world_size times more.
    effective_batch = train_cfg.batch_size * train_cfg.gradient_accumulation_steps * world
    if world > 1:
        notes.append(
            f"data-parallel on {world} processes (DDP, {trainer.args.distributed_state.backend}): effective batch "
            f"{effective_batch} = {train_cfg.batch_size} per process x {train_cfg.gradient_accumulation_steps} "
            f"accumulation x {world}; a rerun reproduces with the same number of processes"
        )
    early_stopping = bool(train_cfg.early_stopping_patience)
    if early_stopping:
        stopped = state.global_step < state.max_steps
        notes.append(
            f"best checkpoint: step {state.best_global_step} (validation {best_metric_name} "
            f"{state.best_metric:.4f}), restored for evaluation and saved"
            + (f"; early stopping after {state.global_step} of {state.max_steps} steps" if stopped else "")
        )
    step_losses = [row["loss"] for row in log_history if "loss" in row]
    summary = {
        "optimizer_steps": state.global_step,
        "best_step": state.best_global_step if early_stopping else None,
        "best_metric": state.best_metric if early_stopping else None,
        "epochs": round(float(state.epoch or 0), 4),
        "train_loss": float(np.mean(step_losses)) if step_losses else None,  # mean per-step loss, resume-proof
        "train_seconds": round(seconds, 3),
        "samples_per_second": round(steps_here * effective_batch / seconds, 2),  # all processes together
        "world_size": world,
        "effective_batch_size": effective_batch,
        **counts,
        "trainable_parameters": parameters[0],
        "total_parameters": parameters[1],
        "peak_rss_mb": peak_rss_mb(),
        "loss": loss,
        "notes": notes,
    }
    log.info(
        "trained %d steps in %.1f s (%.1f samples/s), peak RSS %.0f MB",
        steps_here,
        seconds,
        summary["samples_per_second"],
        summary["peak_rss_mb"],
    )
    return summary

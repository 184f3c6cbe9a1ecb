"""What a training run records: the Trainer's per-step log without what varies run to run, training_log.csv, and
the process's peak memory."""

from __future__ import annotations

import csv
import resource
from pathlib import Path
from typing import Any

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

"""Several processes under `torchrun` / `accelerate launch`: which process this is, and the few messages the
processes exchange besides the Trainer's own DDP traffic. (Embedding runs use the same messages to share the
encoding: see `embeddings/run.py`.)

Launched as N processes, each one runs `qlora run`: each prepares the same data (checked by fingerprint) and
loads the model, and the HF Trainer trains them as one DDP job, gradients averaged every step. Rank 0 alone owns
the run directory: it allocates it and sends its path to the others, because the Trainer's checkpoints/ must be
the same folder for every rank (each saves its RNG state there, and each loads the best checkpoint at the end).
Rank 0 alone writes config.json, status.json, the log, metrics and the report; the other ranks train and leave.

Without a launcher `world_size()` is 1 and the collective helpers here return at once. The launcher's variables
are read from the environment, so importing this module imports no torch.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from qlora_pipeline.errors import UserError

log = logging.getLogger(__name__)


def world_size() -> int:
    """Processes in this job: torchrun and accelerate launch set WORLD_SIZE; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_replica() -> bool:
    """A rank other than 0 of a multi-process job: it trains, and writes nothing of the run's own."""
    return world_size() > 1 and rank() != 0


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def start(device: str) -> str:
    """Join the job's process group (already joined: nothing to do) and return its backend: nccl with one GPU
    per process, gloo on CPUs, the backends the Trainer itself picks, which then reuses this group."""
    import torch
    import torch.distributed as dist

    if _active():
        return str(dist.get_backend())
    if device == "cuda":
        local_rank, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(
                f"{world_size()} processes were launched but this machine has {visible} visible GPU(s) for them; "
                f"launch at most {visible} per machine (torchrun --nproc_per_node {visible})"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    log.info("rank %d of %d joined the process group (%s)", rank(), world_size(), dist.get_backend())
    return str(dist.get_backend())


def stop() -> None:
    """Leave the process group (at the end of a run, on every rank)."""
    if world_size() > 1 and _active():
        import torch.distributed as dist

        dist.destroy_process_group()


def share(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object); `value` is ignored on the other ranks."""
    if world_size() == 1 or not _active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank; also a barrier. [value] in one process."""
    if world_size() == 1 or not _active():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    if world_size() > 1 and _active():
        import torch.distributed as dist

        dist.barrier()


def agree(value: Any, what: str) -> None:
    """Every rank must hold the same `value` (say, the data fingerprint); a rank that differs is a bug in the
    environment (different files or library versions per process), so it raises on every rank. Also a barrier."""
    if world_size() == 1 or not _active():
        return
    import torch.distributed as dist

    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        per_rank = ", ".join(f"rank {i}: {v}" for i, v in enumerate(values))
        raise RuntimeError(f"the processes disagree on the {what} ({per_rank}); they must all see the same inputs")

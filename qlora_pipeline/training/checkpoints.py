"""Training checkpoints inside the run directory, and resuming an interrupted run from one.

The Trainer writes `checkpoints/checkpoint-<step>/` (adapter + head, optimizer, scheduler, RNG states,
trainer_state.json) and keeps `training.save_total_limit` of them (the best one always). Each checkpoint also
gets `qlora_checkpoint.json` with a hash of everything that decides training (seed, data, model, training
sections), so a checkpoint is only ever resumed under the config that wrote it.

A resumed run is a new run directory (run directories are never rewritten): the interrupted run's
checkpoints up to the resumed step are copied into its `checkpoints/`, training continues from there, and
config.json records `resumed_from`. On CPU the resumed run ends with exactly the metrics of an uninterrupted
one (model, optimizer, scheduler, RNG and data order are all restored).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_pipeline import distributed
from qlora_pipeline.errors import UserError
from qlora_pipeline.runs import RUN_PATTERN, read_json

if TYPE_CHECKING:
    from qlora_pipeline.config import Config

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MARKER = "qlora_checkpoint.json"
TRAINER_STATE = "trainer_state.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def config_hash(config: Config) -> str:
    """Hash of the settings that decide training; evaluation, output, names and the CPU thread count (which moves
    no number) may differ on resume."""
    record = config.to_dict()
    record["model"].pop("cpu_threads")
    decisive = {"seed": record["experiment"]["seed"], **{k: record[k] for k in ("data", "model", "training")}}
    if record["experiment"]["mode"] == "sft":  # prompts, truncation and packing decide what the adapter learns
        decisive["sft"] = record["sft"]
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_step(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def checkpoints_in(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest step first: the marker is written last, after trainer_state.json,
    so a checkpoint cut short by an interruption is never picked."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_step(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def marker_callback(hash_: str, run_name: str) -> Any:
    """A TrainerCallback that stamps every saved checkpoint with the config hash, the run that wrote it and the
    number of processes that trained it. Under torchrun every rank saves its RNG state into the checkpoint: the
    marker is written once all of them have, so it still means complete."""
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            distributed.barrier()
            if args.should_save and folder.is_dir():
                marker = {"config_hash": hash_, "run": run_name, "step": state.global_step}
                marker["world_size"] = args.world_size
                (folder / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")

    return CheckpointMarker()


def resolve_resume(resume: str | None, config: Config, output_root: Path) -> Path | None:
    """The checkpoint to resume from: none; auto (the newest unfinished run of this config under the output
    root, else a fresh start); or a run directory / checkpoint folder, which must match this config."""
    if resume in (None, "none"):
        return None
    wanted = config_hash(config)
    if resume == "auto":
        numbered = [(int(m.group(1)), p) for p in output_root.glob("run_*") if (m := RUN_PATTERN.match(p.name))]
        runs = [p for _, p in sorted(numbered, reverse=True) if p.is_dir()]
        finished = {run_dir.resolve() for run_dir in runs if _state(run_dir) == "succeeded"}
        for run_dir in runs:  # newest first, and a run is always newer than the one it resumed: one pass
            source = _resumed_run(run_dir) if run_dir.resolve() in finished else None
            if source is not None:
                finished.add(source)
        for run_dir in runs:
            if run_dir.resolve() in finished:  # it succeeded, or a run resumed from it did
                continue
            found = checkpoints_in(run_dir / CHECKPOINTS_DIR)
            if found and _marker_hash(found[-1]) == wanted:
                log.info("resume auto: continuing %s from %s", run_dir.name, found[-1].name)
                return _check_world_size(found[-1], resume)
        log.info("resume auto: no unfinished run of this config under %s; starting fresh", output_root)
        return None
    path = Path(resume)
    if checkpoint_step(path) is None:
        found = checkpoints_in(path / CHECKPOINTS_DIR)
        if not found:
            raise UserError(
                f"--resume {resume}: no checkpoint there; pass a run directory with checkpoints/ "
                "(outputs/run_XXX), one of its checkpoints/checkpoint-N folders, auto or none"
            )
        path = found[-1]
    elif not (path / MARKER).is_file() or not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint of a qlora run (no {MARKER})")
    found_hash = _marker_hash(path)
    if found_hash != wanted:
        raise UserError(
            f"--resume {resume}: the checkpoint was written by a different config (hash {found_hash} vs {wanted} "
            "for this one); resume it with `qlora resume RUN_DIR`, which reuses that run's config"
        )
    return _check_world_size(path, resume)


def _check_world_size(checkpoint: Path, resume: str) -> Path:
    """A checkpoint resumes on as many processes as trained it: the batch per step, the data each rank reads
    and the per-rank RNG states all depend on that number."""
    trained_on = _marker(checkpoint).get("world_size", 1)  # markers written before this field: one process
    if trained_on != distributed.world_size():
        launch = "plain `qlora run`" if trained_on == 1 else f"torchrun --nproc_per_node {trained_on}"
        raise UserError(
            f"--resume {resume}: {checkpoint.name} was trained on {trained_on} process(es), this run has "
            f"{distributed.world_size()}; resume it with the same number ({launch})"
        )
    return checkpoint


def _state(run_dir: Path) -> str | None:
    try:
        return read_json(run_dir / "status.json").get("state")
    except (OSError, json.JSONDecodeError):
        return None


def _resumed_run(run_dir: Path) -> Path | None:
    """The run directory that `run_dir` was resumed from (config.json `resumed_from`), if any."""
    try:
        resumed_from = read_json(run_dir / "config.json").get("resumed_from")
    except (OSError, json.JSONDecodeError):
        return None
    return Path(resumed_from).resolve().parent.parent if resumed_from else None


def _marker(checkpoint: Path) -> dict[str, Any]:
    try:
        marker = read_json(checkpoint / MARKER)
    except (OSError, json.JSONDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _marker_hash(checkpoint: Path) -> str | None:
    return _marker(checkpoint).get("config_hash")


def adopt(checkpoint: Path, checkpoints_dir: Path) -> Path:
    """Copy `checkpoint` and the older ones beside it into this run's checkpoints folder (the best one may be
    among them); the trainer states then point at the copies. Returns the copy to resume from."""
    step = checkpoint_step(checkpoint) or 0
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    source_dir = checkpoint.parent.resolve()
    for old in checkpoints_in(checkpoint.parent):
        if (checkpoint_step(old) or 0) <= step:
            shutil.copytree(old, checkpoints_dir / old.name)
    for copy in checkpoints_in(checkpoints_dir):
        state_path = copy / TRAINER_STATE
        state = read_json(state_path)
        best = state.get("best_model_checkpoint")
        if best and Path(best).resolve().parent == source_dir:
            state["best_model_checkpoint"] = str(checkpoints_dir / Path(best).name)
            state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return checkpoints_dir / checkpoint.name

"""Training checkpoints inside the run directory, and resuming an interrupted run from one.

The Trainer writes `checkpoints/checkpoint-<step>/` (adapter + head, optimizer, scheduler, RNG states,
trainer_state.json) and keeps `training.save_total_limit` of them (the best one always). Each checkpoint also
gets `qlora_checkpoint.json`, written last, with a hash of everything that decides training (seed, data, model,
training sections), so a checkpoint is only ever resumed under the config that wrote it, the fingerprint of the
data it trained on, and the SHA-256 of every file the checkpoint holds. A checkpoint without the marker (cut short
while saving), or with a file missing or changed since (a kill while the Trainer was deleting an old checkpoint, a
damaged disk, a hand edit), is never resumed: `--resume auto` and a run directory take the newest intact one and
say which they skipped; a damaged checkpoint named explicitly is refused.

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
from qlora_pipeline.integrity import sha256_file
from qlora_pipeline.runs import RUN_PATTERN, read_json, run_state, write_json

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


def file_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in a checkpoint folder but the marker, by path relative to it."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}


def marker_callback(hash_: str, run_name: str, data_fingerprint: str | None = None) -> Any:
    """A TrainerCallback that stamps every saved checkpoint with the config hash, the run that wrote it, the number
    of processes that trained it, the data fingerprint and its files' checksums. Under torchrun every rank saves its
    RNG state into the checkpoint: the marker is written once all of them have, so it still means complete."""
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            distributed.barrier()
            if args.should_save and folder.is_dir():
                marker = {"config_hash": hash_, "run": run_name, "step": state.global_step}
                marker |= {"world_size": args.world_size, "data_fingerprint": data_fingerprint}
                marker["files"] = file_checksums(folder)
                write_json(folder / MARKER, marker)

    return CheckpointMarker()


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint that has its marker: a file the marker lists that is missing or differs.
    None when intact, or when the marker predates checksums (nothing to check)."""
    files = _marker(checkpoint).get("files")
    if not isinstance(files, dict):
        return None
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} differs from the checksum recorded when it was saved"
    return None


def intact(candidates: list[Path]) -> Path | None:
    """The newest of `candidates` (oldest first, as `checkpoints_in` lists them) that is intact and from which
    training goes on; each damaged one skipped on the way is named in a warning. A checkpoint saved as training
    stopped (early stopping) is passed over for an earlier one: the Trainer, resumed there, would train on past the
    stop, and the resumed run would differ from the uninterrupted one. Only when no other is intact is it taken."""
    last_one = None
    for checkpoint in reversed(candidates):
        problem = damage(checkpoint)
        if problem is not None:
            log.warning("skipping %s: %s (damaged or cut short; never resumed)", checkpoint, problem)
        elif not ended_training(checkpoint):
            if last_one is not None:
                log.info(
                    "%s was saved as training stopped: resuming from %s, which ends the same",
                    last_one.name,
                    checkpoint.name,
                )
            return checkpoint
        elif last_one is None:
            last_one = checkpoint
    if last_one is not None:
        log.warning(
            "%s was saved as training stopped and no earlier checkpoint is intact: training goes on from it", last_one
        )
    return last_one


def ended_training(checkpoint: Path) -> bool:
    """Whether training stopped at this checkpoint (its saved TrainerControl says should_training_stop)."""
    try:
        callbacks = read_json(checkpoint / TRAINER_STATE).get("stateful_callbacks") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    control = callbacks.get("TrainerControl") if isinstance(callbacks, dict) else None
    return bool(isinstance(control, dict) and (control.get("args") or {}).get("should_training_stop"))


def check_data(checkpoint: Path, fingerprint: str) -> None:
    """Refuse to continue a checkpoint on other data than it trained on (the data files changed since)."""
    recorded = _marker(checkpoint).get("data_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise UserError(
            f"{checkpoint} trained on other data (fingerprint {recorded[:12]}…, now {fingerprint[:12]}…): the data "
            "files changed since; restore them, or start a new run without --resume"
        )


def resolve_resume(resume: str | None, config: Config, output_root: Path) -> Path | None:
    """The checkpoint to resume from: none; auto (the newest unfinished run of this config under the output
    root, else a fresh start); or a run directory / checkpoint folder, which must match this config."""
    if resume in (None, "none"):
        return None
    wanted = config_hash(config)
    if resume == "auto":
        numbered = [(int(m.group(1)), p) for p in output_root.glob("run_*") if (m := RUN_PATTERN.match(p.name))]
        runs = [p for _, p in sorted(numbered, reverse=True) if p.is_dir()]
        states = {run_dir: _state(run_dir) for run_dir in runs}
        finished = {run_dir.resolve() for run_dir in runs if states[run_dir] == "succeeded"}
        for run_dir in runs:  # newest first, and a run is always newer than the one it resumed: one pass
            source = _resumed_run(run_dir) if run_dir.resolve() in finished else None
            if source is not None:
                finished.add(source)
        for run_dir in runs:
            if run_dir.resolve() in finished:  # it succeeded, or a run resumed from it did
                continue
            if states[run_dir] == "running":  # its process still lives: not ours to continue
                log.info("resume auto: %s is still running; not resuming it", run_dir.name)
                continue
            found = [p for p in checkpoints_in(run_dir / CHECKPOINTS_DIR) if _marker_hash(p) == wanted]
            checkpoint = intact(found)
            if checkpoint is not None:
                log.info("resume auto: continuing %s from %s", run_dir.name, checkpoint.name)
                return _check_world_size(checkpoint, resume)
        log.info("resume auto: no unfinished run of this config under %s; starting fresh", output_root)
        return None
    path = Path(resume)
    run_dir = path if checkpoint_step(path) is None else path.parent.parent
    if _state(run_dir) == "running":
        raise UserError(
            f"--resume {resume}: {run_dir} is still running (its process lives, see its status.json); wait for it "
            "to end or stop it first"
        )
    if checkpoint_step(path) is None:
        found = checkpoints_in(path / CHECKPOINTS_DIR)
        if not found:
            raise UserError(
                f"--resume {resume}: no checkpoint there; pass a run directory with checkpoints/ "
                "(outputs/run_XXX), one of its checkpoints/checkpoint-N folders, auto or none"
            )
        checkpoint = intact(found)
        if checkpoint is None:
            raise UserError(f"--resume {resume}: every checkpoint there is damaged (see the warnings); start afresh")
        path = checkpoint
    elif not (path / MARKER).is_file() or not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume {resume}: not a complete checkpoint of a qlora run (no {MARKER})")
    elif (problem := damage(path)) is not None:
        raise UserError(f"--resume {resume}: the checkpoint is damaged ({problem}); resume from another one")
    found_hash = _marker_hash(path)
    if found_hash != wanted:
        edited = _own_config_hash(run_dir) == wanted
        raise UserError(
            f"--resume {resume}: the checkpoint was written by a different config (hash {found_hash} vs {wanted} "
            + (
                f"): {run_dir / 'config.json'} was edited after the checkpoint was written; restore it"
                if edited
                else "for this one); resume it with `qlora resume RUN_DIR`, which reuses that run's config"
            )
        )
    return _check_world_size(path, resume)


def _own_config_hash(run_dir: Path) -> str | None:
    """The config hash of the config.json in `run_dir`, when it holds a readable config."""
    from qlora_pipeline.config import Config
    from qlora_pipeline.errors import ConfigError

    try:
        return config_hash(Config.from_dict(read_json(run_dir / "config.json")["config"]))
    except (OSError, KeyError, TypeError, json.JSONDecodeError, ConfigError):
        return None


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
    """The run's state, a dead `running` one read as `interrupted` (`runs.run_state`); None when unreadable."""
    try:
        return run_state(run_dir).get("state")
    except UserError:
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
    """Copy `checkpoint` and the intact older ones beside it into this run's checkpoints folder (the best one may
    be among them); the trainer states then point at the copies, and their markers record the edited state.
    Returns the copy to resume from. Refused when the best checkpoint that early stopping will restore is damaged."""
    step = checkpoint_step(checkpoint) or 0
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    source_dir = checkpoint.parent.resolve()
    for old in checkpoints_in(checkpoint.parent):
        if (checkpoint_step(old) or 0) <= step and (old == checkpoint or damage(old) is None):
            shutil.copytree(old, checkpoints_dir / old.name)
    for copy in checkpoints_in(checkpoints_dir):
        state_path = copy / TRAINER_STATE
        state = read_json(state_path)
        best = state.get("best_model_checkpoint")
        if best and Path(best).resolve().parent == source_dir:
            if not (checkpoints_dir / Path(best).name / MARKER).is_file():
                raise UserError(
                    f"{copy.name} restores its best checkpoint {Path(best).name} at the end, but that one is missing "
                    "or damaged; resume from a checkpoint before it, or start afresh"
                )
            state["best_model_checkpoint"] = str(checkpoints_dir / Path(best).name)
            state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            marker = _marker(copy)
            if isinstance(marker.get("files"), dict):
                marker["files"][TRAINER_STATE] = sha256_file(state_path)
                write_json(copy / MARKER, marker)
    return checkpoints_dir / checkpoint.name

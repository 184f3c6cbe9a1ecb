"""The orchestrator: open a run directory, hand it to the path `experiment.mode` chooses, record how it ended.

Each path is a package with a `run.py` of the same shape (`embeddings/run.py`, `finetune/run.py`, `sft/run.py`):
`preflight` checks what can be checked before a run directory exists, `execute` runs the stages into it and returns
the metrics; the shared stages live in `stages.py`. Only the CLI and the package entry import this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from qlora_pipeline import distributed
from qlora_pipeline.errors import UserError
from qlora_pipeline.integrity import write_manifest
from qlora_pipeline.reporting.report import write_report
from qlora_pipeline.reporting.tracking import Tracker, config_params, open_tracker
from qlora_pipeline.runs import Run, RunInterrupted, disk_full, sigterm_interrupts, write_json
from qlora_pipeline.stages import archive_record, update_record

if TYPE_CHECKING:
    from qlora_pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    reproduction: dict[str, Any] | None
    replica: bool = False  # a rank other than 0 under torchrun: it trained; rank 0 evaluated and wrote the run


def path_of(mode: str) -> ModuleType:
    """The `run` module of the path that `experiment.mode` names."""
    if mode == "qlora":
        from qlora_pipeline.finetune import run as qlora_path

        return qlora_path
    if mode == "sft":
        from qlora_pipeline.sft import run as sft_path

        return sft_path
    from qlora_pipeline.embeddings import run as embeddings_path

    return embeddings_path


def run_experiment(
    config: Config,
    output_root: str | Path | None = None,
    reproduce_of: Path | None = None,
    resume: str | None = None,
) -> RunResult:
    """Run one experiment into a new run directory; the directory records failure as faithfully as success.
    `resume` (modes qlora, sft): auto, none, or a run directory / checkpoint to continue (`checkpoints.resolve_resume`).
    Under torchrun / accelerate launch every process calls this; rank 0 writes the run (see `distributed.py`)."""
    path = path_of(config.experiment.mode)
    root = Path(output_root if output_root is not None else config.output.root)
    if distributed.world_size() == 1:
        return _run(path, config, root, reproduce_of, resume)
    if not path.DATA_PARALLEL:
        raise UserError(
            f"experiment.mode {config.experiment.mode} runs in one process, but {distributed.world_size()} were "
            "launched (torchrun / accelerate launch); run it with plain `qlora run`"
        )
    from qlora_pipeline.models.device import resolve_device
    from qlora_pipeline.models.tiny import resolve_model_path

    # Once a process group exists transformers' save_pretrained writes on rank 0 only: a built-in model is built
    # (by every rank at once, which is safe) before joining it.
    resolve_model_path(config.model.name_or_path)
    distributed.start(resolve_device(config.model))
    try:
        if distributed.is_replica():
            plan = distributed.share(None)
            if plan is None:
                raise UserError("rank 0 did not start the run (its error says why); this rank trained nothing")
            path.train_replica(config, Path(plan["run_dir"]), plan["resume"])
            return RunResult(Path(plan["run_dir"]), {}, None, replica=True)
        return _run(path, config, root, reproduce_of, resume)
    finally:
        distributed.stop()


def _run(path: ModuleType, config: Config, root: Path, reproduce_of: Path | None, resume: str | None) -> RunResult:
    from qlora_pipeline.models.device import cpu_threads

    try:  # before a run directory exists: a bad head option, a checkpoint of another config, a missing tracker
        resume_from = path.preflight(config, root, resume)
        tracker = open_tracker(config.output, root, config.experiment.name)
        run = Run.create(root)
    except BaseException:
        distributed.share(None)  # the other ranks of a torchrun job wait for the run directory: there is none
        raise
    distributed.share({"run_dir": str(run.dir.resolve()), "resume": resume_from.name if resume_from else None})
    write_json(run.dir / "config.json", archive_record(config, run, reproduce_of))
    update_record(run, tracking=tracker.start(run.name, run.dir, config_params(config.to_dict())))
    try:
        with sigterm_interrupts(), cpu_threads(config.model.cpu_threads):
            metrics = path.execute(config, run, resume_from)
            reproduction = None
            if reproduce_of is not None:
                with run.stage("reproduce_check"):
                    from qlora_pipeline.reproduce import compare_runs

                    reproduction = compare_runs(reproduce_of, run.dir)
                    write_json(run.dir / "reproduction.json", reproduction)
            with run.stage("report"):  # still `running` in it: a run killed here never reads as succeeded
                write_report(run.dir, run.status())
            write_manifest(run.dir)  # checksums of what the run wrote, before it is marked succeeded
    except BaseException as exc:
        record_end(
            run, tracker, "interrupted" if isinstance(exc, (KeyboardInterrupt, RunInterrupted)) else "failed", exc
        )
        if disk_full(exc):
            from qlora_pipeline.models.tiny import cache_root

            assert isinstance(exc, OSError)
            where = f" ({exc.filename})" if exc.filename else ""
            raise UserError(
                f"{exc.strerror}{where}: free some space where the run writes (its directory {run.dir}, the "
                f"embedding cache under {cache_root()}) or choose another --output-dir; {run.name} is marked failed"
            ) from exc
        raise
    record_end(run, tracker, "succeeded")  # the report again, now with the final state and every stage's timing
    return RunResult(run.dir, metrics, reproduction)


def record_end(run: Run, tracker: Tracker, state: str, error: BaseException | None = None) -> None:
    """status.json, the report and the tracker say how the run ended. On a full disk the status is still written
    (see `Run.write_status`); a report or tracker that cannot be written then is skipped with a warning."""
    run.finish(state, error)
    for what, write in (
        ("report", lambda: write_report(run.dir, run.status())),
        ("tracker", lambda: tracker.finish(run.dir, run.status())),
    ):
        try:
            write()
        except OSError as exc:
            if not disk_full(exc):
                raise
            log.warning("the %s of %s was not written: %s", what, run.name, exc.strerror)

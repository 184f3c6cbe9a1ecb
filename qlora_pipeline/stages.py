"""Stages and run records that every path shares: seeding, the data stage, config.json updates, the model
record, figures + dashboard + summaries. Each path's `run.py` calls these in its own order."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from qlora_pipeline import distributed
from qlora_pipeline.runs import Run, environment_info, now_iso, read_json, write_json
from qlora_pipeline.training import checkpoints

if TYPE_CHECKING:
    from qlora_pipeline.config import Config
    from qlora_pipeline.data.prepare import PreparedData
    from qlora_pipeline.models.loading import LoadedModel, ModelIdentity


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Summarized(Protocol):
    @property
    def summary(self) -> dict[str, Any]: ...


Data = TypeVar("Data", bound=_Summarized)


@overload
def data_stage(config: Config, run: Run) -> PreparedData: ...
@overload
def data_stage(config: Config, run: Run, prepare: Callable[[], Data]) -> Data: ...
def data_stage(config: Config, run: Run, prepare: Callable[[], Any] | None = None) -> Any:
    """Seed everything, then load, clean and split (`data.prepare.prepare_data`, or `prepare()`: a path's own data
    with a `summary`); data_summary.json and the fingerprint in config.json."""
    from qlora_pipeline.data.prepare import prepare_data

    seed_everything(config.experiment.seed)
    with run.stage("data"):
        prepared = prepare() if prepare is not None else prepare_data(config.data, config.experiment.seed)
        write_json(run.dir / "data_summary.json", prepared.summary)
        update_record(
            run, data={"fingerprint": prepared.summary["fingerprint"], "sources": prepared.summary["sources"]}
        )
    return prepared


def resume_checkpoints(
    run: Run, resume_from: Path | None, notes: list[str], fingerprint: str
) -> tuple[Path, Path | None]:
    """The run's checkpoints folder, and the checkpoint to resume from (`resume_from`, see
    `checkpoints.resolve_resume`) once it is copied there, recorded in config.json and in `notes`. Under torchrun
    the other ranks wait here, agreeing on the data `fingerprint`, until that copy is made."""
    work_dir = run.dir / checkpoints.CHECKPOINTS_DIR
    if resume_from is not None:
        update_record(run, resumed_from=str(resume_from))
        notes.append(f"resumed from {resume_from} (its checkpoints copied into checkpoints/)")
        resume_from = checkpoints.adopt(resume_from, work_dir)
    distributed.agree(fingerprint, "data fingerprint")
    return work_dir, resume_from


def visualize_run(run_dir: Path, figures: bool) -> None:
    """Figures and dashboard (when enabled), then each split's evaluation_summary.md linking them; the results
    files are read once for all three."""
    from qlora_pipeline.evaluation.results import collect_results
    from qlora_pipeline.reporting.summary import write_summaries

    collected = collect_results(run_dir)
    if figures:
        from qlora_pipeline.reporting.dashboard import write_dashboard
        from qlora_pipeline.reporting.figures import plot_run

        plot_run(run_dir, collected)
        write_dashboard(run_dir, collected)
    write_summaries(run_dir, collected)


def archive_record(config: Config, run: Run, reproduce_of: Path | None) -> dict[str, Any]:
    """config.json as a run starts: the resolved config, seed and environment; stages fill in the rest."""
    return {
        "run": run.name,
        "created_at": now_iso(),
        "seed": config.experiment.seed,
        "reproduce_of": str(reproduce_of) if reproduce_of else None,
        "config": config.to_dict(),
        "environment": environment_info(),
        "data": None,
        "model": None,
    }


def update_record(run: Run, **fields: Any) -> None:
    """Set top-level fields of the run's config.json (written atomically)."""
    record = read_json(run.dir / "config.json")
    record.update(fields)
    write_json(run.dir / "config.json", record)


def identity_record(model: LoadedModel | ModelIdentity) -> dict[str, Any]:
    """Which model, in which setting: the first keys of config.json's model record."""
    return {
        "source": model.source,
        "revision": model.revision,
        "quantization": model.quantization,
        "compute_dtype": model.compute_dtype,
        "device": model.device,
        "notes": list(model.notes),
    }


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """What was actually loaded, for config.json and the report."""
    return {
        **identity_record(loaded),
        # from_pretrained's report: weights drawn fresh (missing, or another shape) and checkpoint weights unused
        "load_report": dict(loaded.load_report),
    }

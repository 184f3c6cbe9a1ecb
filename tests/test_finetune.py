"""The QLoRA path on the tiny model: a run, its adapter reloaded by plain peft, reproduction, losses, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import fast_args, score_plainly

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
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qlora: error:")]
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

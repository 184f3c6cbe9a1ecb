"""`qlora run --quick`: any config small and fast (a few hundred examples, one short epoch, a small evaluation),
recorded as a quick run in config.json and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipeline.cli import main
from qlora_pipeline.config import QUICK_MAX_SAMPLES, load_config


def test_quick_caps_samples_epochs_and_evaluation_of_a_shipped_recipe() -> None:
    full = load_config("afqmc_qlora")
    quick = load_config("afqmc_qlora", quick=True)
    assert (full.experiment.quick, quick.experiment.quick) == (False, True)
    assert full.data.max_samples is None and quick.data.max_samples == QUICK_MAX_SAMPLES
    assert full.training.epochs == 3 and quick.training.epochs == 1
    assert full.training.early_stopping_patience == 3 and quick.training.early_stopping_patience is None
    assert quick.training.eval_steps is None and quick.training.save_steps is None
    assert quick.evaluation.bootstrap == 200
    # What quick does not touch stays the recipe's.
    assert (quick.training.lora_r, quick.training.label_words) == (full.training.lora_r, full.training.label_words)


def test_quick_keeps_smaller_settings_and_an_explicit_set_wins() -> None:
    tiny = load_config("qlora_tiny", quick=True)
    assert (tiny.data.max_samples, tiny.training.max_steps) == (300, 24)  # already small: kept
    assert load_config("quick_test", quick=True).data.max_samples == 300  # 400 -> 300
    chosen = load_config("chnsenticorp_qlora", ["data.max_samples=1000"], quick=True)
    assert chosen.data.max_samples == 1000 and chosen.experiment.quick


def test_quick_run_is_recorded_in_config_json_and_the_report(tmp_path: Path) -> None:
    args = ["run", "--config", "quick_test", "--quick", "--output-dir", str(tmp_path)]
    assert main([*args, "--set", "evaluation.figures=false", "--set", "embedding.fidelity_sample=0"]) == 0
    run = tmp_path / "run_001"
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["experiment"]["quick"] is True
    assert json.loads((run / "data_summary.json").read_text())["rows_after_sampling"] == 300
    report = (run / "experiment_report.md").read_text()
    assert "> **Quick run** (`--quick`): at most 300 examples per dataset" in report
    assert "| quick run | yes (--quick)" in report


@pytest.mark.parametrize("command", [["run", "--config"], ["check"]])
def test_quick_is_an_option_of_run_and_check(command: list[str]) -> None:
    from qlora_pipeline.cli import build_parser

    args = build_parser().parse_args([*command, "quick_test", "--quick"])
    assert args.quick is True

"""Mistakes that used to surface only after the model loaded (or never) are refused when the config loads: one line,
exit 2, and no run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora_pipeline.cli import main
from qlora_pipeline.config import (
    ARCHIVE_DEFAULTS,
    DEFAULT_PAIR_TEMPLATE,
    TRAINER_OPTIMIZERS,
    Config,
    load_config,
    upgrade_archived,
)
from qlora_pipeline.errors import ConfigError

PAIRS = "data.sources=[{name: p, type: local, path: p.csv, text_pair_column: b, label_names: [x, y]}]"


def refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, *settings: str) -> str:
    """Run `qlora run` and return its one error line, after checking exit 2 and that no output folder appeared."""
    args = ["run", "--config", config, "--output-dir", str(tmp_path / "out")]
    for item in settings:
        args += ["--set", item]
    assert main(args) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert not (tmp_path / "out").exists()
    return errors[0]


def test_the_optimizer_list_is_the_installed_trainers() -> None:
    from transformers.training_args import OptimizerNames

    assert sorted(TRAINER_OPTIMIZERS) == sorted(name.value for name in OptimizerNames)


def test_an_unknown_optimizer_is_refused_before_a_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refused(tmp_path, capsys, "qlora_tiny", "training.optimizer=adamw_turbo")
    assert "training.optimizer 'adamw_turbo' is not a Trainer optimizer; did you mean 'adamw_torch'?" in error


def test_a_threshold_reported_on_a_test_split_that_is_not_evaluated_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refused(tmp_path, capsys, "qlora_tiny", "training.threshold_metric=f1", "evaluation.splits=[validation]")
    assert "training.threshold_metric 'f1' tunes the cut on validation and reports it on test" in error
    assert "add test, or set threshold_metric to none" in error


def test_a_binary_threshold_on_three_classes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(tmp_path, capsys, "moderation", "classifier.threshold_metric=f1")
    assert "classifier.threshold_metric 'f1' tunes a binary threshold, but the data has 3 classes" in error


def test_label_words_that_do_not_match_the_class_count_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refused(
        tmp_path,
        capsys,
        "qlora_tiny_lm_label",
        "training.label_words=[差, 好, 中]",
        PAIRS.replace("text_pair_column: b, ", ""),
    )
    assert "training.label_words has 3 words but the data has 2 classes" in error


def test_a_pair_template_on_single_texts_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(tmp_path, capsys, "quick_test", "model.pair_template='{text} | {text_pair}'")
    assert error.endswith(
        "model.pair_template '{text} | {text_pair}' joins text pairs, but no data source sets text_pair_column; "
        "set text_pair_column, or leave pair_template at 'auto'"
    )


def test_a_pair_template_without_the_second_text_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = refused(tmp_path, capsys, "quick_test", PAIRS, "model.pair_template='{text} |'")
    assert "model.pair_template must be 'auto', 'tokenizer' or a template with {text} and {text_pair}" in error


def test_an_lm_label_prompt_with_a_second_text_on_single_texts_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refused(tmp_path, capsys, "qlora_tiny_lm_label", "training.prompt_template='{text} {text_pair} 答：'")
    assert "training.prompt_template uses {text_pair}, but no data source sets text_pair_column" in error


def test_sources_mixing_pairs_and_single_texts_are_refused() -> None:
    second = {"name": "q", "type": "local", "path": "q.csv"}
    pair = {"name": "p", "type": "local", "path": "p.csv", "text_pair_column": "b"}
    with pytest.raises(ConfigError, match=r"data sources \['p'\] have text pairs .* but the others have single"):
        Config.from_dict({"data": {"sources": [pair, second]}})


def test_pair_templates_that_are_accepted() -> None:
    for template in ("auto", "tokenizer", "问题一：{text}\n问题二：{text_pair}", DEFAULT_PAIR_TEMPLATE):
        setting = f"model.pair_template={json.dumps(template, ensure_ascii=False)}"  # YAML reads a JSON string
        assert load_config("afqmc", [setting]).model.pair_template == template


def test_an_archived_config_without_the_newer_settings_reads_back_as_it_ran() -> None:
    archived = Config().to_dict()
    for section, key in ARCHIVE_DEFAULTS:
        del archived[section][key]
    upgraded = Config.from_dict(upgrade_archived(archived))
    assert upgraded.model.pair_template == "tokenizer"  # 0.1.0 let the tokenizer join pairs
    assert upgraded.training.loss_normalization == "micro_batch"  # and averaged micro-batch means
    assert Config.from_dict(upgrade_archived(Config().to_dict())) == Config()  # today's archives: as written

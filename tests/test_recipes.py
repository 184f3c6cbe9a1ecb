"""The original recipes as shipped configs: each says what it should reach and where that figure comes from, and
holds the settings the recipe quoted (issue 15), so a config cannot drift from its recipe unnoticed."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_pipeline.config import load_config, resolve_config_path, shipped_configs_dir

RECIPES = ("chnsenticorp_qlora", "afqmc_qlora", "moderation_lora", "civility_qlora")


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_is_headed_by_its_expected_result_and_the_source_of_that_figure(name: str) -> None:
    header = []
    for line in (shipped_configs_dir() / f"{name}.yaml").read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = " ".join(header).lower()
    assert "expected result:" in text and "issue 15" in text, name


def test_chnsenticorp_recipe() -> None:
    config = load_config("chnsenticorp_qlora")
    train, source = config.training, config.data.sources[0]
    assert config.model.name_or_path == "Qwen/Qwen2.5-1.5B" and config.model.quantization == "4bit"
    assert (train.lora_r, train.lora_alpha, train.lora_dropout, train.warmup_ratio) == (8, 32, 0.1, 0.1)
    assert train.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert source.splits == {"train": "train", "validation": "validation", "test": "test"}


def test_afqmc_recipe() -> None:
    config = load_config("afqmc_qlora")
    train, source = config.training, config.data.sources[0]
    assert (train.head, train.label_words, source.label_names) == ("lm_label", ["否", "是"], ["different", "same"])
    assert (train.lora_r, train.lora_alpha, train.lora_dropout, train.learning_rate) == (16, 32, 0.1, 5e-5)
    assert train.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (train.epochs, train.batch_size, train.gradient_accumulation_steps) == (3, 8, 4)
    assert (train.eval_steps, train.save_steps, train.early_stopping_patience) == (100, 100, 3)
    assert (train.class_weights, train.threshold_metric) == ([1.0, 3.0], "macro_f1")
    assert source.text_pair_column == "sentence2"


def test_moderation_recipe() -> None:
    config = load_config("moderation_lora")
    train, source = config.training, config.data.sources[0]
    assert config.model.name_or_path == "hfl/chinese-roberta-wwm-ext" and config.model.quantization == "none"
    assert (train.lora_r, train.lora_alpha, train.target_modules) == (16, 32, ["query", "value"])
    assert (train.learning_rate, train.batch_size, train.epochs) == (2e-5, 32, 3)
    assert source.label_names == ["normal", "suspicious", "violation"] and set(source.files or {}) == {
        "train",
        "validation",
        "test",
    }


def test_civility_recipe_trains_pooled_and_per_dataset_on_five_corpora() -> None:
    config = load_config("civility_qlora")
    assert config.experiment.mode == "qlora"
    assert config.experiment.per_dataset and config.experiment.pooled
    assert len(config.data.sources) == 5


@pytest.mark.parametrize("old", ["qlora_civility", "qlora_civility.yaml", "configs/qlora_civility.yaml"])
def test_the_renamed_civility_config_still_loads_under_its_old_name(old: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(old) == shipped_configs_dir() / "civility_qlora.yaml"

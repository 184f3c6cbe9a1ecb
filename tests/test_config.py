"""The config: shipped files validate, values round-trip, and every user mistake is one clear line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_pipeline.config import (
    ClassifierConfig,
    Config,
    SourceConfig,
    TrainingConfig,
    apply_overrides,
    config_reference_markdown,
    load_config,
    resolve_config_path,
    save_config,
    shipped_configs_dir,
)
from qlora_pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (REPO / "configs").iterdir() if p.suffix in {".yaml", ".yml", ".json"})


def _non_default_config() -> Config:
    return Config.from_dict(
        {
            "experiment": {"name": "round-trip", "mode": "qlora", "seed": 7},
            "data": {
                "sources": [
                    {"name": "a", "type": "local", "path": "data/a.csv", "label_names": ["no", "yes"]},
                    {"name": "b"},
                ],
                "max_samples": 100,
                "max_length": 500,
            },
            "model": {"revision": "main", "quantization": "none", "compute_dtype": "bfloat16"},
            "embedding": {"instruction": "Classify the sentiment", "pooling": "mean"},
            "classifier": {"heads": ["logreg", "xgboost"], "C": 2, "threshold_metric": "f1"},
            "training": {"max_steps": 10, "target_modules": ["q_proj", "v_proj"], "eval_steps": None},
            "evaluation": {"splits": ["test"]},
        }
    )


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_shipped_configs_exist() -> None:
    assert {"quick_test.yaml", "snownlp_sentiment.yaml"} <= {p.name for p in SHIPPED}


def test_default_config_is_valid_and_round_trips() -> None:
    assert Config.from_dict(Config().to_dict()) == Config()


def test_round_trip_through_dict() -> None:
    config = _non_default_config()
    assert Config.from_dict(config.to_dict()) == config


def test_round_trip_through_json_file(tmp_path: Path) -> None:
    config = _non_default_config()
    save_config(config, tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == config


def test_to_dict_keeps_declaration_order() -> None:
    assert list(Config().to_dict()) == [f.name for f in dataclasses.fields(Config)]


def test_int_is_accepted_for_a_float_field() -> None:
    assert Config.from_dict({"classifier": {"C": 2}}).classifier.C == 2.0


def test_unknown_key_suggests_the_close_one_and_names_the_path() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'data\.val_ration' — did you mean 'val_ratio'\?"):
        Config.from_dict({"data": {"val_ration": 0.1}})


def test_unknown_key_in_a_source_names_the_list_index() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'data\.sources\[0\]\.nam' — did you mean 'name'"):
        Config.from_dict({"data": {"sources": [{"nam": "x"}]}})


def test_wrong_type_names_the_path_and_the_type() -> None:
    with pytest.raises(ConfigError, match=r"^training\.learning_rate must be a float, got str 'abc'$"):
        Config.from_dict({"training": {"learning_rate": "abc"}})


def test_section_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^data must be a mapping of settings"):
        Config.from_dict({"data": [1, 2]})


def test_out_of_range_names_the_full_path() -> None:
    with pytest.raises(ConfigError, match=r"^training\.learning_rate must be > 0, got -1$"):
        Config.from_dict({"training": {"learning_rate": -1}})


def test_cpu_threads_must_be_positive_or_null() -> None:
    with pytest.raises(ConfigError, match=r"^model\.cpu_threads must be >= 1 or null, got 0$"):
        Config.from_dict({"model": {"cpu_threads": 0}})


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ConfigError, match=r"^lora_r must be >= 1"):
        TrainingConfig(lora_r=0)


def test_bool_is_refused_for_an_int() -> None:
    with pytest.raises(ConfigError, match=r"^experiment\.seed must be an integer, got bool True$"):
        Config.from_dict({"experiment": {"seed": True}})


def test_literal_error_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"model\.quantization must be one of '4bit', '8bit', 'none', 'auto'"):
        Config.from_dict({"model": {"quantization": "3bit"}})


def test_local_source_without_path_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.path is required when type is 'local'"):
        Config.from_dict({"data": {"sources": [{"name": "mine", "type": "local"}]}})


def test_ratios_leaving_no_training_data_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^data\.test_ratio \+ val_ratio must be < 1"):
        Config.from_dict({"data": {"val_ratio": 0.5, "test_ratio": 0.5}})


def test_instruction_needs_its_placeholder() -> None:
    with pytest.raises(ConfigError, match=r"^embedding\.prompt_template must contain \{instruction\}"):
        Config.from_dict({"embedding": {"instruction": "Classify", "prompt_template": "Query: {text}"}})


def test_duplicate_source_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^data\.sources must have distinct names"):
        Config.from_dict({"data": {"sources": [{"name": "a"}, {"name": "a"}]}})


def test_overrides_apply_and_parse_scientific_floats() -> None:
    config = Config.from_dict({}, ["training.learning_rate=1e-4", "data.max_samples=null"])
    assert config.training.learning_rate == 1e-4
    assert config.data.max_samples is None


def test_overrides_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"^training\.lora_r must be >= 1"):
        Config.from_dict({}, ["training.lora_r=0"])


def test_list_override_works() -> None:
    config = Config.from_dict({}, ["classifier.heads=[logreg,xgboost]"])
    assert config.classifier == ClassifierConfig(heads=["logreg", "xgboost"])


def test_unknown_override_path_is_refused_with_a_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'training\.learnin_rate' — did you mean 'learning_rate'"):
        apply_overrides({}, ["training.learnin_rate=1e-4"])


def test_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"override 'training\.lora_r' must look like section\.field=value"):
        apply_overrides({}, ["training.lora_r"])


def test_apply_overrides_leaves_its_input_alone() -> None:
    data = {"training": {"lora_r": 4}}
    assert apply_overrides(data, ["training.lora_r=8"]) == {"training": {"lora_r": 8}}
    assert data == {"training": {"lora_r": 4}}


def test_load_config_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("experiment:\n  name: base\n", encoding="utf-8")
    assert load_config(path, ["experiment.name=changed"]).experiment.name == "changed"


def test_yaml_scientific_float_in_a_file_is_a_float(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 2e-5\n", encoding="utf-8")
    assert load_config(path).training.learning_rate == 2e-5


def test_malformed_yaml_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("experiment:\n  name: x\n  seed: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line 4, column 1: "):
        load_config(path)


def test_malformed_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "experiment": {,}\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON at line 2, column 18: "):
        load_config(path)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the config is empty"):
        load_config(path)


def test_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping of sections"):
        load_config(path)


def test_missing_file_names_the_path_and_the_shipped_configs(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml .*quick_test"):
        load_config(missing)


@pytest.mark.parametrize("name", ["quick_test", "quick_test.yaml", "configs/quick_test.yaml"])
def test_bare_name_resolves_to_the_shipped_config(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # away from the checkout, as an installed user would be
    assert resolve_config_path(name) == shipped_configs_dir() / "quick_test.yaml"


def test_existing_path_wins_over_a_shipped_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    Path("quick_test.yaml").write_text("experiment:\n  name: local\n", encoding="utf-8")
    assert load_config("quick_test.yaml").experiment.name == "local"


def test_every_field_has_help_text() -> None:
    sections = [Config, SourceConfig, *(type(getattr(Config(), f.name)) for f in dataclasses.fields(Config))]
    missing = [
        f"{cls.__name__}.{f.name}" for cls in sections for f in dataclasses.fields(cls) if not f.metadata.get("help")
    ]
    assert missing == []


def test_committed_reference_is_up_to_date() -> None:
    committed = (REPO / "docs" / "config_reference.md").read_text(encoding="utf-8")
    assert committed == config_reference_markdown(), "run `python scripts/gen_config_reference.py`"


def test_importing_config_does_not_import_torch() -> None:
    code = "import sys, qlora_pipeline.config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_warmup_steps_replace_the_ratio_and_both_set_are_refused_naming_both() -> None:
    assert TrainingConfig().warmup_ratio == 0.03 and TrainingConfig().warmup_steps is None
    steps = Config.from_dict({"training": {"warmup_steps": 100, "lr_scheduler": "linear"}}).training
    assert (steps.warmup_steps, steps.warmup_ratio, steps.lr_scheduler) == (100, None, "linear")
    with pytest.raises(ConfigError, match=r"^training.warmup_steps \(100\) and warmup_ratio \(0.1\) are both set"):
        Config.from_dict({"training": {"warmup_steps": 100, "warmup_ratio": 0.1}})
    # An archived config (warmup_ratio filled in) with warmup_steps set on top says what to do.
    again = Config.from_dict(Config().to_dict(), ["training.warmup_ratio=null", "training.warmup_steps=5"])
    assert again.training.warmup_steps == 5
    record = Config().to_dict()  # the default fills warmup_ratio in, and reads back the same
    assert Config.from_dict(record).to_dict() == record


def test_lr_scheduler_and_auc_early_stopping_metrics_are_choices() -> None:
    with pytest.raises(ConfigError, match="training.lr_scheduler must be one of 'cosine', 'linear', 'constant_with"):
        Config.from_dict({"training": {"lr_scheduler": "polynomial"}})
    for metric in ("roc_auc", "pr_auc"):
        assert (
            Config.from_dict({"training": {"early_stopping_metric": metric}}).training.early_stopping_metric == metric
        )


def test_a_dataset_name_may_be_any_text_but_not_empty_or_multiline() -> None:
    assert Config.from_dict({"data": {"sources": [{"name": "评论"}]}}).data.sources[0].name == "评论"
    for bad in ("", "  ", "a\nb"):
        with pytest.raises(ConfigError, match="data.sources\\[0\\].name must be a non-empty name"):
            Config.from_dict({"data": {"sources": [{"name": bad}]}})

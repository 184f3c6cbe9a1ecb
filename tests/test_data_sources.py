"""Sources and label rules: every file kind, save_to_disk folders, the hub offline, and each labelling rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from qlora_pipeline.config import Config, SourceConfig
from qlora_pipeline.data.sources import load_source
from qlora_pipeline.errors import ConfigError, DataError


def local(path: Path, **fields: Any) -> SourceConfig:
    return SourceConfig(name="mine", type="local", path=str(path), **fields)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_string_labels_follow_label_names_order(tmp_path: Path) -> None:
    records = [{"text": t, "label": v} for t, v in [("hi", "violation"), ("ok", "normal"), ("hm", "suspicious")]]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    data = load_source(local(path, label_names=["normal", "suspicious", "violation"]))
    assert data.frame["label"].tolist() == [2, 0, 1]


def test_tsv_pair_source_keeps_both_texts(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    path.write_text("s1\ts2\ty\n花呗怎么还\t花呗如何还款\t1\n借呗额度\t花呗分期\t0\n", encoding="utf-8")
    data = load_source(local(path, text_column="s1", text_pair_column="s2", label_column="y"))
    pairs = data.frame[["text", "text_pair"]].values.tolist()
    assert pairs == [["花呗怎么还", "花呗如何还款"], ["借呗额度", "花呗分期"]]


def test_parquet_source_reads_numeric_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a b", "c d"], "label": [1, 0]}).to_parquet(path)
    assert load_source(local(path)).frame["label"].tolist() == [1, 0]


def test_missing_pair_column_lists_existing_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(DataError, match="has no column 'second'; its columns are text, label"):
        load_source(local(path, text_pair_column="second"))


def test_label_map_turns_numbers_into_class_names(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0}])
    data = load_source(local(path, labels={"map": {0: "civil", 1: "uncivil"}}))
    assert data.label_names == ("civil", "uncivil")
    assert data.frame["label"].tolist() == [1, 0]


def test_label_map_unmapped_value_shows_examples_and_counts(tmp_path: Path) -> None:
    records = [{"text": t, "label": v} for t, v in [("a", "pos"), ("b", "meh"), ("c", "meh"), ("d", "neg")]]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"2 label values .* not a key of labels.map .*'meh' \(2 rows\)"):
        load_source(local(path, labels={"map": {"pos": "positive", "neg": "negative"}}))


def test_label_map_drop_rule_drops_and_counts_the_rest(tmp_path: Path) -> None:
    records = [{"text": t, "label": v} for t, v in [("a", -1), ("b", 0), ("c", 1), ("d", 1)]]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data = load_source(local(path, labels={"map": {"-1": "uncivil", "1": "civil"}, "unmatched": "drop"}))
    assert (data.frame["text"].tolist(), data.label_dropped) == (["a", "c", "d"], 1)


def test_threshold_on_a_score_makes_two_classes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i), "toxicity": s} for i, s in enumerate([0.1, 0.5, 0.9])])
    source = local(path, label_column="toxicity", label_names=["civil", "uncivil"], labels={"threshold": 0.5})
    assert load_source(source).frame["label"].tolist() == [0, 1, 1]


def test_threshold_missing_score_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "score": 0.7}, {"text": "b", "score": None}])
    with pytest.raises(DataError, match=r"not a numeric score for threshold 0.5: '<missing>' \(1 rows\)"):
        load_source(local(path, label_column="score", labels={"threshold": 0.5}))


def test_positive_set_over_label_lists(tmp_path: Path) -> None:
    records = [{"text": "a", "labels": ["anger", "joy"]}, {"text": "b", "labels": ["joy"]}, {"text": "c", "labels": []}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    source = local(path, label_column="labels", labels={"positive": ["anger"], "unmatched": "drop"})
    data = load_source(source)
    assert (data.frame["label"].tolist(), data.label_dropped) == ([1, 0], 1)


def test_positive_and_negative_sets_drop_rows_in_neither(tmp_path: Path) -> None:
    records = [{"text": t, "labels": v} for t, v in [("a", ["anger"]), ("b", ["neutral"]), ("c", ["joy"])]]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    labels = {"positive": ["anger"], "negative": ["neutral"], "unmatched": "drop"}
    data = load_source(local(path, label_column="labels", labels=labels))
    assert data.frame["text"].tolist() == ["a", "b"]


def test_split_column_values_outside_splits_are_an_error(tmp_path: Path) -> None:
    records = [{"text": "a", "label": 0, "part": "dev"}, {"text": "b", "label": 1, "part": "train"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"split_column 'part' has values not named in splits .*'dev' \(1 rows\)"):
        load_source(local(path, split_column="part"))


def test_save_to_disk_dataset_dict_keeps_named_splits_and_class_names(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "labels": datasets.Sequence(datasets.ClassLabel(names=["joy", "anger"]))}
    )
    part = {"text": ["x", "y"], "labels": [[1], [0]]}
    saved = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(part, features), "dev": datasets.Dataset.from_dict(part, features)}
    )
    saved.save_to_disk(str(tmp_path / "ds"))
    source = local(
        tmp_path / "ds", label_column="labels", splits={"train": "train", "test": "dev"}, labels={"positive": ["anger"]}
    )
    frame = load_source(source).frame
    assert frame[["split", "label"]].values.tolist() == [["train", 1], ["train", 0], ["test", 1], ["test", 0]]


def test_hub_source_offline_names_dataset_and_local_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    source = SourceConfig(name="cc", type="hub", dataset="google/civil_comments")
    with pytest.raises(DataError, match=r"cannot load hub dataset 'google/civil_comments' .*type: local, path: "):
        load_source(source)


def config_error(source: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"data": {"sources": [source]}})
    return str(caught.value)


def test_config_refuses_two_label_rules() -> None:
    message = config_error({"name": "a", "labels": {"map": {"x": "y"}, "threshold": 0.5}})
    assert message.startswith("data.sources[0].labels.threshold cannot be combined with map")


def test_config_refuses_threshold_with_three_classes() -> None:
    message = config_error({"name": "a", "label_names": ["a", "b", "c"], "labels": {"threshold": 0.5}})
    assert message.startswith("data.sources[0].label_names must name exactly 2 classes")


def test_config_requires_a_dataset_id_for_hub_sources() -> None:
    assert config_error({"name": "a", "type": "hub"}).startswith("data.sources[0].dataset is required")


def test_config_refuses_unknown_split_names() -> None:
    message = config_error({"name": "a", "type": "hub", "dataset": "x/y", "splits": {"dev": "validation"}})
    assert message.startswith("data.sources[0].splits must be keyed by train, validation, test")


def test_hub_source_loads_each_named_split_with_its_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(dataset: str, subset: str | None, split: str, revision: str | None) -> datasets.Dataset:
        calls.append((dataset, subset, split))
        return datasets.Dataset.from_dict({"text": [f"{split} one", f"{split} two"], "toxicity": [0.9, 0.1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = SourceConfig(
        name="cc",
        type="hub",
        dataset="org/corpus",
        subset="en",
        splits={"train": "train", "test": "validation"},
        label_column="toxicity",
        labels={"threshold": 0.5},
    )
    frame = load_source(source).frame
    assert calls == [("org/corpus", "en", "train"), ("org/corpus", "en", "validation")]
    assert frame[["id", "split", "label"]].values.tolist() == [
        ["cc:train:0", "train", 1],
        ["cc:train:1", "train", 0],
        ["cc:test:0", "test", 1],
        ["cc:test:1", "test", 0],
    ]

"""The data shapes the original recipes used: one file per split of one dataset (`files:`), and a default class for
label values no rule covers (`labels.unmatched: <class name>`), counted in data_summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from qlora_pipeline.config import Config, DataConfig, SourceConfig
from qlora_pipeline.data.prepare import prepare_data
from qlora_pipeline.data.sources import load_source
from qlora_pipeline.errors import ConfigError, DataError

NAMES = ["normal", "suspicious", "violation"]


def write(path: Path, start: int, count: int, labels: list[str] = NAMES) -> str:
    """`count` distinct texts, labels cycling through `labels`."""
    texts = [f"message number {i} here" for i in range(start, start + count)]
    frame = pd.DataFrame({"text": texts, "label": [labels[i % len(labels)] for i in range(count)]})
    frame.to_json(path, orient="records", lines=True, force_ascii=False)
    return str(path)


def files_source(tmp_path: Path, **fields: Any) -> SourceConfig:
    files = {
        "train": write(tmp_path / "train.jsonl", 0, 120),
        "test": write(tmp_path / "test.jsonl", 1000, 30),
    }
    files.update(fields.pop("files", {}))
    return SourceConfig(name="mod", type="local", files=files, label_names=NAMES, **fields)


def test_split_files_keep_their_splits_and_validation_is_carved_from_train(tmp_path: Path) -> None:
    splits = prepare_data(DataConfig(sources=[files_source(tmp_path)]), seed=0).splits
    assert set(splits.test["id"]) == {f"mod:test:{i}" for i in range(30)}
    assert len(splits.validation) > 0
    assert all(i.startswith("mod:train:") for i in [*splits.train["id"], *splits.validation["id"]])
    assert len(splits.train) + len(splits.validation) == 120


def test_a_validation_file_is_kept_as_the_validation_split(tmp_path: Path) -> None:
    validation = write(tmp_path / "val.jsonl", 2000, 21)
    splits = prepare_data(DataConfig(sources=[files_source(tmp_path, files={"validation": validation})]), seed=0).splits
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (120, 21, 30)
    assert set(splits.validation["id"]) == {f"mod:validation:{i}" for i in range(21)}


def test_split_files_fingerprint_covers_every_file(tmp_path: Path) -> None:
    first = load_source(files_source(tmp_path)).sha256
    other_test = write(tmp_path / "other_test.jsonl", 5000, 30)
    assert load_source(files_source(tmp_path, files={"test": other_test})).sha256 != first
    assert load_source(files_source(tmp_path)).sha256 == first


def test_a_missing_split_file_names_the_split_and_the_path(tmp_path: Path) -> None:
    source = files_source(tmp_path, files={"test": str(tmp_path / "nope.jsonl")})
    with pytest.raises(DataError, match=r"files.test: file not found: .*nope.jsonl \(check data.sources\[\].files\)"):
        load_source(source)


def test_a_split_file_without_the_label_column_is_named(tmp_path: Path) -> None:
    unlabelled = tmp_path / "unlabelled.jsonl"
    pd.DataFrame({"text": ["a b c", "d e f"]}).to_json(unlabelled, orient="records", lines=True)
    with pytest.raises(DataError, match=r"files.test \(unlabelled.jsonl\) has no column 'label'"):
        load_source(files_source(tmp_path, files={"test": str(unlabelled)}))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"type": "local", "path": "a.csv", "files": {"train": "t.csv"}}, "path cannot be combined with files"),
        ({"type": "local", "files": {"test": "t.csv"}}, "files must be a mapping that names the train file"),
        ({"type": "local", "files": {"train": "t.csv", "dev": "d.csv"}}, r"unknown: \['dev'\]"),
        ({"type": "hub", "dataset": "x/y", "files": {"train": "t.csv"}}, "files is only read when type is 'local'"),
    ],
)
def test_config_refuses_files_that_cannot_work(source: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"data": {"sources": [{"name": "s", **source}]}})


def test_unmatched_labels_get_the_default_class_and_are_counted(tmp_path: Path) -> None:
    labels = ["normal", "spam", "violation", "suspicious", "??"]
    path = write(tmp_path / "d.jsonl", 0, 150, labels)
    source = SourceConfig(
        name="mod",
        type="local",
        path=path,
        label_names=NAMES,
        labels={"unmatched": "normal"},  # type: ignore[arg-type]
    )
    prepared = prepare_data(DataConfig(sources=[source]), seed=0)
    record = json.loads(json.dumps(prepared.summary))["sources"][0]
    assert record["rows_label_defaulted"] == 60  # 'spam' and '??': 30 rows each
    assert record["classes_read"] == {"normal": 90, "suspicious": 30, "violation": 30}
    assert prepared.summary["removed"]["unmatched_label"] == 0


def test_default_class_works_with_a_label_map(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", 0, 6, ["0", "1", "7"])
    source = SourceConfig(
        name="m",
        type="local",
        path=path,
        labels={"map": {"0": "civil", "1": "uncivil"}, "unmatched": "civil"},  # type: ignore[arg-type]
    )
    data = load_source(source)
    assert (data.frame["label"].tolist(), data.label_defaulted) == ([0, 1, 0, 0, 1, 0], 2)


def test_report_counts_the_rows_given_the_default_class(tmp_path: Path) -> None:
    from qlora_pipeline.reporting.report import data_section

    path = write(tmp_path / "d.jsonl", 0, 150, ["normal", "spam", "violation", "suspicious", "??"])
    source = SourceConfig(name="mod", type="local", path=path, label_names=NAMES, labels={"unmatched": "normal"})  # type: ignore[arg-type]
    summary = json.loads(json.dumps(prepare_data(DataConfig(sources=[source]), seed=0).summary))
    assert "| mod | " in "\n".join(data_section(summary)) and "| 60 |" in "\n".join(data_section(summary))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"label_names": NAMES, "labels": {"unmatched": "other"}}, r"one of the classes \['normal'"),
        ({"labels": {"unmatched": "other"}}, "set label_names"),
        ({"labels": {"threshold": 0.5, "unmatched": "neutral"}}, r"\['negative', 'positive'\]"),
    ],
)
def test_config_refuses_a_default_class_that_is_not_a_class(source: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"data": {"sources": [{"name": "s", "type": "local", "path": "a.csv", **source}]}})

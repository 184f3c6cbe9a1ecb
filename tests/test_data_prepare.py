"""Cleaning options, the source's own splits, leakage checks, balancing, and the data summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from qlora_pipeline.config import DataConfig, SourceConfig
from qlora_pipeline.data.clean import clean
from qlora_pipeline.data.prepare import prepare_data
from qlora_pipeline.errors import DataError


def rows(texts: list[str], labels: list[int], pairs: list[str] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({"id": [f"d:{i}" for i in range(len(texts))], "dataset": "d", "text": texts})
    if pairs is not None:
        frame["text_pair"] = pairs
    return frame.assign(label=labels)


def corpus(path: Path, per_class: tuple[int, int], **extra: list[Any]) -> str:
    """A JSONL file with distinct texts: `per_class[c]` rows of class c."""
    labels = [c for c, n in enumerate(per_class) for _ in range(n)]
    frame = pd.DataFrame({"text": [f"review number {i} of class {c}" for i, c in enumerate(labels)], "label": labels})
    frame.assign(**extra).to_json(path, orient="records", lines=True, force_ascii=False)
    return str(path)


def config(path: str, **fields: Any) -> DataConfig:
    source_fields = fields.pop("source", {})
    return DataConfig(sources=[SourceConfig(name="mine", type="local", path=path, **source_fields)], **fields)


def test_urls_and_mentions_are_masked_and_text_lower_cased() -> None:
    cfg = DataConfig(mask_urls=True, mask_mentions=True, lowercase=True)
    cleaned, _ = clean(rows(["@Bob See https://x.org/a?b=1 NOW, mail a@b.com"], [0]), cfg)
    assert cleaned["text"].tolist() == ["@user see <url> now, mail a@b.com"]


def test_near_duplicates_are_counted_apart_from_exact_ones() -> None:
    cleaned, removed = clean(rows(["Hello, World!", "hello world", "Hello, World!"], [1, 1, 1]), DataConfig())
    assert (cleaned["text"].tolist(), removed["duplicates"], removed["near_duplicates"]) == (["Hello, World!"], 1, 1)


def test_pairs_are_duplicates_only_when_both_texts_match() -> None:
    frame = rows(["q one", "q one", "q one"], [0, 0, 0], pairs=["yes a", "yes b", "yes a"])
    cleaned, removed = clean(frame, DataConfig())
    assert (cleaned["text_pair"].tolist(), removed["duplicates"]) == (["yes a", "yes b"], 1)


def test_zero_rows_after_cleaning_names_every_step(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    pd.DataFrame({"text": ["x", "y", " "], "label": [0, 1, 0]}).to_json(path, orient="records", lines=True)
    expected = r"no rows left after cleaning \(3 read; .*empty_after_cleaning: 1, too_short: 2"
    with pytest.raises(DataError, match=expected):
        prepare_data(config(str(path)), seed=0)


def test_source_splits_are_kept_and_missing_validation_is_carved_from_train(tmp_path: Path) -> None:
    parts = ["train"] * 60 + ["test"] * 10 + ["train"] * 60 + ["test"] * 10
    path = corpus(tmp_path / "d.jsonl", (70, 70), part=parts)
    splits = prepare_data(config(path, source={"split_column": "part"}), seed=0).splits
    test_ids = {f"mine:{i}" for i in [*range(60, 70), *range(130, 140)]}
    assert set(splits.test["id"]) == test_ids
    assert len(splits.validation) > 0 and not set(splits.validation["id"]) & test_ids


def test_pair_sources_keep_text_pair_in_every_split(tmp_path: Path) -> None:
    path = corpus(tmp_path / "d.jsonl", (20, 20), second=[f"other {i}" for i in range(40)])
    splits = prepare_data(config(path, source={"text_pair_column": "second"}), seed=0).splits
    assert all("text_pair" in splits.get(n) and splits.get(n)["text_pair"].notna().all() for n in ("train", "test"))


def test_single_texts_have_no_text_pair_column(tmp_path: Path) -> None:
    splits = prepare_data(config(corpus(tmp_path / "d.jsonl", (20, 20))), seed=0).splits
    assert "text_pair" not in splits.train.columns


def test_normalized_leakage_is_reported_when_near_duplicates_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    texts = [f"Review {i}" for i in range(40)] + [f"review {i}!" for i in range(40)]
    frame = pd.DataFrame({"text": texts, "label": [i % 2 for i in range(40)] * 2})
    frame.to_json(path, orient="records", lines=True)
    summary = prepare_data(config(str(path), dedupe_normalized=False), seed=0).summary
    assert summary["cross_split_overlap"] == 0 and summary["cross_split_overlap_normalized"] > 0


def test_single_class_split_is_a_data_error(tmp_path: Path) -> None:
    parts = ["train"] * 40 + ["test"] * 5 + ["train"] * 40
    path = corpus(tmp_path / "d.jsonl", (45, 40), part=parts)
    with pytest.raises(DataError, match=r"the test split holds a single class \(0\)"):
        prepare_data(config(path, source={"split_column": "part"}), seed=0)


def test_upsampling_balances_train_only(tmp_path: Path) -> None:
    path = corpus(tmp_path / "d.jsonl", (80, 20))
    plain = prepare_data(config(path), seed=0)
    balanced = prepare_data(config(path, balance="upsample"), seed=0)
    counts = balanced.splits.train["label"].value_counts()
    assert counts[0] == counts[1]
    assert balanced.splits.test.equals(plain.splits.test)


def test_downsampling_keeps_distinct_rows(tmp_path: Path) -> None:
    train = prepare_data(config(corpus(tmp_path / "d.jsonl", (80, 20)), balance="downsample"), seed=0).splits.train
    counts = train["label"].value_counts()
    assert counts[0] == counts[1] and train["id"].is_unique


def test_class_weights_are_total_over_classes_times_count(tmp_path: Path) -> None:
    prepared = prepare_data(config(corpus(tmp_path / "d.jsonl", (80, 20)), balance="class_weights"), seed=0)
    counts = prepared.splits.train["label"].value_counts()
    total = len(prepared.splits.train)
    assert prepared.class_weights == {c: round(total / (2 * counts[c]), 6) for c in (0, 1)}


def test_summary_records_sources_balancing_and_is_json(tmp_path: Path) -> None:
    summary = prepare_data(config(corpus(tmp_path / "d.jsonl", (30, 20)), balance="class_weights"), seed=0).summary
    record = json.loads(json.dumps(summary))
    assert record["sources"][0]["classes_read"] == {"0": 30, "1": 20}
    assert record["balancing"]["method"] == "class_weights" and record["balancing"]["class_weights"]


def test_report_data_section_shows_sources_and_balancing(tmp_path: Path) -> None:
    from qlora_pipeline.reporting.report import data_section

    summary = prepare_data(config(corpus(tmp_path / "d.jsonl", (30, 20)), balance="upsample"), seed=0).summary
    text = "\n".join(data_section(json.loads(json.dumps(summary))))
    assert "| mine |" in text and "Class balance: train upsampled per dataset" in text


def test_bad_data_through_the_cli_is_one_line_exit_2_and_a_failed_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qlora_pipeline.cli import main

    data = corpus(tmp_path / "d.jsonl", (10, 10))
    cfg = tmp_path / "c.yaml"
    source = f"{{name: mine, type: local, path: '{data}', labels: {{map: {{'0': negative}}}}}}"
    cfg.write_text(f"data: {{sources: [{source}]}}\n", encoding="utf-8")
    assert main(["run", "--config", str(cfg), "--output-dir", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qlora: error: data source 'mine'") and "'1' (10 rows)" in last
    assert json.loads((tmp_path / "out" / "run_001" / "status.json").read_text())["state"] == "failed"


def test_mixing_pair_and_single_text_sources_is_a_data_error(tmp_path: Path) -> None:
    pairs = corpus(tmp_path / "p.jsonl", (20, 20), second=[f"other {i}" for i in range(40)])
    single = corpus(tmp_path / "s.jsonl", (20, 20))
    sources = [
        SourceConfig(name="pairs", type="local", path=pairs, text_pair_column="second"),
        SourceConfig(name="single", type="local", path=single),
    ]
    with pytest.raises(DataError, match=r"data sources \['pairs'\] have text pairs but the others"):
        prepare_data(DataConfig(sources=sources), seed=0)


def test_max_samples_keeps_the_share_of_each_source_split(tmp_path: Path) -> None:
    parts = (["train"] * 80 + ["test"] * 20) * 2
    path = corpus(tmp_path / "d.jsonl", (100, 100), part=parts)
    splits = prepare_data(config(path, max_samples=100, source={"split_column": "part"}), seed=0).splits
    assert len(splits.test) == 20

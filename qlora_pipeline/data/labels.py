"""Labels: raw label values (strings, numbers, scores, lists) become class indices by one rule per source.

Rules (config `data.sources[].labels`): `map` (value -> class name), `threshold` (score >= t -> second
class), `positive` (+ optional `negative`) sets over list-valued labels, or none of them (values are the
class names or their indices). Rows no rule covers stop the run with examples, are dropped and counted, or
get a default class (`unmatched: <class name>`) and are counted. All vectorized: a million labels map in well
under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from qlora_pipeline.config import BINARY_DEFAULT_NAMES
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import SourceConfig


@dataclass(frozen=True)
class Labelled:
    codes: pd.Series  # int class index per kept row, index aligned with the input
    keep: pd.Series  # bool per input row: False where no rule covered the row and unmatched is drop
    names: tuple[str, ...]
    defaulted: int = 0  # rows no rule covered that got labels.unmatched's class


def as_text(values: pd.Series) -> pd.Series:
    """Label values as text the config can name: '1' for 1 and 1.0, 'true' for True, strings stripped."""
    if pd.api.types.is_bool_dtype(values):
        return values.map({True: "true", False: "false"})
    text = values.astype(str).str.strip().str.replace(r"^(-?\d+)\.0+$", r"\1", regex=True)
    return text.where(values.notna(), None)


def with_names(values: pd.Series, value_names: tuple[str, ...] | None) -> pd.Series:
    """Hub ClassLabel ids read as their names ('anger' for 2), so configs can write either."""
    if value_names is None:
        return pd.Series(None, index=values.index, dtype=object)
    return pd.to_numeric(values, errors="coerce").map(dict(enumerate(value_names)))


def apply_labels(values: pd.Series, source: SourceConfig, value_names: tuple[str, ...] | None = None) -> Labelled:
    """Apply the source's label rule to its label column; raise DataError on rows no rule covers."""
    rules = source.labels
    values = values.reset_index(drop=True)
    if rules.threshold is not None:
        names = _binary_names(source)
        scores = pd.to_numeric(values, errors="coerce")
        codes = (scores >= rules.threshold).astype(int)
        wanted = f"a numeric score for threshold {rules.threshold:g}"
        return _finish(values, codes, scores.notna(), names, source, wanted)
    if rules.positive is not None:
        names = _binary_names(source)
        exploded = values.explode()
        text = as_text(exploded)
        named = with_names(exploded, value_names)
        is_pos = (text.isin(rules.positive) | named.isin(rules.positive)).groupby(level=0).any()
        has_value = exploded.notna().groupby(level=0).any()
        if rules.negative is None:
            matched = has_value
        else:
            is_neg = (text.isin(rules.negative) | named.isin(rules.negative)).groupby(level=0).any()
            matched = is_pos | is_neg
        return _finish(values, is_pos.astype(int), matched, names, source, "a value in labels.positive/negative")
    text = as_text(values)
    named = with_names(values, value_names)
    if rules.map is not None:
        names = tuple(source.label_names) if source.label_names else tuple(dict.fromkeys(rules.map.values()))
        index = {name: i for i, name in enumerate(names)}
        lookup = {raw: index[name] for raw, name in rules.map.items()}
        codes = named.map(lookup).fillna(text.map(lookup))
        return _finish(values, codes, codes.notna(), names, source, f"a key of labels.map {list(rules.map)}")
    if source.label_names:
        names = tuple(source.label_names)
        lookup = {name: i for i, name in enumerate(names)}
        lookup.update({str(i): i for i in range(len(names))})  # integer labels may be indices into label_names
    elif value_names is not None:
        names = value_names
        lookup = {name: i for i, name in enumerate(names)}
        lookup.update({str(i): i for i in range(len(names))})
    else:
        distinct = sorted(text.dropna().unique(), key=lambda v: (not v.lstrip("-").isdigit(), _int_or(v), v))
        names = tuple(distinct)
        lookup = {name: i for i, name in enumerate(names)}
    codes = text.map(lookup)
    return _finish(values, codes, codes.notna(), names, source, f"one of label_names {list(names)}")


def _binary_names(source: SourceConfig) -> tuple[str, ...]:
    return tuple(source.label_names) if source.label_names else BINARY_DEFAULT_NAMES


def _finish(
    values: pd.Series, codes: pd.Series, matched: pd.Series, names: tuple[str, ...], source: SourceConfig, wanted: str
) -> Labelled:
    matched = matched.astype(bool)
    default = source.labels.default_class
    if default is not None:
        if default not in names:
            raise DataError(
                f"data source '{source.name}': labels.unmatched names the class {default!r}, but the classes are "
                f"{list(names)}; set it to one of them (or set label_names)"
            )
        if len(names) < 2:
            raise DataError(f"data source '{source.name}': only one class ({names[0]!r}); need at least two")
        defaulted = int((~matched).sum())
        filled = codes.where(matched, names.index(default)).astype(int)
        return Labelled(filled, pd.Series(True, index=matched.index), names, defaulted)
    if not matched.all() and source.labels.unmatched == "error":
        shown_values = as_text(values[~matched].map(lambda v: v if not _is_listlike(v) else list(v)))
        shown_values = shown_values.fillna("<missing>").map(_one_line)
        unknown = shown_values.value_counts().head(5)
        shown = ", ".join(f"'{v}' ({n} rows) at {_rows_at(shown_values, v)}" for v, n in unknown.items())
        raise DataError(
            f"data source '{source.name}': {int((~matched).sum())} label values in column '{source.label_column}' "
            f"are not {wanted}: {shown}; cover them in the config, or set labels.unmatched: drop "
            "(or a class name to give them that class)"
        )
    if len(names) < 2:
        raise DataError(f"data source '{source.name}': only one class ({names[0]!r}); need at least two")
    return Labelled(codes[matched].astype(int), matched, names)


def _rows_at(values: pd.Series, value: str, shown: int = 3) -> str:
    """Where `value` occurs: its first data rows, numbered from 1 after any header (`values` keeps the source's row
    index), so row N of a CSV file is its line N+1."""
    rows = [int(i) + 1 for i in values.index[values == value][:shown]]
    more = " …" if int((values == value).sum()) > shown else ""
    return ("data row " if len(rows) == 1 else "data rows ") + ", ".join(map(str, rows)) + more


def _one_line(text: str) -> str:
    """A label value as one line of an error message (line breaks and control characters escaped), shortened."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= 40 else text[:37] + "..."


def _is_listlike(value: object) -> bool:
    return pd.api.types.is_list_like(value) and not isinstance(value, str)


def _int_or(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return 0

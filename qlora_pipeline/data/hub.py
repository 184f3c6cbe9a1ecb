"""Hugging Face datasets: hub ids via `datasets.load_dataset`, and folders written by `save_to_disk`.

`datasets` is imported here only, so configs without such sources never pay for it. Offline or
unreachable, a hub source fails with one line naming the dataset and how to use a local copy instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from qlora_pipeline.data.table import SourceData, from_table
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import SourceConfig


def load_hub(source: SourceConfig) -> SourceData:
    parts, origin = load_hub_splits(source)
    where = f"{source.dataset}" + (f" ({source.subset})" if source.subset else "")
    return _from_datasets(parts, source, where, origin, keep_splits=source.splits is not None)


def load_hub_splits(source: SourceConfig) -> tuple[dict[str, Any], str]:
    """The source's hub splits as `datasets.Dataset`s ({our split: dataset}) and their origin for the record;
    unreachable or missing ones stop the run with one line saying how to use a local copy."""
    import datasets

    assert source.dataset is not None  # the config refuses a hub source without a dataset id
    parts = {}
    for ours, theirs in (source.splits or {"train": source.split}).items():
        try:
            parts[ours] = datasets.load_dataset(source.dataset, source.subset, split=theirs, revision=source.revision)
        except (ConnectionError, FileNotFoundError) as exc:
            raise DataError(unreachable_message(source, exc)) from exc
        except ValueError as exc:
            if "split" not in str(exc).lower():
                raise
            raise DataError(
                f"data source '{source.name}': {source.dataset} has no split '{theirs}' "
                f"({str(exc).splitlines()[0]}); check split / splits"
            ) from exc
    origin = f"hub:{source.dataset}" + (f"/{source.subset}" if source.subset else "")
    if source.revision:
        origin += f"@{source.revision}"
    return parts, origin


def unreachable_message(source: SourceConfig, exc: BaseException) -> str:
    subset = f", '{source.subset}'" if source.subset else ""
    return (
        f"data source '{source.name}': cannot load hub dataset '{source.dataset}' "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'offline'}); "
        f"to use a local copy, save it where the hub is reachable "
        f"(datasets.load_dataset('{source.dataset}'{subset}).save_to_disk('data/{source.name}')) "
        f"or export a .csv/.jsonl/.parquet, then set type: local, path: data/{source.name} "
        f"and remove dataset/subset/revision"
    )


def load_saved(source: SourceConfig, path: Path) -> SourceData:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    import datasets

    loaded = read_saved(source, path)
    if isinstance(loaded, datasets.DatasetDict):
        if source.split_column is not None:
            raise DataError(
                f"data source '{source.name}': {path} holds splits {list(loaded)}; "
                "name them in splits instead of split_column"
            )
        parts = saved_splits(source, path, loaded)
        return _from_datasets(parts, source, path.name, str(path.resolve()), keep_splits=source.splits is not None)
    if source.splits is not None and source.split_column is None:
        raise DataError(
            f"data source '{source.name}': {path} holds a single split; "
            "set split_column to the column that names each row's split, or remove splits"
        )
    return _from_datasets({"train": loaded}, source, path.name, str(path.resolve()), keep_splits=False)


def read_saved(source: SourceConfig, path: Path) -> Any:
    """The `Dataset` or `DatasetDict` a save_to_disk folder holds; another folder, or an `encoding` (read for text
    files only), is refused with one line."""
    import datasets

    if source.encoding is not None:
        raise DataError(
            f"data source '{source.name}': encoding is only read for text files, and {path} is a folder "
            "(save_to_disk); remove it"
        )
    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(
            f"data source '{source.name}': {path} is a folder but not one written by datasets' save_to_disk "
            f"({str(exc).splitlines()[0]}); point path at a file or a save_to_disk folder"
        ) from exc


def saved_splits(source: SourceConfig, path: Path, loaded: Any) -> dict[str, Any]:
    """The splits `split` / `splits` name in a saved `DatasetDict`, as {our split: dataset}; an absent one is
    refused, naming the splits there are."""
    wanted = source.splits or {"train": source.split}
    absent = sorted(set(wanted.values()) - set(loaded))
    if absent:
        raise DataError(
            f"data source '{source.name}': {path} has no split {', '.join(map(repr, absent))}; "
            f"its splits are {', '.join(loaded)} (check split / splits)"
        )
    return {ours: loaded[theirs] for ours, theirs in wanted.items()}


def _from_datasets(
    parts: dict[str, Any], source: SourceConfig, where: str, origin: str, keep_splits: bool
) -> SourceData:
    frames = []
    value_names = None
    for ours, part in parts.items():
        frame = part.to_pandas()
        value_names = value_names or class_label_names(part.features.get(source.label_column))
        frame["__id__"] = [f"{source.name}:{ours}:{i}" for i in range(len(frame))] if keep_splits else None
        if keep_splits:
            frame["__split__"] = ours
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    if not keep_splits:
        table = table.drop(columns="__id__")
    return from_table(table, source, where, origin, content_digest(table), value_names)


def class_label_names(feature: Any) -> tuple[str, ...] | None:
    """Names of a ClassLabel column, or of the ClassLabel inside a list column (go_emotions' labels)."""
    for candidate in (feature, getattr(feature, "feature", None)):
        names = getattr(candidate, "names", None)
        if names:
            return tuple(names)
    return None


def content_digest(table: pd.DataFrame) -> str:
    """sha256 of the table's content (hub data has no single file to hash)."""
    hashable = table.copy()
    for column in [c for c in hashable.columns if hashable[c].dtype.kind == "O"]:
        first = hashable[column].dropna().head(1)
        if len(first) and pd.api.types.is_list_like(first.iloc[0]) and not isinstance(first.iloc[0], str):
            hashable[column] = hashable[column].map(lambda v: repr(list(v)) if v is not None else None)
    return hashlib.sha256(pd.util.hash_pandas_object(hashable, index=False).to_numpy().tobytes()).hexdigest()

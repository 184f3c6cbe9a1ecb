"""The data stage in one call: load every source, clean, sample, split, balance, and summarize what happened."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from qlora_pipeline.config import SPLIT_NAMES
from qlora_pipeline.data.balance import balance_record, class_weights, rebalance
from qlora_pipeline.data.clean import clean, length_stats
from qlora_pipeline.data.sources import load_source
from qlora_pipeline.data.split import (
    Splits,
    cross_split_overlap,
    make_splits,
    sample_per_dataset,
)
from qlora_pipeline.data.table import SourceData
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import DataConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    splits: Splits
    summary: dict[str, Any]  # written as data_summary.json and into the report
    # data.balance: class_weights -> {class index: total / (classes x count)} over train; else None.
    class_weights: dict[int, float] | None = None


def prepare_data(cfg: DataConfig, seed: int, loaded: list[SourceData] | None = None) -> PreparedData:
    """`loaded`: the sources already read (`load_source`, in `cfg.sources` order), as `qlora check` reads them."""
    sources = loaded if loaded is not None else [load_source(source) for source in cfg.sources]
    label_names = sources[0].label_names
    for source in sources[1:]:
        if source.label_names != label_names:
            raise DataError(
                f"data source '{source.name}' has classes {list(source.label_names)} but "
                f"'{sources[0].name}' has {list(label_names)}; give every source the same label_names"
            )
    pairs = {s.name: "text_pair" in s.frame for s in sources}
    if len(set(pairs.values())) > 1:
        with_pairs = [name for name, has in pairs.items() if has]
        raise DataError(
            f"data sources {with_pairs} have text pairs but the others have single texts; "
            "one run takes one kind (set text_pair_column on all of them or none)"
        )
    raw = pd.concat([s.frame for s in sources], ignore_index=True)
    rows_read = sum(s.rows_read for s in sources)
    cleaned, cleaning_removed = clean(raw, cfg)
    removed = {"unmatched_label": sum(s.label_dropped for s in sources), **cleaning_removed}
    if cleaned.empty:
        steps = ", ".join(f"{k}: {v}" for k, v in removed.items())
        raise DataError(f"no rows left after cleaning ({rows_read} read; removed {steps}); check data.* settings")
    sampled = sample_per_dataset(cleaned, cfg.max_samples, seed)
    splits = make_splits(sampled, cfg, label_names, seed)
    overlap = cross_split_overlap(splits)
    overlap_normalized = cross_split_overlap(splits, normalized=True)
    if overlap_normalized:
        log.warning(
            "%d validation/test rows also appear in an earlier split (%d exactly, the rest after normalization); "
            "turn on data.dedupe and data.dedupe_normalized to prevent it",
            overlap_normalized,
            overlap,
        )
    split_counts_before = {name: split_counts(splits.get(name), label_names) for name in SPLIT_NAMES}
    weights = class_weights(splits.train["label"], len(label_names)) if cfg.balance == "class_weights" else None
    balanced_train = rebalance(splits.train, cfg.balance, seed)
    balancing = balance_record(splits.train, balanced_train, cfg.balance, weights, label_names)
    if balanced_train is not splits.train:
        splits = dataclasses.replace(splits, train=balanced_train)
    summary = {
        "label_names": list(label_names),
        "sources": [source_record(s) for s in sources],
        "rows_read": rows_read,
        "removed": removed,
        "rows_after_cleaning": len(cleaned),
        "rows_after_sampling": len(sampled),
        "splits": {name: split_counts(splits.get(name), label_names) for name in SPLIT_NAMES},
        "balancing": balancing,
        "text_length": length_stats(sampled["text"]),
        "cross_split_overlap": overlap,
        "cross_split_overlap_normalized": overlap_normalized,
        "fingerprint": splits.fingerprint(),
    }
    if balancing["method"] in ("upsample", "downsample"):
        summary["splits_before_balancing"] = split_counts_before
    log.info(
        "data: %d rows read, %d after cleaning, %d used; train/validation/test = %d/%d/%d",
        rows_read,
        len(cleaned),
        len(sampled),
        len(splits.train),
        len(splits.validation),
        len(splits.test),
    )
    return PreparedData(splits, summary, weights)


def source_record(source: SourceData) -> dict[str, Any]:
    return {
        "name": source.name,
        "origin": source.origin,
        "sha256": source.sha256,
        "rows_read": source.rows_read,
        "rows_label_dropped": source.label_dropped,
        "rows_label_defaulted": source.label_defaulted,  # labels.unmatched: <class name>
        "classes_read": source.classes_read,
        **(source.encoding or {}),  # text files: encoding, encoding_from (default, config or detected)
    }


def split_counts(frame: pd.DataFrame, label_names: tuple[str, ...]) -> dict[str, Any]:
    per_dataset: dict[str, dict[str, int]] = {}
    for (dataset, label), count in frame.groupby(["dataset", "label"]).size().items():
        per_dataset.setdefault(str(dataset), {})[label_names[int(label)]] = int(count)
    return {"rows": len(frame), "per_dataset": per_dataset}

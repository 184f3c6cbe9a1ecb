"""The data stage: load every source, clean, sample, split, and summarize what happened."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from qlora_pipeline.data.clean import clean
from qlora_pipeline.data.sources import load_source
from qlora_pipeline.data.split import (
    SPLIT_NAMES,
    Splits,
    cross_split_overlap,
    make_splits,
    sample_per_dataset,
)
from qlora_pipeline.errors import DataError

if TYPE_CHECKING:
    from qlora_pipeline.config import DataConfig

log = logging.getLogger(__name__)

__all__ = ["PreparedData", "Splits", "prepare_data"]


@dataclass(frozen=True)
class PreparedData:
    splits: Splits
    summary: dict[str, Any]  # written as data_summary.json and into the report


def prepare_data(cfg: DataConfig, seed: int) -> PreparedData:
    sources = [load_source(source) for source in cfg.sources]
    label_names = sources[0].label_names
    for source in sources[1:]:
        if source.label_names != label_names:
            raise DataError(
                f"data source '{source.name}' has classes {list(source.label_names)} but "
                f"'{sources[0].name}' has {list(label_names)}; give every source the same label_names"
            )
    raw = pd.concat([s.frame for s in sources], ignore_index=True)
    cleaned, removed = clean(raw, cfg)
    if cleaned.empty:
        steps = ", ".join(f"{k}: {v}" for k, v in removed.items())
        raise DataError(f"no rows left after cleaning ({len(raw)} read; removed {steps}); check data.* settings")
    sampled = sample_per_dataset(cleaned, cfg.max_samples, seed)
    splits = make_splits(sampled, cfg, label_names, seed)
    overlap = cross_split_overlap(splits)
    if overlap:
        log.warning("%d validation/test texts also appear in an earlier split (data.dedupe is off)", overlap)
    summary = {
        "label_names": list(label_names),
        "sources": [
            {"name": s.name, "origin": s.origin, "sha256": s.sha256, "rows_read": len(s.frame)} for s in sources
        ],
        "rows_read": len(raw),
        "removed": removed,
        "rows_after_cleaning": len(cleaned),
        "rows_after_sampling": len(sampled),
        "splits": {name: split_counts(splits.get(name), label_names) for name in SPLIT_NAMES},
        "text_length": length_stats(sampled["text"]),
        "cross_split_overlap": overlap,
        "fingerprint": splits.fingerprint(),
    }
    log.info(
        "data: %d rows read, %d after cleaning, %d used; train/validation/test = %d/%d/%d",
        len(raw),
        len(cleaned),
        len(sampled),
        len(splits.train),
        len(splits.validation),
        len(splits.test),
    )
    return PreparedData(splits, summary)


def split_counts(frame: pd.DataFrame, label_names: tuple[str, ...]) -> dict[str, Any]:
    per_dataset: dict[str, dict[str, int]] = {}
    for (dataset, label), count in frame.groupby(["dataset", "label"]).size().items():
        per_dataset.setdefault(str(dataset), {})[label_names[int(label)]] = int(count)
    return {"rows": len(frame), "per_dataset": per_dataset}


def length_stats(texts: pd.Series) -> dict[str, float]:
    lengths = texts.str.len()
    quantiles = lengths.quantile([0.5, 0.95])
    return {
        "min": int(lengths.min()),
        "median": round(float(quantiles[0.5]), 1),
        "mean": round(float(lengths.mean()), 1),
        "p95": round(float(quantiles[0.95]), 1),
        "max": int(lengths.max()),
    }

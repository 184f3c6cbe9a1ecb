"""One model per dataset (`experiment.per_dataset`): the head name its scores go under, what each dataset must
hold to train its own model, and its scores put back in the rows of the pooled splits, so the per-dataset model is
evaluated, reported and compared like any other head."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_pipeline.errors import DataError
from qlora_pipeline.evaluation.baseline import BASELINE
from qlora_pipeline.evaluation.metrics import HEADLINE

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.data.split import Splits

SUFFIX = "_per_dataset"
ZERO_SHOT = "zero_shot"  # lm_label runs: the base model's label-word scores before training

Scores = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (probabilities, predicted class), rows of the split


def head_name(primary: str) -> str:
    """`logreg` -> `logreg_per_dataset`: the per-dataset models' scores, beside the pooled head's."""
    return primary + SUFFIX


def check_dataset(own: Splits, dataset: str, tunes_threshold: bool) -> None:
    """A dataset trains its own model only when its train rows hold every class (a head cannot predict a class it
    never saw, and its probabilities would lack that column) and, to tune its threshold, its validation rows
    hold both classes."""
    names = own.label_names
    missing = [names[c] for c in range(len(names)) if c not in set(own.train["label"])]
    if missing:
        raise DataError(
            f"experiment.per_dataset: dataset '{dataset}' has no {', '.join(map(repr, missing))} rows in its train "
            "split, so its own model could not predict that class; set experiment.per_dataset: false, or give "
            "that dataset rows of every class"
        )
    if len(set(own.validation["label"])) < 2 and tunes_threshold:
        raise DataError(
            f"experiment.per_dataset: dataset '{dataset}' has fewer than two classes in its validation split "
            f"({len(own.validation)} rows), which tuning its own threshold needs; raise "
            "data.val_ratio or data.max_samples"
        )


def empty_scores(splits: Splits, wanted: Sequence[str]) -> Scores:
    """Zeros to fill dataset by dataset (`fill`): one row per row of each wanted split."""
    classes = len(splits.label_names)
    return {
        name: (np.zeros((len(splits.get(name)), classes)), np.zeros(len(splits.get(name)), dtype=int))
        for name in wanted
    }


def fill(
    scores: Scores, split: str, frame: pd.DataFrame, dataset: str, proba: np.ndarray, predicted: np.ndarray
) -> None:
    """Put one dataset's scores into its rows of `split` (`frame` is that split, pooled)."""
    rows = (frame["dataset"] == dataset).to_numpy()
    if int(rows.sum()) != len(proba):
        raise ValueError(f"{len(proba)} scores for the {int(rows.sum())} rows of {dataset} in {split}")
    scores[split][0][rows] = proba
    scores[split][1][rows] = predicted


def ordered(
    pooled: dict[str, pd.DataFrame], per_dataset: dict[str, pd.DataFrame], first_pooled: bool
) -> dict[str, pd.DataFrame]:
    """Heads in the order evaluation reads them (the first is primary): the pooled model's heads, then the
    per-dataset ones, then the references (zero-shot, the baseline) — or per-dataset first when there is no pooled
    model (`first_pooled` false)."""
    references = [name for name in (ZERO_SHOT, BASELINE) if name in pooled]
    models = {name: frame for name, frame in pooled.items() if name not in references}
    heads = {**models, **per_dataset} if first_pooled else {**per_dataset, **models}
    return {**heads, **{name: pooled[name] for name in references}}


def lift_record(metrics: dict[str, Any], primary: str) -> dict[str, Any]:
    """metrics.json's `zero_shot_lift`: the tuned head minus the zero-shot scores, per split (overall and per
    dataset), for the headline metrics; empty when the run has no zero-shot head."""
    lift: dict[str, Any] = {}
    for split, heads in metrics.items():
        if ZERO_SHOT not in heads or primary not in heads:
            continue
        tuned, zero = heads[primary], heads[ZERO_SHOT]
        scopes = {"overall": (tuned["overall"], zero["overall"])}
        scopes.update({name: (tuned["per_dataset"][name], zero["per_dataset"][name]) for name in tuned["per_dataset"]})
        lift[split] = {
            scope: {key: _minus(ours.get(key), base.get(key)) for key in HEADLINE}
            for scope, (ours, base) in scopes.items()
        }
    return {"zero_shot_lift": lift} if lift else {}


def _minus(ours: Any, base: Any) -> float | None:
    return None if ours is None or base is None else round(float(ours) - float(base), 6)

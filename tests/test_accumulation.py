"""Gradient accumulation and data parallelism are exact: an optimizer step's loss is the weighted mean over all of its
examples, however they are split into micro-batches or processes. Both heads, class weights on and off, on the tiny
NF4 model (CPU, dropout 0, no length grouping): 8 x 1, 4 x 2 and 2 processes x 4 give the same loss at every step
and the same probabilities afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, accumulation_config, torchrun, train_briefly

TOLERANCE = 1e-4
CASES = [("classification", "balanced"), ("lm_label", "balanced"), ("classification", "none"), ("lm_label", "none")]
WEIGHTED, UNWEIGHTED = CASES[:2], CASES[2:]


Result = tuple[list[float], np.ndarray]


class References(dict[tuple[str, str], Result]):
    """The reference of each case, 8 x 1 in one process, trained on first use."""

    def __init__(self, folders: pytest.TempPathFactory) -> None:
        super().__init__()
        self.folders = folders

    def __missing__(self, case: tuple[str, str]) -> Result:
        self[case] = train_briefly(accumulation_config(*case, batch=8, accumulation=1), self.folders.mktemp("8x1"))
        return self[case]


@pytest.fixture(scope="module")
def one_batch_of_8(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory)


def assert_same_training(reference: Result, other: Result) -> None:
    (losses, proba), (other_losses, other_proba) = reference, other
    assert len(losses) == len(other_losses) == 3
    np.testing.assert_allclose(other_losses, losses, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(other_proba, proba, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("case", WEIGHTED, ids=lambda case: "-".join(case))
def test_four_by_two_trains_as_eight_by_one_with_class_weights(
    case: tuple[str, str], one_batch_of_8: References, tmp_path: Path
) -> None:
    accumulated = train_briefly(accumulation_config(*case, batch=4, accumulation=2), tmp_path)
    assert_same_training(one_batch_of_8[case], accumulated)


def test_the_data_tells_a_mean_per_micro_batch_apart(one_batch_of_8: References, tmp_path: Path) -> None:
    """The power of the tests above: averaging each micro-batch's own weighted mean (0.1.0's loss, still there as
    training.loss_normalization micro_batch for its archived runs) trains 4 x 2 measurably differently here."""
    case = WEIGHTED[0]
    legacy = accumulation_config(*case, 4, 2, "training.loss_normalization=micro_batch")
    losses, proba = train_briefly(legacy, tmp_path)
    reference_losses, reference_proba = one_batch_of_8[case]
    assert np.abs(np.array(losses) - reference_losses).max() > 1e-3
    assert np.abs(proba - reference_proba).max() > 1e-3


@pytest.mark.slow  # two more pairs of trainings
@pytest.mark.parametrize("case", UNWEIGHTED, ids=lambda case: "-".join(case))
def test_four_by_two_trains_as_eight_by_one_without_class_weights(
    case: tuple[str, str], one_batch_of_8: References, tmp_path: Path
) -> None:
    accumulated = train_briefly(accumulation_config(*case, batch=4, accumulation=2), tmp_path)
    assert_same_training(one_batch_of_8[case], accumulated)


@pytest.mark.slow  # one torchrun job of two processes that trains all four cases: ~1 min here
def test_two_processes_of_four_train_as_one_of_eight(one_batch_of_8: References, tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    worker = REPO / "tests" / "accumulation_worker.py"
    done = torchrun(str(out), *(f"{h}:{w}" for h, w in CASES), script=worker, path=(REPO / "tests",))
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    for case in CASES:
        parallel = results[":".join(case)]
        assert_same_training(one_batch_of_8[case], (parallel["losses"], np.array(parallel["proba"])))

"""Run directories written by qlora-pipeline 0.1.0 (before the package took its subpackage layout) still predict
and reproduce. The fixtures are two small quick-test runs made by that version (`tests/fixtures/runs_0_1_0/`, see
its README): what a user's archived runs look like, loaded by today's code."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import cache_with_model

from qlora_pipeline import load_predictor
from qlora_pipeline.cli import main

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "runs_0_1_0"
RUNS = ["embeddings_run", "qlora_run"]
TEST_PREDICTIONS = Path("snownlp_sentiment") / "test" / "predictions.csv"


def copy_of(name: str, tmp_path: Path) -> Path:
    """A writable copy, so nothing a command writes lands in the fixtures."""
    return Path(shutil.copytree(FIXTURES / name, tmp_path / "outputs" / name))


def assert_same_predictions(before: pd.DataFrame, after: pd.DataFrame) -> None:
    assert after["prediction"].tolist() == before["prediction"].tolist()
    columns = [c for c in before.columns if c.startswith("prob_")]
    # Bit for bit on the machine that wrote them; another CPU may round NF4 matmuls differently.
    np.testing.assert_allclose(after[columns].to_numpy(), before[columns].to_numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", RUNS)
def test_an_archived_run_predicts_its_own_test_split_again(name: str, tmp_path: Path) -> None:
    run = copy_of(name, tmp_path)
    saved = pd.read_csv(run / TEST_PREDICTIONS)
    predicted = load_predictor(run).predict(saved["text"].tolist())
    assert_same_predictions(saved, predicted)


@pytest.fixture
def cold_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An embedding cache of its own, as the archived run had: vectors that other tests cached in other batches
    differ by ~1e-7 (embeddings/cache.py), enough to move a threshold. The built tiny model is shared, not rebuilt."""
    from qlora_pipeline.models.tiny import cache_root, ensure_tiny_qwen3

    own = cache_with_model(tmp_path, ensure_tiny_qwen3())
    monkeypatch.setenv("QLORA_CACHE_DIR", str(own))
    assert cache_root() == own
    return own


@pytest.mark.parametrize("name", RUNS)
def test_an_archived_run_reproduces_with_the_same_metrics(name: str, tmp_path: Path, cold_cache: Path) -> None:
    run = copy_of(name, tmp_path)
    main(["reproduce", str(run), "--output-dir", str(tmp_path / "again")])
    again = tmp_path / "again" / "run_001"
    assert_same_predictions(pd.read_csv(run / TEST_PREDICTIONS), pd.read_csv(again / TEST_PREDICTIONS))
    before, after = (pd.read_json(path / "metrics.json", typ="series") for path in (run, again))
    for split in ("validation", "test"):
        for head in before["splits"][split]:
            old, new = before["splits"][split][head]["overall"], after["splits"][split][head]["overall"]
            assert (new["accuracy"], new["macro_f1"]) == (old["accuracy"], old["macro_f1"]), (split, head)

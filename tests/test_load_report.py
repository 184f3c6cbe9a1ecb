"""Loading tells the truth: what `from_pretrained` did not load as it should (weights drawn fresh, checkpoint weights
unused, shapes that differ) is recorded for config.json and the report, and whatever the task did not expect is a
console warning; quiet loading hides the progress bar only, and leaves no logging state changed."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cfg

from qlora_pipeline.models.loading import _quiet_loading, load_model
from qlora_pipeline.models.tiny import ensure_tiny_qwen3
from qlora_pipeline.reporting.report import load_report_rows

DROPPED = "model.layers.0.mlp.down_proj.weight"  # a base weight the checkpoint lacks
RESHAPED = "model.norm.weight"  # a base weight of another shape in the checkpoint
EXTRA = "model.extra_projection.weight"  # a checkpoint weight no module takes


# transformers_log (tests/conftest.py): what transformers logs, as its own console handler would show it.


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with one weight dropped, one reshaped and one added."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(ensure_tiny_qwen3(), tmp_path_factory.mktemp("damaged") / "model"))
    tensors = load_file(folder / "model.safetensors")
    del tensors[DROPPED]
    tensors[RESHAPED] = torch.ones(tensors[RESHAPED].shape[0] + 1)
    tensors[EXTRA] = torch.zeros(4, 4)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_every_key_is_recorded_and_the_surprises_are_warnings(
    damaged: Path, caplog: pytest.LogCaptureFixture, transformers_log: list[str]
) -> None:
    with caplog.at_level(logging.WARNING, logger="qlora_pipeline"):
        loaded = load_model(cfg(name_or_path=str(damaged), device="cpu"), task="sequence_classification", num_labels=2)
    report = loaded.load_report
    assert report["missing"] == sorted([DROPPED, "score.weight"])
    assert report["unexpected"] == [EXTRA]
    assert report["mismatched"] == [f"{RESHAPED}: [129] -> [128]"]
    assert set(loaded.new_weights) == {DROPPED, RESHAPED, "score.weight"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    fresh = next(w for w in warnings if "freshly initialised" in w)
    assert DROPPED in fresh and RESHAPED in fresh and "score.weight" not in fresh  # the new head is expected
    assert any("unused by the model" in w and EXTRA in w for w in warnings)
    assert not [m for m in transformers_log if "LOAD REPORT" in m]  # our lines instead of its table


def test_a_clean_load_warns_about_nothing_and_records_the_new_head(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="qlora_pipeline"):
        loaded = load_model(cfg(device="cpu"), task="sequence_classification", num_labels=2)
    assert loaded.load_report == {"missing": ["score.weight"], "unexpected": [], "mismatched": []}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_report_lists_the_keys() -> None:
    rows = load_report_rows({"missing": ["a.weight"], "unexpected": ["b", "c", "d", "e", "f"], "mismatched": []})
    assert rows == [
        ["weights not in the checkpoint (drawn fresh)", "1: `a.weight`"],
        ["checkpoint weights left unused", "5: `b`, `c`, `d`, `e` and 1 more"],
    ]


def test_quiet_loading_hides_the_bar_and_the_table_only_and_restores_everything(transformers_log: list[str]) -> None:
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.modeling_utils")
    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), list(logger.filters))
    with _quiet_loading():
        assert hf_logging.get_verbosity() == before[0]  # problems still show
        assert not hf_logging.is_progress_bar_enabled()
        logger.warning("Qwen3Model LOAD REPORT from: x")
        logger.warning("a problem during the load")
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), list(logger.filters)) == before
    assert transformers_log == ["a problem during the load"]

"""The quantization-fidelity check reloads the model unquantized: on a GPU sized for 4-bit that may not fit, so it is
estimated first (parameters from the checkpoint's headers x bytes per parameter, against the memory free now) and
skipped with the reason in the record and the report when it would not fit."""

from __future__ import annotations

import pandas as pd
import pytest

from qlora_pipeline.config import EmbeddingConfig, ModelConfig
from qlora_pipeline.embeddings import encoding
from qlora_pipeline.models import loading
from qlora_pipeline.models.tiny import ensure_tiny_qwen3
from qlora_pipeline.reporting.report import embedding_rows

MODEL = ModelConfig(device="cpu", compute_dtype="float32")


def test_the_parameter_count_comes_from_the_checkpoint_headers() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ensure_tiny_qwen3())
    assert loading.checkpoint_parameters(MODEL) == sum(p.numel() for p in model.parameters())


def test_a_full_precision_model_that_would_not_fit_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "free_memory", lambda device: 1024**2)  # 1 MiB free
    monkeypatch.setattr(encoding, "load_model", lambda *a, **k: pytest.fail("the unquantized model was loaded"))
    frame = pd.DataFrame({"text": ["好", "差"]})
    record = encoding.quantization_fidelity(frame, None, MODEL, EmbeddingConfig(), 0, "float32")  # type: ignore[arg-type]
    assert record["texts"] == 2
    assert record["skipped"].startswith("the unquantized model (0.00 B parameters in float32, about ")
    assert record["skipped"].endswith("GiB) would not fit in the 0.0 GiB free on cpu")
    rows = embedding_rows({"quantization_fidelity": record})
    assert rows == [["quantization fidelity", f"skipped: {record['skipped']}"]]


def test_a_model_that_fits_is_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    count = loading.checkpoint_parameters(MODEL)
    assert count is not None
    monkeypatch.setattr(loading, "free_memory", lambda device: int(count * 4 * 1.2) + 1)
    assert loading.would_not_fit(MODEL, "float32") is None
    monkeypatch.setattr(loading, "free_memory", lambda device: int(count * 4 * 1.2) - 1)
    assert loading.would_not_fit(MODEL, "float32") is not None

"""Encoding and the content-addressed embedding cache, on the tiny built-in model (CPU, offline)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from qlora_pipeline.cli import main
from qlora_pipeline.config import EmbeddingConfig, ModelConfig
from qlora_pipeline.embeddings import encoding as embeddings
from qlora_pipeline.embeddings.cache import EmbeddingCache, cache_info, read_chunk, text_key
from qlora_pipeline.embeddings.encoding import cache_settings, embed_splits, encode, quantization_fidelity
from qlora_pipeline.errors import UserError
from qlora_pipeline.models.loading import LoadedModel, load_model
from qlora_pipeline.models.tiny import corpus_texts

TEXTS = corpus_texts()[::331][:60]
EMB = EmbeddingConfig(pooling="mean", max_length=64, batch_size=8)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(ModelConfig(device="cpu", compute_dtype="float32"), task="encoder")


@pytest.fixture
def cache(loaded: LoadedModel, tmp_path: Path) -> EmbeddingCache:
    return EmbeddingCache(cache_settings(loaded, EMB), root=tmp_path)


def test_second_encode_is_all_cache_hits_with_identical_bytes(loaded: LoadedModel, cache: EmbeddingCache) -> None:
    first = encode(TEXTS, loaded, EMB, cache=cache)
    second = encode(TEXTS, loaded, EMB, cache=cache)
    assert (first.hits, first.misses) == (0, len(TEXTS))
    assert (second.hits, second.misses) == (len(TEXTS), 0)
    assert second.vectors.tobytes() == first.vectors.tobytes()


def test_cold_encode_with_cache_equals_encode_without(loaded: LoadedModel, cache: EmbeddingCache) -> None:
    uncached = encode(TEXTS, loaded, EMB).vectors
    assert encode(TEXTS, loaded, EMB, cache=cache).vectors.tobytes() == uncached.tobytes()


def test_overlapping_text_set_computes_only_missing(loaded: LoadedModel, cache: EmbeddingCache) -> None:
    encode(TEXTS[:40], loaded, EMB, cache=cache)
    result = encode(TEXTS[20:], loaded, EMB, cache=cache)
    assert (result.hits, result.misses) == (20, 20)
    fresh = encode(TEXTS[20:], loaded, EMB).vectors
    np.testing.assert_allclose(result.vectors, fresh, atol=1e-6)  # batch-mates differ: float rounding only


def test_interrupted_encode_keeps_finished_chunks(
    loaded: LoadedModel, cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embeddings, "FLUSH_EVERY", 8)
    real_forward, calls = loaded.model.forward, {"n": 0}

    def dies_on_fourth_batch(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", dies_on_fourth_batch)
    with pytest.raises(KeyboardInterrupt):
        encode(TEXTS, loaded, EMB, cache=cache)
    monkeypatch.setattr(loaded.model, "forward", real_forward)
    resumed = encode(TEXTS, loaded, EMB, cache=cache)
    assert (resumed.hits, resumed.misses) == (24, len(TEXTS) - 24)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_chunk_is_detected_and_recomputed(
    loaded: LoadedModel, cache: EmbeddingCache, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = encode(TEXTS, loaded, EMB, cache=cache)
    (chunk,) = cache.folder.glob("*.emb")
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of one vector
    else:
        del data[-100:]
    chunk.write_bytes(bytes(data))
    assert read_chunk(chunk) is None
    with caplog.at_level(logging.WARNING):
        again = encode(TEXTS, loaded, EMB, cache=cache)
    assert "truncated or corrupt" in caplog.text
    assert again.misses == len(TEXTS)
    assert again.vectors.tobytes() == first.vectors.tobytes()


def test_cache_key_covers_settings_and_weights(loaded: LoadedModel, tmp_path: Path) -> None:
    base = cache_settings(loaded, EMB)
    for change in ({"pooling": "last_token"}, {"max_length": 32}, {"normalize": False}, {"instruction": "x"}):
        other = cache_settings(loaded, dataclasses.replace(EMB, **change))
        assert EmbeddingCache(other).key != EmbeddingCache(base).key, change
    assert base["weights"] and len(base["weights"]) == 64
    assert base["quantization"] == "4bit-nf4" and base["compute_dtype"] == "float32"


def test_text_pairs_are_encoded_together(loaded: LoadedModel) -> None:
    pairs = ["质量太差了"] * 4
    single = encode(TEXTS[:4], loaded, EMB).vectors
    paired = encode(TEXTS[:4], loaded, EMB, pairs=pairs).vectors
    assert not np.allclose(single, paired)
    assert text_key("a", "b") != text_key("a") != text_key("a", "")


def test_out_of_memory_halves_the_batch(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_forward = loaded.model.forward

    def small_memory(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", small_memory)
    with caplog.at_level(logging.WARNING):
        result = encode(TEXTS[:10], loaded, EMB)
    assert "retrying with embedding batch size 2" in caplog.text
    monkeypatch.setattr(loaded.model, "forward", real_forward)
    np.testing.assert_allclose(result.vectors, encode(TEXTS[:10], loaded, EMB).vectors, atol=1e-6)


def test_max_length_above_the_model_is_a_user_error(loaded: LoadedModel) -> None:
    frames = {"train": pd.DataFrame({"text": TEXTS[:2]})}
    with pytest.raises(UserError, match="embedding.max_length is 4096 but .* has 512 positions"):
        embed_splits(frames, loaded, dataclasses.replace(EMB, max_length=4096))


@pytest.mark.parametrize("pooling", ["mean", "last_token", "cls"])
def test_pooling_is_the_same_under_left_and_right_padding(loaded: LoadedModel, pooling: str) -> None:
    cfg = dataclasses.replace(EMB, pooling=pooling)
    right = encode(TEXTS[:6], loaded, cfg).vectors
    loaded.tokenizer.padding_side = "left"
    try:
        left = encode(TEXTS[:6], loaded, cfg).vectors
    finally:
        loaded.tokenizer.padding_side = "right"
    np.testing.assert_allclose(left, right, atol=1e-4)


def test_quantization_fidelity_compares_with_the_unquantized_model(loaded: LoadedModel) -> None:
    frame = pd.DataFrame({"text": TEXTS[:16]})
    quantized = encode(TEXTS[:16], loaded, EMB).vectors
    model_cfg = ModelConfig(device="cpu", compute_dtype="float32")
    emb = dataclasses.replace(EMB, cache=False)
    fidelity = quantization_fidelity(frame, quantized, model_cfg, emb, 0, "float32")
    assert fidelity["texts"] == 16 and fidelity["reference"] == "none, float32"
    assert 0.5 < fidelity["mean_cosine"] < 1.0  # NF4 costs something, but the vectors stay close


def test_cache_info_and_clear(
    loaded: LoadedModel, cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("QLORA_CACHE_DIR", str(cache.folder.parent.parent))
    cache = EmbeddingCache(cache.settings)  # under the default root, now the tmp dir
    encode(TEXTS[:12], loaded, EMB, cache=cache)
    info = cache_info()
    assert [(m["key"], m["entries"], m["pooling"]) for m in info["models"]] == [(cache.key, 12, "mean")]
    assert main(["cache", "info"]) == 0
    assert f"{cache.key}        12 vectors" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 2  # not a terminal and no --yes: refuse
    assert main(["cache", "clear", "--yes"]) == 0
    assert cache_info()["models"] == []


def test_progress_is_logged_without_a_terminal(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embeddings, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="qlora_pipeline.embeddings.encoding"):
        encode(TEXTS[:20], loaded, EMB)
    assert "encoding: 8 / 20 texts" in caplog.text and "texts/s" in caplog.text


@pytest.mark.parametrize(("drop", "expected"), [(["pad_token"], "padding with eos"), (["pad_token", "eos_token"], "")])
def test_tokenizer_without_pad_token(loaded: LoadedModel, tmp_path: Path, drop: list[str], expected: str) -> None:
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(loaded.source, model_dir)
    settings = json.loads((model_dir / "tokenizer_config.json").read_text())
    for key in drop:
        settings[key] = None
    (model_dir / "tokenizer_config.json").write_text(json.dumps(settings))
    model_cfg = ModelConfig(name_or_path=str(model_dir), device="cpu", quantization="none")
    if expected:  # a decoder borrows eos, says so, and still encodes in batches
        fixed = load_model(model_cfg)
        assert any(expected in note for note in fixed.notes)
        assert encode(TEXTS[:4], fixed, EMB).vectors.shape == (4, 128)
    else:
        with pytest.raises(UserError, match="neither a pad nor an eos token.*encoders such as BERT ship"):
            load_model(model_cfg)

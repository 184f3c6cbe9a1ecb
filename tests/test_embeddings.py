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

from qlora_pipeline import progress
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
def test_a_corrupt_record_is_detected_and_recomputed(
    loaded: LoadedModel, cache: EmbeddingCache, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    first = encode(TEXTS, loaded, EMB, cache=cache)
    (segment,) = cache.folder.glob("*.seg")
    data = bytearray(segment.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # one bit of the last vector
    else:
        del data[-100:]  # the last record cut short
    segment.write_bytes(bytes(data))
    assert read_chunk(segment) is None
    with caplog.at_level(logging.WARNING):
        again = encode(TEXTS, loaded, EMB, cache=cache)
    assert "truncated or corrupt" in caplog.text
    assert (again.hits, again.misses) == (len(TEXTS) - 1, 1)  # every other record is checked on its own
    np.testing.assert_allclose(again.vectors, first.vectors, atol=1e-6)  # recomputed in a batch of its own
    assert encode(TEXTS, loaded, EMB, cache=cache).hits == len(TEXTS)


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
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
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


def test_texts_are_tokenized_a_window_at_a_time(
    loaded: LoadedModel, cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory holds one window of tokens, never the whole corpus's; the vectors are those of a single window
    up to float rounding (batch-mates differ)."""
    whole = encode(TEXTS, loaded, EMB).vectors
    monkeypatch.setattr(embeddings, "TOKENIZE_EVERY", 16)
    sizes: list[int] = []
    real_call = type(loaded.tokenizer).__call__

    def recording_call(self: Any, text: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(text))
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(type(loaded.tokenizer), "__call__", recording_call)
    result = encode(TEXTS, loaded, EMB, cache=cache)
    assert sizes == [16, 16, 16, 12]
    np.testing.assert_allclose(result.vectors, whole, atol=1e-6)
    assert len(cache.lookup([text_key(t) for t in TEXTS])) == len(TEXTS)


def test_processes_sharing_the_plan_compute_the_vectors_one_process_would(
    loaded: LoadedModel, cache: EmbeddingCache
) -> None:
    """torchrun's ranks each take every other batch of the same plan: together, the very bytes of one process."""
    alone = encode(TEXTS, loaded, EMB).vectors
    todo = list(range(len(TEXTS)))
    shares = [embeddings.fill_cache(TEXTS, loaded, EMB, cache, todo, rank=r, processes=2) for r in (0, 1)]
    assert [s.computed for s in shares] == [32, 28]  # batches of 8: four each, the last one short
    read_back = encode(TEXTS, lambda: pytest.fail("everything is cached"), EMB, cache=cache)
    assert read_back.hits == len(TEXTS)
    assert read_back.vectors.tobytes() == alone.tobytes()


PUT_FROM_ANOTHER_PROCESS = """
import json, sys
from pathlib import Path
import numpy as np
from qlora_pipeline.embeddings.cache import EmbeddingCache
settings, root, keys, vectors = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
cache = EmbeddingCache(json.loads(Path(settings).read_text()), root=root)
cache.put([bytes.fromhex(k) for k in json.loads(keys.read_text())], np.load(vectors))
"""


def test_vectors_another_process_finished_meanwhile_are_read_not_recomputed(
    loaded: LoadedModel, cache: EmbeddingCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Right after this encode's first lookup, another process writes half of the vectors into the cache: each
    batch asks the cache again before computing, and computes only the other half."""
    import json
    import os
    import subprocess
    import sys

    reference = encode(TEXTS, loaded, EMB).vectors
    for name, data in {"settings.json": cache.settings, "keys.json": [text_key(t).hex() for t in TEXTS[30:]]}.items():
        (tmp_path / name).write_text(json.dumps(data))
    np.save(tmp_path / "vectors.npy", reference[30:])
    root = cache.folder.parent
    args = [str(tmp_path / n) for n in ("settings.json",)] + [str(root)]
    args += [str(tmp_path / n) for n in ("keys.json", "vectors.npy")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    real_lookup, calls = cache.lookup, []

    def lookup_then_another_process_writes(keys: Any) -> Any:
        found = real_lookup(keys)
        calls.append(len(keys))
        if len(calls) == 1:
            subprocess.run([sys.executable, "-c", PUT_FROM_ANOTHER_PROCESS, *args], env=env, check=True)
        return found

    monkeypatch.setattr(cache, "lookup", lookup_then_another_process_writes)
    result = encode(TEXTS, loaded, EMB, cache=cache)
    assert (result.hits, result.misses) == (30, 30)
    assert result.vectors[30:].tobytes() == reference[30:].tobytes()  # the other process's bytes
    np.testing.assert_allclose(result.vectors[:30], reference[:30], atol=1e-6)


def test_clearing_the_cache_during_an_encode_does_not_stop_it(
    loaded: LoadedModel, cache: EmbeddingCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qlora_pipeline.embeddings.cache import clear_cache

    monkeypatch.setattr(embeddings, "FLUSH_EVERY", 8)
    reference = encode(TEXTS, loaded, EMB).vectors
    real_forward, calls = loaded.model.forward, {"n": 0}

    def cleared_before_the_third_batch(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            clear_cache(cache.folder.parent)  # what `qlora cache clear --yes` does from another shell
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "forward", cleared_before_the_third_batch)
    result = encode(TEXTS, loaded, EMB, cache=cache)
    assert result.vectors.tobytes() == reference.tobytes()
    monkeypatch.setattr(loaded.model, "forward", real_forward)
    again = encode(TEXTS, loaded, EMB, cache=cache)  # the two batches written before the clear are gone
    assert (again.hits, again.misses) == (len(TEXTS) - 16, 16)

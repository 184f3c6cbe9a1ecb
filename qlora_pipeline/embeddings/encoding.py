"""Batched encoding of texts into fixed-size vectors: prompt → tokenize → forward → pool → L2-normalize,
through the content-addressed cache (`cache.py`) so that only texts never encoded with these settings run.
Also the quantization-fidelity check: the same texts through the unquantized model."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qlora_pipeline.embeddings.cache import EmbeddingCache, text_key, weights_fingerprint
from qlora_pipeline.models.device import release_memory
from qlora_pipeline.models.loading import check_max_length, load_model, would_not_fit
from qlora_pipeline.models.pairs import encode as model_inputs

if TYPE_CHECKING:
    from qlora_pipeline.config import EmbeddingConfig
    from qlora_pipeline.models.loading import LoadedModel

log = logging.getLogger(__name__)

FLUSH_EVERY = 512  # vectors per cache chunk: an interrupt loses at most this many, chunks stay few
LOG_EVERY_S = 30.0  # without a terminal, progress is logged this often


@dataclass(frozen=True)
class Encoded:
    vectors: np.ndarray  # float32 [len(texts), dim], in the order given
    hits: int  # vectors read from the cache
    misses: int  # vectors computed now
    seconds: float
    real_tokens: int  # of the computed batches: tokens that are text ...
    padded_tokens: int  # ... and all positions including padding


def instruction_around(cfg: EmbeddingConfig) -> tuple[str, str]:
    """What the instruction template (Qwen3-Embedding style) puts before and after a text, or a joined pair (one
    query); nothing without an instruction."""
    if not cfg.instruction:
        return "", ""
    # str.replace, not str.format: review texts may contain braces.
    head, tail = cfg.prompt_template.replace("{instruction}", cfg.instruction).split("{text}", 1)
    return head, tail


def apply_prompt(texts: Sequence[str], cfg: EmbeddingConfig) -> list[str]:
    """Wrap texts in the instruction template when an instruction is set."""
    head, tail = instruction_around(cfg)
    return [f"{head}{text}{tail}" for text in texts]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """Pool token states `[batch, seq, dim]` to `[batch, dim]`; correct under left and right padding."""
    if method == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if method == "cls":
        first = attention_mask.int().argmax(dim=1)  # first real token, whichever side is padded
        return hidden[torch.arange(hidden.shape[0]), first]
    if method == "last_token":
        seq_len = attention_mask.shape[1]
        # Index of the last real token: the last position whose mask is 1 (works for either padding side).
        positions = torch.arange(seq_len, device=attention_mask.device).expand_as(attention_mask)
        last = (positions * attention_mask.long()).max(dim=1).values
        return hidden[torch.arange(hidden.shape[0]), last]
    raise ValueError(f"unknown pooling {method!r}")


def cache_settings(loaded: LoadedModel, cfg: EmbeddingConfig) -> dict[str, Any]:
    """Everything besides the text that decides a vector: the cache's model key."""
    local = Path(loaded.source)
    return {
        "model": loaded.source,
        "revision": loaded.revision,
        "weights": weights_fingerprint(local) if local.is_dir() else None,  # hub snapshots: the revision says it
        "quantization": loaded.quantization,
        "compute_dtype": loaded.compute_dtype,
        "device": loaded.device,
        "prompt": apply_prompt(["{text}"], cfg)[0],
        "pairs": loaded.pair_encoding.record(),  # vectors of pairs joined another way are never served
        "pooling": cfg.pooling,
        "max_length": cfg.max_length,
        "normalize": cfg.normalize,
        "versions": {name: _version(name) for name in ("torch", "transformers", "bitsandbytes")},
    }


def encode(
    texts: Sequence[str],
    loaded: LoadedModel,
    cfg: EmbeddingConfig,
    *,
    pairs: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
) -> Encoded:
    """Encode texts (or text pairs) to float32 vectors in the order given, computing only cache misses.

    Misses are batched in order of length, so that each batch pads little, and written to the cache in
    chunks as they finish (kept even if the encode is interrupted)."""
    start = time.perf_counter()
    keys = [text_key(t, None if pairs is None else pairs[i]) for i, t in enumerate(texts)]
    found = cache.lookup(keys) if cache is not None else {}
    todo = list(dict.fromkeys(k for k in keys if k not in found))  # distinct misses, first occurrence order
    first_index = {k: i for i, k in reversed(list(enumerate(keys)))}
    prompts = [texts[first_index[k]] for k in todo]  # the instruction goes around them as they are tokenized
    second = [pairs[first_index[k]] for k in todo] if pairs is not None else None
    computed, real, padded = _run_batches(prompts, second, loaded, cfg, todo, cache)
    fresh = dict(zip(todo, computed, strict=True))
    dim = next(iter(found.values())).shape[0] if found else (computed.shape[1] if len(computed) else 0)
    vectors = np.empty((len(keys), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        vectors[i] = found[key] if key in found else fresh[key]
    seconds = time.perf_counter() - start
    hits = sum(1 for k in keys if k in found)
    log.info(
        "encoded %d texts in %.2f s: %d from the cache, %d computed (%.0f texts/s; real/padded tokens %.2f)",
        len(keys),
        seconds,
        hits,
        len(todo),
        len(todo) / max(seconds, 1e-9),
        real / max(padded, 1),
    )
    return Encoded(vectors, hits, len(keys) - hits, seconds, real, padded)


def _run_batches(
    prompts: list[str],
    pairs: list[str] | None,
    loaded: LoadedModel,
    cfg: EmbeddingConfig,
    keys: list[bytes],
    cache: EmbeddingCache | None,
) -> tuple[np.ndarray, int, int]:
    """Forward passes over batches sorted by token count; halves the batch size on out-of-memory and retries.

    Texts are tokenized once, up front, so that batches are formed by exact token counts (padding ~1-8%
    of positions instead of ~50% for batches in arrival order) and each batch is only padded, not re-tokenized."""
    model, tokenizer = loaded.model, loaded.tokenizer
    if not prompts:
        return np.zeros((0, 0), dtype=np.float32), 0, 0
    # Texts, or pairs joined as model.pair_template says, inside the instruction: as fine-tuning and predict read them.
    around, setting = instruction_around(cfg), "embedding.max_length"
    tokens = model_inputs(
        tokenizer, prompts, pairs, cfg.max_length, loaded.pair_encoding, setting=setting, around=around
    )
    order = sorted(range(len(prompts)), key=lambda i: len(tokens["input_ids"][i]))
    device = next(model.parameters()).device
    result = np.zeros((len(prompts), 0), dtype=np.float32)
    pending: list[int] = []
    real = padded = 0
    batch_size, done = cfg.batch_size, 0
    with _progress(len(order)) as advance, torch.inference_mode():
        try:
            while done < len(order):
                batch = order[done : done + batch_size]
                features = [{name: tokens[name][i] for name in tokens} for i in batch]
                inputs = tokenizer.pad(features, padding=True, return_tensors="pt").to(device)
                try:
                    hidden = model(**inputs).last_hidden_state
                except torch.OutOfMemoryError:
                    if batch_size == 1:
                        raise
                    batch_size //= 2
                    log.warning("out of memory; retrying with embedding batch size %d", batch_size)
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                pooled = pool(hidden, inputs["attention_mask"], cfg.pooling).float()
                if cfg.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
                if result.shape[1] == 0:
                    result = np.zeros((len(prompts), pooled.shape[1]), dtype=np.float32)
                result[batch] = pooled.cpu().numpy()
                real += int(inputs["attention_mask"].sum())
                padded += inputs["attention_mask"].numel()
                done += len(batch)
                pending += batch
                advance(len(batch))
                if cache is not None and len(pending) >= FLUSH_EVERY:
                    cache.put([keys[i] for i in pending], result[pending])
                    pending = []
        finally:  # keep what finished, even on an interrupt
            if cache is not None and pending:
                cache.put([keys[i] for i in pending], result[pending])
    return result, real, padded


@contextmanager
def _progress(total: int) -> Iterator[Any]:
    """A tqdm bar with texts/s on a terminal; otherwise an INFO line every LOG_EVERY_S seconds."""
    if total == 0:
        yield lambda n: None
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, unit="text", desc="encoding", leave=False) as bar:
            yield bar.update
        return
    start = last = time.perf_counter()
    count = 0

    def advance(n: int) -> None:
        nonlocal count, last
        count += n
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S:
            last = now
            log.info("encoding: %d / %d texts (%.0f texts/s)", count, total, count / (now - start))

    yield advance


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def embed_splits(
    frames: dict[str, Any], loaded: LoadedModel, cfg: EmbeddingConfig
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Encode each split's `text` (with `text_pair` when the frame has one) through the cache when
    `cfg.cache` is on; returns the vectors per split and a record for config.json."""
    check_max_length(loaded, cfg.max_length, "embedding.max_length")
    cache = EmbeddingCache(cache_settings(loaded, cfg)) if cfg.cache else None
    vectors: dict[str, np.ndarray] = {}
    record: dict[str, Any] = {"cache": str(cache.folder) if cache else None, "splits": {}}
    if any("text_pair" in frame for frame in frames.values()):
        record["pair_encoding"] = loaded.pair_encoding.record()
    for name, frame in frames.items():
        pairs = frame["text_pair"].tolist() if "text_pair" in frame else None
        result = encode(frame["text"].tolist(), loaded, cfg, pairs=pairs, cache=cache)
        vectors[name] = result.vectors
        record["splits"][name] = {
            "texts": len(result.vectors),
            "cache_hits": result.hits,
            "computed": result.misses,
            "seconds": round(result.seconds, 3),
            "real_to_padded_tokens": round(result.real_tokens / max(result.padded_tokens, 1), 4),
        }
    return vectors, record


def quantization_fidelity(
    frame: Any, quantized: np.ndarray, model_cfg: Any, cfg: EmbeddingConfig, seed: int, compute_dtype: str
) -> dict[str, Any]:
    """Mean cosine between `quantized` (the run's vectors of `frame`'s texts) and the same model's unquantized
    vectors of those texts at the same `compute_dtype`: what quantization alone costs on this model and data.
    Loads the model again, unquantized, once the quantized one is gone (the caller drops it); skipped, with the
    reason in the record, when the unquantized model would not fit in the memory free now."""
    import dataclasses

    reference_cfg = dataclasses.replace(model_cfg, quantization="none", compute_dtype=compute_dtype)
    too_big = would_not_fit(reference_cfg, compute_dtype)  # frees what the quantized model left behind first
    if too_big is not None:
        log.warning("quantization fidelity skipped: %s", too_big)
        return {"texts": len(frame), "skipped": too_big}
    full = load_model(reference_cfg, task="encoder", seed=seed)
    cache = EmbeddingCache(cache_settings(full, cfg)) if cfg.cache else None
    pairs = frame["text_pair"].tolist() if "text_pair" in frame else None
    reference = encode(frame["text"].tolist(), full, cfg, pairs=pairs, cache=cache).vectors
    device = full.device
    del full
    release_memory(device)
    cosines = _cosines(quantized, reference)
    log.info("quantization fidelity: mean cosine %.4f to full precision on %d texts", cosines.mean(), len(frame))
    return {
        "texts": len(frame),
        "mean_cosine": round(float(cosines.mean()), 6),
        "min_cosine": round(float(cosines.min()), 6),
        "reference": f"none, {compute_dtype}",
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.asarray((a64 * b64).sum(axis=1) / np.maximum(norms, 1e-12))

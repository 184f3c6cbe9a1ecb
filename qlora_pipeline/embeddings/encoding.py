"""Batched encoding of texts into fixed-size vectors: prompt → tokenize → forward → pool → L2-normalize,
through the content-addressed cache (`cache.py`) so that only texts never encoded with these settings run.
Also the quantization-fidelity check: the same texts through the unquantized model.

The model is loaded only when a vector has to be computed: an `Encoder` knows its model's identity (and so
its cache) without loading any weights, so a run whose vectors are all cached never loads the model.

Texts to compute stream through in windows of `TOKENIZE_EVERY`: each window is tokenized, sorted by token
count (so that each batch pads little), cut into batches of `embedding.batch_size`, and its vectors are
written to the cache every `FLUSH_EVERY`. Memory holds one window of tokens, not the corpus's. The batches
are a fixed plan (window by window), which lets the processes of a torchrun job each take every N-th batch
(`fill_cache`) and compute exactly the vectors one process would have.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qlora_pipeline.embeddings.cache import EmbeddingCache, text_key, weights_fingerprint
from qlora_pipeline.models.device import release_memory
from qlora_pipeline.models.loading import (
    LoadedModel,
    ModelIdentity,
    check_positions,
    load_model,
    position_limit,
    resolve_identity,
    would_not_fit,
)
from qlora_pipeline.models.pairs import encode as model_inputs
from qlora_pipeline.progress import Progress
from qlora_pipeline.runs import package_versions

if TYPE_CHECKING:
    from qlora_pipeline.config import EmbeddingConfig, ModelConfig

log = logging.getLogger(__name__)

FLUSH_EVERY = 512  # vectors per cache write: an interrupt loses at most this many; writes stay few
TOKENIZE_EVERY = 4096  # texts tokenized at a time: bounded memory; batches sorted by length within a window


@dataclass(frozen=True)
class Encoded:
    vectors: np.ndarray  # float32 [len(texts), dim], in the order given
    hits: int  # vectors read from the cache
    misses: int  # vectors computed now
    seconds: float
    real_tokens: int  # of the computed batches: tokens that are text ...
    padded_tokens: int  # ... and all positions including padding


@dataclass
class Tally:
    """What one encode (or one process's share of it) did."""

    computed: int = 0  # distinct vectors computed by this process
    rechecked: int = 0  # found in the cache just before their batch: another process had finished them
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0


class Encoder:
    """One model setting: its identity and cache, known without loading weights, and the model itself, loaded
    on the first call of `model()` (that is, only when some vector is not in the cache)."""

    def __init__(
        self, model_cfg: ModelConfig | None, cfg: EmbeddingConfig, seed: int = 0, loaded: LoadedModel | None = None
    ) -> None:
        if loaded is None and model_cfg is None:
            raise ValueError("an Encoder needs a model config or a loaded model")
        self.model_cfg, self.seed, self._loaded = model_cfg, seed, loaded
        self.identity: LoadedModel | ModelIdentity
        if loaded is not None:
            self.identity = loaded
        else:
            assert model_cfg is not None
            self.identity = resolve_identity(model_cfg)
        self.cache = EmbeddingCache(cache_settings(self.identity, cfg)) if cfg.cache else None

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def model(self) -> LoadedModel:
        if self._loaded is None:
            assert self.model_cfg is not None
            self._loaded = load_model(self.model_cfg, task="encoder", seed=self.seed)
        return self._loaded

    def release(self) -> None:
        """Drop the model (before training heads: its memory is free again); the identity stays."""
        self._loaded = None

    def max_positions(self) -> int | None:
        return position_limit(self.identity)


def instruction_around(cfg: EmbeddingConfig) -> tuple[str, str]:
    """What the instruction template (Qwen3-Embedding style) puts before and after a text, or a joined pair (one
    query); nothing without an instruction."""
    if not cfg.instruction:
        return "", ""
    # str.replace, not str.format: review texts may contain braces.
    head, tail = cfg.prompt_template.replace("{instruction}", cfg.instruction).split("{text}", 1)
    return head, tail


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


def cache_settings(model: LoadedModel | ModelIdentity, cfg: EmbeddingConfig) -> dict[str, Any]:
    """Everything besides the text that decides a vector: the cache's model key. The same for a loaded model
    and for the identity `resolve_identity` gives without loading it."""
    local = Path(model.source)
    return {
        "model": model.source,
        "revision": model.revision,
        "weights": weights_fingerprint(local) if local.is_dir() else None,  # hub snapshots: the revision says it
        "quantization": model.quantization,
        "compute_dtype": model.compute_dtype,
        "device": model.device,
        "prompt": "{text}".join(instruction_around(cfg)),  # the instruction template around a text
        "pairs": model.pair_encoding.record(),  # vectors of pairs joined another way are never served
        "pooling": cfg.pooling,
        "max_length": cfg.max_length,
        "normalize": cfg.normalize,
        "versions": package_versions(("torch", "transformers", "bitsandbytes")),
    }


def input_keys(texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[bytes]:
    return [text_key(t, None if pairs is None else pairs[i]) for i, t in enumerate(texts)]


def distinct_misses(keys: Sequence[bytes], found: dict[bytes, Any]) -> list[int]:
    """Positions of the first occurrence of each key not in `found`, in order: what an encode computes."""
    seen: set[bytes] = set()
    todo = []
    for i, key in enumerate(keys):
        if key not in found and key not in seen:
            seen.add(key)
            todo.append(i)
    return todo


def encode(
    texts: Sequence[str],
    model: LoadedModel | Callable[[], LoadedModel],
    cfg: EmbeddingConfig,
    *,
    pairs: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
    found: dict[bytes, np.ndarray] | None = None,
) -> Encoded:
    """Encode texts (or text pairs) to float32 vectors in the order given, computing only cache misses.

    `model`: a loaded model, or a function that loads one, called only when a vector must be computed.
    `found`: what the cache holds for these texts, when the caller has asked it already.
    Misses stream through `_plan` (windows, length-sorted batches) and are written to the cache in groups as
    they finish (kept even if the encode is interrupted); a batch whose vectors another process wrote in the
    meantime is read, not recomputed."""
    start = time.perf_counter()
    keys = input_keys(texts, pairs)
    if found is None:
        found = cache.lookup(keys) if cache is not None else {}
    todo = distinct_misses(keys, found)
    tally = Tally()
    fresh: dict[bytes, np.ndarray] = {}
    for positions, vectors in _computed(todo, texts, pairs, keys, model, cfg, cache, tally):
        fresh.update(zip((keys[i] for i in positions), vectors, strict=True))
    dim = next(iter(found.values())).shape[0] if found else (len(next(iter(fresh.values()))) if fresh else 0)
    result = np.empty((len(keys), dim), dtype=np.float32)
    for i, key in enumerate(keys):
        result[i] = found[key] if key in found else fresh[key]
    seconds = time.perf_counter() - start
    hits = sum(1 for k in keys if k in found) + tally.rechecked
    log.info(
        "encoded %d texts in %.2f s: %d from the cache, %d computed (%.0f texts/s; real/padded tokens %.2f)",
        len(keys),
        seconds,
        hits,
        tally.computed,
        tally.computed / max(seconds, 1e-9),
        tally.real_tokens / max(tally.padded_tokens, 1),
    )
    return Encoded(result, hits, len(keys) - hits, seconds, tally.real_tokens, tally.padded_tokens)


def fill_cache(
    texts: Sequence[str],
    model: LoadedModel | Callable[[], LoadedModel],
    cfg: EmbeddingConfig,
    cache: EmbeddingCache,
    todo: list[int],
    *,
    pairs: Sequence[str] | None = None,
    rank: int = 0,
    processes: int = 1,
) -> Tally:
    """One process's share of an encode under torchrun: of the batches `_plan` makes from `todo` (positions
    of the texts to compute, the same list on every process), those numbered rank, rank + processes, ...,
    written to the cache and not kept in memory. The model is loaded only when this share has a batch."""
    start = time.perf_counter()
    keys = input_keys(texts, pairs)
    tally = Tally()
    for _ in _computed(todo, texts, pairs, keys, model, cfg, cache, tally, rank=rank, processes=processes):
        pass
    tally.seconds = time.perf_counter() - start
    log.info("process %d of %d computed %d vectors in %.2f s", rank, processes, tally.computed, tally.seconds)
    return tally


def _plan(todo: list[int], window: int) -> Iterator[list[int]]:
    """The windows of `todo` that are tokenized at a time."""
    for begin in range(0, len(todo), window):
        yield todo[begin : begin + window]


def _computed(
    todo: list[int],
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    keys: list[bytes],
    model_source: LoadedModel | Callable[[], LoadedModel],
    cfg: EmbeddingConfig,
    cache: EmbeddingCache | None,
    tally: Tally,
    *,
    rank: int = 0,
    processes: int = 1,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """(positions, vectors) per batch of this process's share of the plan, computed (or, when another process
    wrote them meanwhile, read from the cache), each flushed to the cache every FLUSH_EVERY vectors."""
    batch_size = cfg.batch_size
    sizes = [len(w[b : b + batch_size]) for w in _plan(todo, TOKENIZE_EVERY) for b in range(0, len(w), batch_size)]
    share = sum(sizes[rank::processes])  # texts in this process's batches
    if not share:
        return
    loaded = model_source if isinstance(model_source, LoadedModel) else model_source()
    pending_keys: list[bytes] = []
    pending: list[np.ndarray] = []
    micro = [batch_size]  # forward size after out-of-memory halvings, kept for the rest of the encode
    number = 0  # the plan's batch number, the same on every process
    with Progress(share, "encoding", "text", logger=log) as progress, torch.inference_mode():
        try:
            for window in _plan(todo, TOKENIZE_EVERY):
                ordered, tokens = _tokenize(window, texts, pairs, loaded, cfg)
                for begin in range(0, len(ordered), batch_size):
                    number += 1
                    if (number - 1) % processes != rank:
                        continue
                    batch = ordered[begin : begin + batch_size]
                    positions = [window[i] for i in batch]
                    batch_keys = [keys[p] for p in positions]
                    # Another process may have finished some of these meanwhile: read them, compute the rest.
                    ready = cache.lookup(batch_keys) if cache is not None else {}
                    compute = [j for j, key in enumerate(batch_keys) if key not in ready]
                    tally.rechecked += len(batch) - len(compute)
                    fresh = iter(())
                    if compute:
                        vectors = _forward(loaded, cfg, [tokens[batch[j]] for j in compute], micro, tally)
                        tally.computed += len(compute)
                        fresh = iter(vectors)
                        if cache is not None:
                            pending_keys += [batch_keys[j] for j in compute]
                            pending.append(vectors)
                            if len(pending_keys) >= FLUSH_EVERY:
                                cache.put(pending_keys, np.concatenate(pending))
                                pending_keys, pending = [], []
                    progress.advance(len(batch))
                    yield positions, np.stack([ready[k] if k in ready else next(fresh) for k in batch_keys])
        finally:  # keep what finished, even on an interrupt
            if cache is not None and pending_keys:
                cache.put(pending_keys, np.concatenate(pending))


def _tokenize(
    window: list[int], texts: Sequence[str], pairs: Sequence[str] | None, loaded: LoadedModel, cfg: EmbeddingConfig
) -> tuple[list[int], list[dict[str, Any]]]:
    """Tokenize one window once (batches are then only padded, not re-tokenized) and order it by token count:
    batches of similar lengths pad ~1-8% of positions instead of ~50% in arrival order."""
    second = [pairs[i] for i in window] if pairs is not None else None
    # Texts, or pairs joined as model.pair_template says, inside the instruction: as fine-tuning and predict read them.
    encoded = model_inputs(
        loaded.tokenizer,
        [texts[i] for i in window],
        second,
        cfg.max_length,
        loaded.pair_encoding,
        setting="embedding.max_length",
        around=instruction_around(cfg),
    )
    names = list(encoded.keys())
    tokens = [{name: encoded[name][i] for name in names} for i in range(len(window))]
    order = sorted(range(len(window)), key=lambda i: len(tokens[i]["input_ids"]))
    return order, tokens


def _forward(
    loaded: LoadedModel, cfg: EmbeddingConfig, features: list[dict[str, Any]], micro: list[int], tally: Tally
) -> np.ndarray:
    """Pooled (and normalized) vectors of one batch; on out-of-memory the forward size halves and the rest of
    the batch is retried (the batch itself, and so the plan, stays as it is)."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    parts = []
    done = 0
    while done < len(features):
        inputs = tokenizer.pad(features[done : done + micro[0]], padding=True, return_tensors="pt").to(device)
        try:
            hidden = model(**inputs).last_hidden_state
        except torch.OutOfMemoryError:
            if micro[0] == 1:
                raise
            micro[0] //= 2
            log.warning("out of memory; retrying with embedding batch size %d", micro[0])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        pooled = pool(hidden, inputs["attention_mask"], cfg.pooling).float()
        if cfg.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        parts.append(pooled.cpu().numpy())
        tally.real_tokens += int(inputs["attention_mask"].sum())
        tally.padded_tokens += inputs["attention_mask"].numel()
        done += len(inputs["input_ids"])
    return np.concatenate(parts)


def check_max_length(encoder: Encoder, cfg: EmbeddingConfig) -> None:
    """A max_length above the model's position limit would index past its position table (BERT's 512 learned
    positions) or run past the lengths it was trained on (rotary decoders)."""
    check_positions(encoder.max_positions(), cfg.max_length, "embedding.max_length", encoder.identity.source)


@dataclass
class SplitPlan:
    """What the cache holds for each split's texts, asked once before deciding whether to load the model."""

    found: dict[str, dict[bytes, np.ndarray]] = field(default_factory=dict)
    todo: dict[str, list[int]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)  # texts (not distinct ones) whose vector was found

    @property
    def complete(self) -> bool:
        return not any(self.todo.values())


def split_texts(frame: Any) -> tuple[list[str], list[str] | None]:
    return frame["text"].tolist(), frame["text_pair"].tolist() if "text_pair" in frame else None


def plan_splits(frames: dict[str, Any], encoder: Encoder) -> SplitPlan:
    """Ask the cache for every split's texts: what is there, and what must be computed."""
    plan = SplitPlan()
    for name, frame in frames.items():
        keys = input_keys(*split_texts(frame))
        plan.found[name] = found = encoder.cache.lookup(keys) if encoder.cache is not None else {}
        plan.todo[name] = distinct_misses(keys, found)
        plan.hits[name] = sum(1 for key in keys if key in found)
    return plan


def embed_splits(
    frames: dict[str, Any],
    encoder: Encoder | LoadedModel,
    cfg: EmbeddingConfig,
    plan: SplitPlan | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Encode each split's `text` (with `text_pair` when the frame has one) through the cache when
    `cfg.cache` is on; returns the vectors per split and a record for config.json. The model is loaded only
    if a vector is missing (`plan`: the cache's answers, when the caller has asked already)."""
    if isinstance(encoder, LoadedModel):
        encoder = Encoder(None, cfg, loaded=encoder)
    check_max_length(encoder, cfg)
    vectors: dict[str, np.ndarray] = {}
    cache = encoder.cache
    record: dict[str, Any] = {"cache": str(cache.folder) if cache else None, "splits": {}}
    for name, frame in frames.items():
        texts, pairs = split_texts(frame)
        found = plan.found.get(name) if plan is not None else None
        result = encode(texts, encoder.model, cfg, pairs=pairs, cache=cache, found=found)
        vectors[name] = result.vectors
        record["splits"][name] = {
            "texts": len(result.vectors),
            "cache_hits": result.hits,
            "computed": result.misses,
            "seconds": round(result.seconds, 3),
            "real_to_padded_tokens": round(result.real_tokens / max(result.padded_tokens, 1), 4),
        }
    if any("text_pair" in frame for frame in frames.values()):
        record["pair_encoding"] = encoder.identity.pair_encoding.record()
    record["model_loaded"] = encoder.loaded
    return vectors, record


def quantization_fidelity(
    frame: Any, quantized: np.ndarray, model_cfg: Any, cfg: EmbeddingConfig, seed: int, compute_dtype: str
) -> dict[str, Any]:
    """Mean cosine between `quantized` (the run's vectors of `frame`'s texts) and the same model's unquantized
    vectors of those texts at the same `compute_dtype`: what quantization alone costs on this model and data.
    The unquantized model is loaded only when its vectors of these texts are not all cached, once the quantized one
    is gone (the caller drops it), and dropped again afterwards; when it would not fit in the memory free now, the
    check is skipped with the reason in the record."""
    import dataclasses

    reference_cfg = dataclasses.replace(model_cfg, quantization="none", compute_dtype=compute_dtype)
    reference = Encoder(reference_cfg, cfg, seed)
    plan = plan_splits({"fidelity": frame}, reference)
    if not plan.complete:
        too_big = would_not_fit(reference_cfg, compute_dtype)  # collects what the quantized model left first
        if too_big is not None:
            log.warning("quantization fidelity skipped: %s", too_big)
            return {"texts": len(frame), "skipped": too_big}
    texts, pairs = split_texts(frame)
    vectors = encode(
        texts, reference.model, cfg, pairs=pairs, cache=reference.cache, found=plan.found["fidelity"]
    ).vectors
    loaded = reference.loaded
    reference.release()
    release_memory(reference.identity.device)
    cosines = _cosines(quantized, vectors)
    log.info("quantization fidelity: mean cosine %.4f to full precision on %d texts", cosines.mean(), len(frame))
    return {
        "texts": len(frame),
        "mean_cosine": round(float(cosines.mean()), 6),
        "min_cosine": round(float(cosines.min()), 6),
        "reference": f"{reference.identity.quantization}, {reference.identity.compute_dtype}",
        "model_loaded": loaded,
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.asarray((a64 * b64).sum(axis=1) / np.maximum(norms, 1e-12))

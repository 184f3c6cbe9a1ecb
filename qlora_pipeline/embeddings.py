"""Batched encoding of texts into fixed-size vectors: prompt → tokenize → forward → pool → L2-normalize."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from qlora_pipeline.config import EmbeddingConfig
    from qlora_pipeline.modeling import LoadedModel

log = logging.getLogger(__name__)


def apply_prompt(texts: Sequence[str], cfg: EmbeddingConfig) -> list[str]:
    """Wrap texts in the instruction template (Qwen3-Embedding style) when an instruction is set."""
    if not cfg.instruction:
        return list(texts)
    # str.replace, not str.format: review texts may contain braces.
    head, tail = cfg.prompt_template.replace("{instruction}", cfg.instruction).split("{text}", 1)
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


def encode(texts: Sequence[str], loaded: LoadedModel, cfg: EmbeddingConfig) -> np.ndarray:
    """Encode texts to a float32 array `[len(texts), dim]`, in the order given.

    Texts are batched in order of length so that each batch pads little; the original order is restored.
    """
    prompts = apply_prompt(texts, cfg)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    vectors: list[np.ndarray] = []
    real_tokens = padded_tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(order), cfg.batch_size):
            batch = [prompts[i] for i in order[first : first + cfg.batch_size]]
            inputs = tokenizer(batch, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt").to(
                device
            )
            hidden = model(**inputs).last_hidden_state
            pooled = pool(hidden, inputs["attention_mask"], cfg.pooling).float()
            if cfg.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            vectors.append(pooled.cpu().numpy())
            real_tokens += int(inputs["attention_mask"].sum())
            padded_tokens += inputs["attention_mask"].numel()
    seconds = time.perf_counter() - start
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    result = np.empty_like(stacked)
    result[np.asarray(order)] = stacked
    log.info(
        "encoded %d texts in %.2f s (%.0f texts/s; real/padded tokens %.2f)",
        len(texts),
        seconds,
        len(texts) / max(seconds, 1e-9),
        real_tokens / max(padded_tokens, 1),
    )
    return result.astype(np.float32, copy=False)

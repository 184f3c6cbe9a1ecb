"""What the fine-tuned model reads and answers: texts (or pairs) tokenized as training and prediction both see
them, the class logits of a batch (the classification head's, or lm_label's label-word logits), and class
probabilities for a list of texts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qlora_pipeline.finetune import lm_label
from qlora_pipeline.models import pairs as pairs_module
from qlora_pipeline.progress import Progress

if TYPE_CHECKING:
    from qlora_pipeline.models.loading import LoadedModel
    from qlora_pipeline.models.pairs import PairEncoding

log = logging.getLogger(__name__)


def pair_column(frame: Any) -> list[str] | None:
    """The second texts of a pair task (the split frames carry `text_pair` only then), else None."""
    return frame["text_pair"].tolist() if "text_pair" in frame else None


class Examples(torch.utils.data.Dataset[dict[str, Any]]):
    """Tokenized texts, or text pairs as one sequence (unpadded; the collator pads per batch), with labels."""

    def __init__(
        self,
        tokenizer: Any,
        frame: Any,
        max_length: int,
        words: lm_label.LabelWords | None,
        pair_encoding: PairEncoding,
    ) -> None:
        texts, pairs = frame["text"].tolist(), pair_column(frame)
        encoded = encode_texts(tokenizer, texts, pairs, max_length, words, pair_encoding)
        # Every model input the tokenizer gives: input_ids and attention_mask, and for BERT-style encoders the
        # token_type_ids that mark a pair's second text (scoring passes them too, so training must).
        names = list(encoded.keys())
        self.rows: list[dict[str, Any]] = [
            {**{name: encoded[name][i] for name in names}, "labels": int(label)}
            for i, label in enumerate(frame["label"].to_numpy())
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def encode_texts(
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    words: lm_label.LabelWords | None,
    pair_encoding: PairEncoding,
) -> dict[str, list[list[int]]]:
    """Unpadded `input_ids` and `attention_mask` per text (or pair, joined as `pair_encoding` says): as one sequence
    for a classification head, inside the prompt for lm_label."""
    if words is None:
        return pairs_module.encode(tokenizer, texts, pairs, max_length, pair_encoding, setting="training.max_length")
    ids = lm_label.encode(tokenizer, words, texts, pairs, max_length, pair_encoding)
    return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}


def class_logits_fn(words: lm_label.LabelWords | None) -> Callable[[Any, dict[str, Any]], torch.Tensor]:
    """`(model, inputs) -> [batch, classes]` logits: the classification head's, or the label words'."""
    if words is None:
        return lambda model, inputs: model(**inputs).logits
    token_ids = torch.tensor(words.token_ids)
    return lambda model, inputs: lm_label.class_logits(model, inputs, token_ids)


@torch.no_grad()
def predict_proba(
    loaded: LoadedModel,
    words: lm_label.LabelWords | None,
    texts: list[str],
    max_length: int,
    batch_size: int,
    pairs: list[str] | None = None,
    *,
    by_length: bool = False,
) -> np.ndarray:
    """Class probabilities (a float64 softmax of the class logits, so rows sum to one), in input order; `pairs` for
    text-pair tasks. `by_length` batches texts of similar length together (little padding; a text's logits move
    only ~1e-7 with its batch-mates), else batches follow the input order."""
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    device = next(model.parameters()).device
    logits_of = class_logits_fn(words)
    encoded = encode_texts(tokenizer, texts, pairs, max_length, words, loaded.pair_encoding)
    order = list(range(len(texts)))
    if by_length:
        order.sort(key=lambda i: len(encoded["input_ids"][i]))
    proba = np.zeros((len(texts), len(words.words) if words is not None else int(model.config.num_labels)))
    with Progress(len(order), "scoring", "text", logger=log) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            features = [{key: encoded[key][i] for key in encoded} for i in batch]
            inputs = tokenizer.pad(features, padding=True, return_tensors="pt").to(device)
            proba[batch] = torch.softmax(logits_of(model, dict(inputs)).double(), dim=-1).cpu().numpy()
            progress.advance(len(batch))
    return proba

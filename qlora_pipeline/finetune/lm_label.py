"""The `lm_label` head: a causal LM scores each class by the logit of one label word after a prompt.

No new weights: the class logits are the LM head's logits of the label tokens (e.g. 否 / 是) at the prompt's last
token, and the LoRA adapter learns to move them. Every label word must be exactly one token of the model's
tokenizer: a two-token word would be scored on its first piece only, which favours or penalises that class for
reasons unrelated to the text, so such words are refused by name with their token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from qlora_pipeline.errors import UserError
from qlora_pipeline.models import pairs as pairs_module

if TYPE_CHECKING:
    from qlora_pipeline.models.pairs import PairEncoding


@dataclass(frozen=True)
class LabelWords:
    words: list[str]  # one per class, in label order
    token_ids: list[int]
    template: str  # the prompt, with {text} (and {text_pair})

    def to_dict(self) -> dict[str, Any]:
        return {"words": self.words, "token_ids": self.token_ids, "prompt_template": self.template}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LabelWords:
        """The record `to_dict` wrote (labels.json's "lm_label")."""
        return cls(saved["words"], saved["token_ids"], saved["prompt_template"])


def resolve(tokenizer: Any, words: list[str] | None, label_names: list[str], template: str) -> LabelWords:
    """Check `training.label_words` (or, when null, the label names) against the tokenizer: one word per class,
    each a single token, no two the same token."""
    chosen = list(words) if words is not None else list(label_names)
    where = "training.label_words" if words is not None else "the label names (training.label_words is null)"
    if len(chosen) != len(label_names):
        raise UserError(
            f"training.label_words has {len(chosen)} words for {len(label_names)} classes "
            f"({', '.join(label_names)}); give one word per class, in that order"
        )
    pieces = {word: tokenizer.encode(word, add_special_tokens=False) for word in chosen}
    multi = [word for word in chosen if len(pieces[word]) != 1]
    if multi:
        detail = "; ".join(
            f"{word!r} is {len(pieces[word])} tokens ({' + '.join(repr(tokenizer.decode([t])) for t in pieces[word])})"
            for word in multi
        )
        single = [word for word in chosen if word not in multi]
        also = f" (single: {', '.join(repr(w) for w in single)})" if single else ""
        raise UserError(
            f"{where}: each class needs a label word that is exactly one token of this model's tokenizer, "
            f"and {detail}{also}; choose single-token words (set training.label_words)"
        )
    ids = [pieces[word][0] for word in chosen]
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: {chosen} map to the same token; choose words that differ as tokens")
    return LabelWords(chosen, ids, template)


def encode(
    tokenizer: Any,
    words: LabelWords,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    pair_encoding: PairEncoding | None = None,
) -> list[list[int]]:
    """Token ids of each filled-in prompt, at most `max_length` long. The template's text is kept whole and the
    texts are truncated (a pair shares the room, the shorter keeping up to half), so the label word always
    follows the same prompt ending. Pieces are tokenized apart, the same way in training and prediction
    (`models.pairs.fill`). A pair goes into the prompt's {text} and {text_pair}; a prompt with {text} alone takes the
    pair joined by `pair_encoding`'s template (model.pair_template) there."""
    pieces = pairs_module.parse(words.template)
    fields = [name for _, name in pieces if name is not None]
    if pairs is None and "text_pair" in fields:
        raise UserError("training.prompt_template uses {text_pair} but the data has no text_pair column")
    if pairs is not None and "text_pair" not in fields:
        if pair_encoding is None or pair_encoding.template is None:
            raise UserError(
                "the data has text pairs: put {text_pair} in training.prompt_template as well as {text}, or set "
                "model.pair_template to a template (the tokenizer's own pair encoding cannot sit inside a prompt)"
            )
        joined = pairs_module.parse(pair_encoding.template)
        pieces = [part for piece in pieces for part in ([piece] if piece[1] != "text" else [(piece[0], None), *joined])]
    columns = {"text": texts, **({"text_pair": pairs} if pairs is not None else {})}
    # No special tokens after the prompt: the label word's logit is read at the prompt's last token.
    return pairs_module.fill(tokenizer, pieces, columns, max_length, too_short="training.max_length", suffix=False)


def class_logits(model: Any, inputs: dict[str, Any], token_ids: torch.Tensor) -> torch.Tensor:
    """[batch, classes]: the LM's logits of the label tokens at each row's last real token (either padding side).
    Only the needed positions go through the LM head (`logits_to_keep`), not the whole sequence × vocabulary."""
    mask = inputs["attention_mask"]
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)
    positions, row_position = torch.unique(last, return_inverse=True)
    logits = model(**inputs, logits_to_keep=positions).logits  # [batch, len(positions), vocabulary]
    rows = torch.arange(len(last), device=logits.device)
    return logits[rows, row_position.to(logits.device)][:, token_ids.to(logits.device)]

"""How a text, or a text pair, becomes token ids: the one place that joins a pair. The embeddings path, fine-tuning
(both heads), scoring and `qlora predict` all call it, and README's plain-script recipe spells out the same steps.

A tokenizer whose post-processor marks pairs (BERT: `[CLS] a [SEP] b [SEP]` with segment ids 0 and 1) joins them
itself, as `tokenizer(a, b)`. Many decoder tokenizers (Qwen's among them) have no pair template: `tokenizer(a, b)`
gives the ids of `a` followed by those of `b`, nothing between, and the model cannot tell where the first text ends.
`model.pair_template` decides (`auto`: the tokenizer's own where it marks pairs, else `DEFAULT_PAIR_TEMPLATE`):

- the tokenizer's own: `tokenizer(a, b, truncation=True, max_length=...)`, exactly as before templates existed;
- a template (`{text}\\n---\\n{text_pair}`): its literal pieces and the two texts are tokenized apart (no special
  tokens) and concatenated, inside the special tokens the tokenizer puts around one text (Qwen: none; Llama: BOS).
  When that is longer than max_length the texts are cut, never the template: one text at its end; of two, the shorter
  keeps up to half the room and the longer the rest, so neither disappears.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from qlora_pipeline.config import DEFAULT_PAIR_TEMPLATE
from qlora_pipeline.errors import UserError

Pieces = list[tuple[str, str | None]]  # (literal text, then a field name or None), in order


@dataclass(frozen=True)
class PairEncoding:
    """How this run joins a pair: `template` None is the tokenizer's own pair encoding."""

    template: str | None

    def record(self) -> dict[str, Any]:
        """For config.json and labels.json."""
        return {"by": "tokenizer" if self.template is None else "template", "template": self.template}

    def describe(self) -> str:
        if self.template is None:
            return "text pairs joined by the tokenizer's own pair encoding"
        return f"text pairs joined by the template {self.template!r} (texts truncated, the template kept)"


def resolve(tokenizer: Any, setting: str) -> PairEncoding:
    """`model.pair_template` for this tokenizer: auto, tokenizer, or a template with {text} and {text_pair}."""
    if setting == "tokenizer" or (setting == "auto" and marks_pairs(tokenizer)):
        return PairEncoding(None)
    return PairEncoding(DEFAULT_PAIR_TEMPLATE if setting == "auto" else setting)


def marks_pairs(tokenizer: Any) -> bool:
    """Whether `tokenizer(a, b)` marks where `a` ends: anything besides the ids of a then b inside the specials of one
    text (a separator token), or segment ids that tell the texts apart."""
    first, second = "甲", "乙"
    pair = tokenizer(first, second)
    prefix, suffix = _specials(tokenizer)
    plain = prefix + _plain(tokenizer, first) + _plain(tokenizer, second) + suffix
    return list(pair["input_ids"]) != plain or len(set(pair.get("token_type_ids") or [0])) > 1


def _plain(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text (BERT: [CLS], [SEP]; Qwen: none)."""
    single, plain = list(tokenizer("甲")["input_ids"]), _plain(tokenizer, "甲")
    for start in range(len(single) - len(plain) + 1):
        if single[start : start + len(plain)] == plain:
            return single[:start], single[start + len(plain) :]
    raise ValueError(f"the tokenizer's ids of one text {single} do not contain its plain ids {plain}")


def parse(template: str) -> Pieces:
    """A `{field}` template as pieces; templates are checked when the config loads."""
    return [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]


def pair_pieces(encoding: PairEncoding, around: tuple[str, str] = ("", "")) -> Pieces:
    """The pieces of one joined pair, inside `around` (an embedding instruction before and after the query)."""
    if encoding.template is None:
        raise ValueError("the tokenizer's own pair encoding has no pieces")
    return [(around[0], None), *parse(encoding.template), (around[1], None)]


def fill(
    tokenizer: Any,
    pieces: Pieces,
    columns: dict[str, list[str]],
    max_length: int,
    *,
    too_short: str,
    suffix: bool = True,
) -> list[list[int]]:
    """Token ids of each row of `columns` (field name -> texts) put into `pieces`, at most `max_length` long: the
    tokenizer's special tokens for one text around it (the trailing ones only with `suffix`), literal pieces whole,
    texts cut to fit (see `truncate`). Every piece is tokenized on its own. `too_short` starts the error raised when
    the literal pieces alone leave less than a token per text (it names the setting to raise)."""
    prefix, after = _specials(tokenizer)
    after = after if suffix else []
    literals = [_plain(tokenizer, literal) if literal else [] for literal, _ in pieces]
    fields = [name for _, name in pieces if name is not None]
    room = max_length - len(prefix) - len(after) - sum(len(ids) for ids in literals)
    if room < len(fields):
        raise UserError(
            f"{too_short} {max_length} leaves no room for the text: {max_length - room} tokens go to "
            "the template and special tokens; raise it or shorten the template"
        )
    encoded = {name: tokenizer(columns[name], add_special_tokens=False)["input_ids"] for name in set(fields)}
    rows = []
    for index in range(len(next(iter(columns.values())))):
        values = {name: list(encoded[name][index]) for name in encoded}
        truncate(values, room)
        ids = list(prefix)
        for (_, name), literal in zip(pieces, literals, strict=True):
            ids += literal
            if name is not None:
                ids += values[name]
        rows.append(ids + after)
    return rows


def truncate(values: dict[str, list[int]], room: int) -> None:
    """Fit the texts into `room` tokens: one text is cut at the end; of two, the shorter keeps up to half."""
    total = sum(len(ids) for ids in values.values())
    if total <= room:
        return
    if len(values) == 1:
        (name,) = values
        del values[name][room:]
        return
    short, long = sorted(values, key=lambda name: (len(values[name]), name))
    keep = min(len(values[short]), room // 2)
    del values[short][keep:]
    del values[long][room - keep :]


def encode(
    tokenizer: Any,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
    encoding: PairEncoding,
    *,
    setting: str,
    around: tuple[str, str] = ("", ""),
) -> dict[str, list[list[int]]]:
    """Unpadded model inputs (input_ids, attention_mask, and token_type_ids where the tokenizer gives them) of texts,
    or pairs, at most `max_length` tokens (`setting` names that limit in errors). `around`: literal text before and
    after each text, or around each joined pair (an embedding instruction)."""
    head, tail = around
    wrapped = [f"{head}{text}{tail}" for text in texts] if any(around) else texts
    if pairs is None or encoding.template is None:
        return dict(tokenizer(wrapped, pairs, truncation=True, max_length=max_length))
    too_short = f"{setting} (with model.pair_template)"
    ids = fill(
        tokenizer, pair_pieces(encoding, around), {"text": texts, "text_pair": pairs}, max_length, too_short=too_short
    )
    inputs: dict[str, list[list[int]]] = {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
    if "token_type_ids" in tokenizer("甲"):  # one segment: the template marks the pair
        inputs["token_type_ids"] = [[0] * len(row) for row in ids]
    return inputs

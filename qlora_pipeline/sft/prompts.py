"""Prompts and answer-only examples: how a conversation becomes token ids, in training and at generation alike.

Two prompt formats (`sft.prompt_format`):

- `chat_template`: the tokenizer's own chat template. The whole conversation is rendered once; for each assistant
  turn the generation prompt (the turns before it, rendered with `add_generation_prompt=True`) must be a token
  prefix of it, and the turn is labelled from the end of that prefix through the template's end-of-turn token
  (Qwen's `<|im_end|>`). Templates that render history differently from a generation prompt (Qwen3 drops earlier
  reasoning blocks) get one example per assistant turn instead, each labelling its last turn.
- `template`: the documented layout (`sft.prompt_template`, by default `### 指令: / ### 输入: / ### 回答:`) for
  tokenizers without a chat template; each answer is followed by the tokenizer's eos token. A conversation is its
  turns in a row: a system message first (then a blank line), each user turn through `prompt_template_no_input`.

Either way the prompt a model is trained on is, token for token, the prompt `generate` feeds it (`prompt_ids`),
prompt tokens are labelled -100 (loss on the answers only), and every answer ends with the token generation stops
at. Examples longer than `training.max_length` are truncated by `sft.truncation`, and every cut is counted.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qlora_pipeline.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.config import SftConfig

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a token that is not learned (prompt, padding)
PROBE_ANSWER = "7f3a probe answer"  # text no template writes itself, to find where an answer ends
PROBE = [{"role": "user", "content": "probe question"}, {"role": "assistant", "content": PROBE_ANSWER}]


@dataclass(frozen=True)
class PromptFormat:
    """Everything that decides how prompts are rendered: saved with the adapter (sft.json), so `qlora generate`
    renders exactly as training did."""

    kind: str  # "chat_template" or "template"
    template: str  # sft.prompt_template (kind template)
    template_no_input: str
    system_prompt: str | None
    stop_token_ids: list[int]  # the token that ends an answer (generation stops at any of these)
    stop_token: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptFormat:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class TruncationCounts:
    examples: int = 0
    truncated: int = 0
    prompt_tokens_cut: int = 0
    answer_tokens_cut: int = 0
    answers_cut: int = 0  # examples whose answer lost tokens (its end, and so its stop token)
    dropped: int = 0  # examples left with no answer token: removed
    per_turn_examples: int = 0  # conversations split into one example per assistant turn (chat templates)
    answer_tokens: int = 0
    tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def resolve_format(tokenizer: Any, sft: SftConfig, source: str) -> PromptFormat:
    """The prompt format for this tokenizer: its chat template (auto, when it has one; chat_template: required),
    else the documented template; the stop token that ends an answer."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if sft.prompt_format == "chat_template" and not has_template:
        raise UserError(
            f"sft.prompt_format is chat_template but the tokenizer of {source!r} has no chat template; use "
            "sft.prompt_format: template (sft.prompt_template, the `### 指令:` layout by default) or auto"
        )
    kind = (
        "chat_template"
        if sft.prompt_format == "chat_template" or (sft.prompt_format == "auto" and has_template)
        else "template"
    )
    if kind == "template":
        if tokenizer.eos_token_id is None:
            raise UserError(
                f"the tokenizer of {source!r} has no eos token to end answers with; give it one, or use a model "
                "whose tokenizer has a chat template (sft.prompt_format: chat_template)"
            )
        stop = int(tokenizer.eos_token_id)
    else:
        stop = _template_stop_token(tokenizer, source)
    return PromptFormat(
        kind=kind,
        template=sft.prompt_template,
        template_no_input=sft.prompt_template_no_input,
        system_prompt=sft.system_prompt,
        stop_token_ids=[stop],
        stop_token=tokenizer.convert_ids_to_tokens(stop),
    )


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))


def _template_stop_token(tokenizer: Any, source: str) -> int:
    """The special token a chat template puts right after an assistant answer (Qwen: <|im_end|>)."""
    fix = "use sft.prompt_format: template"
    whole = _render(tokenizer, PROBE, False)
    prompt = _render(tokenizer, PROBE[:1], True)
    answer_at = whole.find(PROBE_ANSWER, len(prompt)) if whole.startswith(prompt) else -1
    if answer_at < 0:
        raise UserError(
            f"the chat template of {source!r} does not continue its generation prompt with the answer; {fix}"
        )
    tail = whole[answer_at + len(PROBE_ANSWER) :]
    after = tokenizer(tail, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if getattr(token, "special", False)
    }
    if not after or after[0] not in special:
        raise UserError(
            f"the chat template of {source!r} ends an assistant turn with {tail!r}, no "
            f"end-of-turn token that generation could stop at; {fix}"
        )
    return int(after[0])


# ---- the prompter --------------------------------------------------------------------------------------------


@dataclass
class Prompter:
    """Renders conversations for one tokenizer and prompt format; `prompt_ids` is what generation continues."""

    tokenizer: Any
    format: PromptFormat
    counts: TruncationCounts = field(default_factory=TruncationCounts)

    def _with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.format.system_prompt and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": self.format.system_prompt}, *messages]
        return messages

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- the documented template: segments in a row --

    def _segments(self, messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
        """(text, is an answer) pieces of a conversation in the template layout."""
        pieces: list[tuple[str, bool]] = []
        for turn in messages:
            if turn["role"] == "system":
                pieces.append((turn["content"] + "\n\n", False))
            elif turn["role"] == "user":
                given = turn.get("input")
                template = self.format.template if given else self.format.template_no_input
                values = {"instruction": turn["content"], "input": given} if given else {"instruction": turn["content"]}
                pieces.append((template.format(**values), False))
            else:
                pieces.append((turn["content"], True))
        return pieces

    def _bos(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [bos] if bos is not None and getattr(self.tokenizer, "add_bos_token", False) else []

    # -- chat templates: user turns carry their input inside the content --

    @staticmethod
    def _chat(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
        from qlora_pipeline.data.instructions import turn_text

        return [{"role": t["role"], "content": turn_text(t)} for t in messages]

    def prompt_text(self, messages: list[dict[str, Any]]) -> str:
        """The prompt, as text, for the assistant turn after `messages`."""
        messages = self._with_system(messages)
        if self.format.kind == "chat_template":
            return _render(self.tokenizer, self._chat(messages), True)
        return "".join(text + (self.format.stop_token if answer else "") for text, answer in self._segments(messages))

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the prompt for the assistant turn after `messages`: what generation continues, and exactly
        the tokens training put before that answer."""
        messages = self._with_system(messages)
        if self.format.kind == "chat_template":
            return self._ids(_render(self.tokenizer, self._chat(messages), True))
        ids = self._bos()
        for text, answer in self._segments(messages):
            ids += self._ids(text) + (self.format.stop_token_ids[:1] if answer else [])
        return ids

    def encode(self, messages: list[dict[str, Any]]) -> list[Encoded]:
        """Answer-only examples of one conversation (untruncated): one, or one per assistant turn when a chat
        template renders history unlike its generation prompt."""
        messages = self._with_system(messages)
        if self.format.kind == "template":
            ids = self._bos()
            labels = [IGNORE] * len(ids)
            for text, answer in self._segments(messages):
                piece = self._ids(text) + (self.format.stop_token_ids[:1] if answer else [])
                ids += piece
                labels += piece if answer else [IGNORE] * len(piece)
            return [_trim(Encoded(ids, labels))]
        chat = self._chat(messages)
        whole = self._labelled(chat, [i for i, t in enumerate(chat) if t["role"] == "assistant"])
        if whole is not None:
            return [whole]
        self.counts.per_turn_examples += 1
        examples = []
        for i, turn in enumerate(chat):
            if turn["role"] == "assistant":
                one = self._labelled(chat[: i + 1], [i])
                if one is None:
                    raise UserError(
                        f"the chat template of {self.tokenizer.name_or_path!r} renders an answer after something "
                        "other than its generation prompt; use sft.prompt_format: template"
                    )
                examples.append(one)
        return examples

    def _labelled(self, chat: list[dict[str, str]], answers: list[int]) -> Encoded | None:
        """The conversation's ids with the given assistant turns labelled; None when a generation prompt is not a
        token prefix of the whole rendering."""
        ids = self._ids(_render(self.tokenizer, chat, False))
        labels = [IGNORE] * len(ids)
        stops = set(self.format.stop_token_ids)
        for i in answers:
            prompt = self._ids(_render(self.tokenizer, chat[:i], True))
            if ids[: len(prompt)] != prompt:
                return None
            start = len(prompt)
            end = next((j + 1 for j in range(start, len(ids)) if ids[j] in stops), None)
            if end is None:
                return None
            labels[start:end] = ids[start:end]
        return _trim(Encoded(ids, labels))

    # -- truncation --

    def fit(self, example: Encoded, max_length: int, strategy: str) -> Encoded | None:
        """`example` cut to `max_length` tokens by `strategy` (see `sft.truncation`), counted; None when no answer
        token is left. Cut tokens that were labelled count as answer tokens cut, the others as prompt tokens cut."""
        counts = self.counts
        counts.examples += 1
        ids, labels = example.input_ids, example.labels
        if len(ids) > max_length:
            counts.truncated += 1
            if strategy == "right":
                low, high = 0, max_length
            else:  # keep_answer: the last answer whole where the prompt can spare the room, else half and half
                start = len(labels) - 1
                while start > 0 and labels[start - 1] != IGNORE:
                    start -= 1
                keep_prompt = min(start, max(max_length - (len(ids) - start), max_length // 2))
                low, high = start - keep_prompt, start - keep_prompt + max_length
            answer_cut = sum(label != IGNORE for label in labels[:low] + labels[high:])
            counts.answer_tokens_cut += answer_cut
            counts.prompt_tokens_cut += len(ids) - max_length - answer_cut
            counts.answers_cut += int(answer_cut > 0)
            ids, labels = ids[low:high], labels[low:high]
            if all(label == IGNORE for label in labels):
                counts.dropped += 1
                return None
        counts.answer_tokens += sum(label != IGNORE for label in labels)
        counts.tokens += len(ids)
        return Encoded(ids, labels)


def _trim(example: Encoded) -> Encoded:
    """Drop tokens after the last answer's stop token (a template's trailing newline): they teach nothing."""
    last = max((i for i, label in enumerate(example.labels) if label != IGNORE), default=len(example.labels) - 1)
    return Encoded(example.input_ids[: last + 1], example.labels[: last + 1])


def fitted_examples(
    prompter: Prompter, frame: pd.DataFrame, max_length: int, strategy: str
) -> Iterator[tuple[int, Encoded]]:
    """Every conversation's answer-only examples in `frame`, truncated and counted (those that lost every answer
    token left out), each with the position of its conversation."""
    for index, messages in enumerate(frame["messages"]):
        for example in prompter.encode(messages):
            fitted = prompter.fit(example, max_length, strategy)
            if fitted is not None:
                yield index, fitted


def encode_split(prompter: Prompter, frame: pd.DataFrame, max_length: int, strategy: str) -> list[dict[str, list[int]]]:
    """Training rows (input_ids, attention_mask, labels) of every conversation in `frame`, truncated and counted."""
    return [
        {"input_ids": fitted.input_ids, "attention_mask": [1] * len(fitted.input_ids), "labels": fitted.labels}
        for _, fitted in fitted_examples(prompter, frame, max_length, strategy)
    ]

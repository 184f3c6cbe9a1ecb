"""Answers from an instruction-tuned model: the run's own evaluation, `qlora generate` and `load_generator` all go
through `Generator`, which renders prompts with the run's prompt format (`prompts.py`) and decodes until the answer's
stop token or `max_new_tokens`.

    generator = load_generator("outputs/run_007")
    generator.generate(["写一句酒店好评。", {"instruction": "判断情感", "input": "房间太小了"}])

Prompts are batched by length and padded on the left (a decoder continues the last position of every row); greedy
answers are the same whatever the batch. Sampling draws under a seed (`experiment.seed`, or `seed=`) in a forked RNG,
so a sampled run is reproducible and the caller's random state is untouched. `adapter=False` answers with the base
model alone (the adapter switched off), the comparison every run reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from qlora_pipeline.data.instructions import ROLES
from qlora_pipeline.errors import UserError
from qlora_pipeline.runs import read_json
from qlora_pipeline.sft.prompts import Prompter, PromptFormat
from qlora_pipeline.training.log import ADAPTER_DIR

if TYPE_CHECKING:
    from qlora_pipeline.config import Config, GenerationConfig
    from qlora_pipeline.models.loading import LoadedModel

log = logging.getLogger(__name__)

Prompt = str | dict[str, Any] | list[dict[str, Any]]
SFT_FILE = "sft.json"  # beside the adapter: the prompt format, so generation renders prompts as training did
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", SFT_FILE)
_EMPTY_THINKING = re.compile(r"^\s*<think>\s*</think>\s*")  # Qwen3 answers open with one when not thinking


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int  # generated, the stop token not counted
    stopped: bool  # ended with the stop token (False: cut at max_new_tokens)


def as_conversation(prompt: Prompt, instruction: str | None = None) -> list[dict[str, Any]]:
    """A prompt as the messages before the answer: a plain string is one user turn (the input to `instruction`,
    when the run was trained on one fixed `sft.instruction`); a dict is an alpaca record (`instruction`, optional
    `input` and `system`) or holds `messages`; a list is the messages themselves."""
    if isinstance(prompt, str):
        if instruction is not None:
            return [{"role": "user", "content": instruction, "input": prompt}]
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict) and "messages" in prompt:
        return as_conversation(prompt["messages"])
    if isinstance(prompt, dict) and "instruction" in prompt:
        turns = [{"role": "system", "content": str(prompt["system"])}] if prompt.get("system") else []
        given = prompt.get("input")
        return [*turns, {"role": "user", "content": str(prompt["instruction"]), "input": str(given or "")}]
    if isinstance(prompt, list) and all(isinstance(t, dict) and "role" in t and "content" in t for t in prompt):
        unknown = sorted({str(t["role"]) for t in prompt} - set(ROLES))
        if unknown:
            raise UserError(f"a prompt has messages with unknown roles {unknown}: roles must be {', '.join(ROLES)}")
        return [dict(t) for t in prompt]
    raise UserError(
        f"a prompt must be a string, {{instruction, input}}, {{messages: [...]}} or a list of {{role, content}}; "
        f"got {str(prompt)[:80]!r}"
    )


@dataclass
class Generator:
    """A model with its prompt format, ready to answer. `loaded.model` is the PeftModel (base + adapter)."""

    loaded: LoadedModel
    prompt: PromptFormat
    config: Config  # the run's: generation settings, seed, sft columns (for files), CPU threads
    run_dir: Path | None = None
    _prompter: Prompter | None = field(default=None, repr=False)

    @property
    def settings(self) -> GenerationConfig:
        return self.config.generation

    @property
    def seed(self) -> int:
        return self.config.experiment.seed

    @property
    def prompter(self) -> Prompter:
        if self._prompter is None:
            self._prompter = Prompter(self.loaded.tokenizer, self.prompt)
        return self._prompter

    def generate(self, prompts: Sequence[Prompt], **options: Any) -> list[str]:
        """The answer to each prompt, in order (see `answers` for the options)."""
        return [answer.text for answer in self.answers(prompts, **options)]

    def answers(
        self,
        prompts: Sequence[Prompt],
        *,
        adapter: bool = True,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
    ) -> list[Answer]:
        """Answers with the run's generation settings, each overridable here; `adapter=False`: the base alone."""
        import torch
        from transformers import GenerationConfig as Decoding

        settings = self.settings
        sample = settings.do_sample if do_sample is None else do_sample
        decoding = Decoding(
            max_new_tokens=max_new_tokens or settings.max_new_tokens,
            do_sample=sample,
            **(
                {
                    "temperature": temperature or settings.temperature,
                    "top_p": top_p or settings.top_p,
                    "top_k": settings.top_k if top_k is None else top_k,
                }
                if sample
                else {"temperature": None, "top_p": None, "top_k": None}
            ),
            pad_token_id=self.loaded.tokenizer.pad_token_id,
            eos_token_id=self.stop_ids(),
        )
        fixed = self.config.sft.instruction
        ids = [self.prompter.prompt_ids(as_conversation(p, fixed)) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        model = self.loaded.model
        model.eval()
        device = next(model.parameters()).device
        results: list[Answer | None] = [None] * len(ids)
        size = batch_size or settings.batch_size
        devices = [device.index or 0] if device.type == "cuda" else []
        switched = contextlib.nullcontext() if adapter else model.disable_adapter()  # off: the base alone
        with torch.random.fork_rng(devices=devices), switched, torch.no_grad():
            torch.manual_seed(self.seed if seed is None else seed)  # used by sampling only
            for start in range(0, len(order), size):
                batch = order[start : start + size]
                longest = max(len(ids[i]) for i in batch)
                pad = int(self.loaded.tokenizer.pad_token_id)
                input_ids = torch.tensor([[pad] * (longest - len(ids[i])) + ids[i] for i in batch], device=device)
                mask = torch.tensor([[0] * (longest - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=device)
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=decoding)
                for row, i in enumerate(batch):
                    results[i] = self._decode(out[row, longest:].tolist())
        return [r for r in results if r is not None]

    def stop_ids(self) -> list[int]:
        return stop_ids(self.prompt.stop_token_ids, self.loaded.tokenizer)

    def _decode(self, new_tokens: list[int]) -> Answer:
        stops = set(self.stop_ids())
        end = next((i for i, token in enumerate(new_tokens) if token in stops), None)
        kept = new_tokens if end is None else new_tokens[:end]
        text = self.loaded.tokenizer.decode(kept, skip_special_tokens=True)
        return Answer(_EMPTY_THINKING.sub("", text).strip(), len(kept), end is not None)


def stop_ids(stop_token_ids: Sequence[int], tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the prompt format's stop tokens, then the tokenizer's eos (once each)."""
    eos = tokenizer.eos_token_id
    return list(dict.fromkeys([*stop_token_ids, *([eos] if eos is not None else [])]))


# ---- a finished run -------------------------------------------------------------------------------------


def run_config(run_dir: str | Path) -> tuple[Path, Config, dict[str, Any]]:
    """The run directory, its config and its sft.json, after checking it is a finished sft run with an adapter."""
    from qlora_pipeline.config import Config

    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist; pass a run directory such as outputs/run_007")
    for name in ("status.json", "config.json"):
        if not (run / name).is_file():
            raise UserError(f"{run} has no {name}: not a run directory")
    status = read_json(run / "status.json")
    if status.get("state") != "succeeded":
        why = f" ({status['error']})" if status.get("error") else ""
        raise UserError(f"run {run} is {status.get('state')}{why}; generate from a run that succeeded")
    try:
        config = Config.from_dict(read_json(run / "config.json")["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{run}/config.json is not a run archive ({exc})") from exc
    if config.experiment.mode != "sft":
        raise UserError(
            f"run {run} is a {config.experiment.mode} run (a classifier): score texts with `qlora predict --run {run}`;"
            " `qlora generate` and `qlora export` take sft runs"
        )
    adapter = run / "models" / "all" / ADAPTER_DIR
    missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
    if missing:
        raise UserError(f"run {run} is missing {', '.join(missing)} in {adapter}; its model files are incomplete")
    return run, config, read_json(adapter / SFT_FILE)


def load_generator(
    run_dir: str | Path,
    *,
    device: Literal["auto", "cpu", "cuda"] | None = None,
    batch_size: int | None = None,
) -> Generator:
    """A finished sft run's model (the NF4 base as the run loaded it, with its adapter) and prompt format.
    `device`: where it runs (default: the run's model.device); `batch_size`: prompts per forward pass."""

    from qlora_pipeline.models.loading import load_model, quiet_library_warnings

    run, config, record = run_config(run_dir)
    if device is not None:
        config = replace(config, model=replace(config.model, device=device))
    loaded = load_model(config.model, task="causal_lm", seed=config.experiment.seed)
    from peft import PeftModel  # after load_model: its bitsandbytes import stays quiet

    prompt = PromptFormat.from_dict(record["prompt_format"])
    tokens = loaded.tokenizer.convert_ids_to_tokens(prompt.stop_token_ids)
    if tokens != [prompt.stop_token]:
        raise UserError(
            f"run {run} ends answers with {prompt.stop_token!r} (token {prompt.stop_token_ids}), but this model's "
            f"tokenizer reads that id as {tokens}: generate with the base model the run was trained on"
        )
    with quiet_library_warnings():
        model = PeftModel.from_pretrained(loaded.model, run / "models" / "all" / ADAPTER_DIR).eval()
    if batch_size is not None:
        config = replace(config, generation=replace(config.generation, batch_size=batch_size))
    return Generator(replace(loaded, model=model), prompt, config, run)

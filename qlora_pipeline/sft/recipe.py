"""The instruction recipe: setup → train → save. Readable top to bottom, the same steps as the QLoRA classifier's
(finetune/recipe.py) on the causal LM.

A 4-bit NF4 base (`models.loading.load_model`, task causal_lm), `prepare_model_for_kbit_training`, LoRA on the
configured linear layers (the LM head keeps its weights), the prompt format resolved against the tokenizer
(`prompts.py`). The HF Trainer runs the loop with the settings both paths share (`training/trainer.py`: optimizer,
warmup + cosine, accumulation, length-grouped batches, evaluation, checkpoints, early stopping on the validation loss)
and the model's own loss: next-token cross-entropy over the answer tokens only (prompt and padding are labelled
-100), averaged over every answer token of an optimizer step, gradient accumulation included (the Trainer passes the
step's token count to the loss). Batches are padded to their longest example (dynamic padding), or packed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_pipeline.errors import UserError
from qlora_pipeline.models.loading import LoadedModel, check_max_length, load_model
from qlora_pipeline.sft.generation import SFT_FILE
from qlora_pipeline.sft.prompts import IGNORE, Prompter, PromptFormat, encode_split, resolve_format
from qlora_pipeline.training.log import ADAPTER_DIR, reproducible_log, training_summary
from qlora_pipeline.training.lora import add_lora, check_target_modules, output_layer_name, prepare_for_training
from qlora_pipeline.training.trainer import run_trainer, training_arguments, training_callbacks

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass
class Tuned:
    loaded: LoadedModel  # .model is the PeftModel with the trained adapter
    prompt: PromptFormat
    trainable_parameters: int
    total_parameters: int
    log_history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # timings, throughput, memory, truncation: config.json
    notes: list[str] = field(default_factory=list)

    def prompter(self) -> Prompter:
        """A fresh prompter (its truncation counts start at zero)."""
        return Prompter(self.loaded.tokenizer, self.prompt)


# ---- setup ----------------------------------------------------------------------------------------------


def setup(config: Config, seed: int) -> Tuned:
    """The causal LM in NF4, prepared for k-bit training and wrapped with LoRA; its prompt format."""
    train = config.training
    loaded = load_base(config, seed)
    check_max_length(loaded, train.max_length, "training.max_length")
    head = lm_head_name(loaded)
    targets = check_target_modules(loaded.model, train.target_modules, head)
    prompt = resolve_format(loaded.tokenizer, config.sft, loaded.source)
    model = add_lora(prepare_for_training(loaded, train), train, targets, [], seed, causal_lm=True)
    # Training and loss forwards keep no KV cache (a cache would also hide packed batches from the attention mask,
    # which transformers builds per example from the position ids only without one); generate asks for its own.
    model.config.use_cache = False
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d on %s; trainable %d of %d parameters (%.2f%%)",
        train.lora_r,
        targets,
        trainable,
        total,
        100 * trainable / total,
    )
    tuned = Tuned(dataclasses.replace(loaded, model=model), prompt, trainable, total)
    if prompt.kind == "chat_template":
        tuned.notes.append(f"prompts: the tokenizer's chat template; answers end with {prompt.stop_token!r}")
    else:
        why = "the tokenizer has no chat template" if config.sft.prompt_format == "auto" else "sft.prompt_format"
        tuned.notes.append(f"prompts: sft.prompt_template ({why}); answers end with eos {prompt.stop_token!r}")
    log.info(tuned.notes[-1])
    return tuned


def load_base(config: Config, seed: int) -> LoadedModel:
    unsupported = (
        f"model.name_or_path {config.model.name_or_path!r}: its architecture has no causal-LM class in "
        "transformers, and experiment.mode sft trains a model to write answers; choose a decoder (Qwen, Llama, ...)"
    )
    return load_model(config.model, task="causal_lm", seed=seed, unsupported=unsupported)


def lm_head_name(loaded: LoadedModel) -> str:
    """The output layer's name (it gets no adapter: peft's all-linear leaves it out too)."""
    name = output_layer_name(loaded.model)
    if name is None:
        raise UserError(f"model {loaded.source!r} has no output embedding layer to generate with")
    if any(key.startswith(name + ".") for key in loaded.new_weights):
        raise UserError(f"model {loaded.source!r} has no pretrained LM head ({name} is newly initialised)")
    return name.rsplit(".", 1)[-1]


# ---- data -----------------------------------------------------------------------------------------------


class Rows(torch.utils.data.Dataset[dict[str, Any]]):
    """Tokenized examples (unpadded; the collator pads per batch)."""

    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


@dataclass(frozen=True)
class PadRight:
    """Dynamic padding: a batch padded to its longest example, on the right (positions then count from 0 in every
    row, as in an unpadded example), labels padded with -100."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            room = longest - len(f["input_ids"])
            batch["input_ids"].append(f["input_ids"] + [self.pad_token_id] * room)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * room)
            batch["labels"].append(f["labels"] + [IGNORE] * room)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def collator(tuned: Tuned, packing: bool) -> Any:
    """Right padding per batch, or packing: the batch's examples in one row, positions restarting at each (the
    model's attention mask then keeps every example to itself)."""
    if packing:
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
    return PadRight(int(tuned.loaded.tokenizer.pad_token_id))


def encode(tuned: Tuned, config: Config, frame: pd.DataFrame) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """A split's training rows and what truncation did to them (`sft.truncation`)."""
    prompter = tuned.prompter()
    rows = encode_split(prompter, frame, config.training.max_length, config.sft.truncation)
    return rows, prompter.counts.to_dict()


# ---- train ----------------------------------------------------------------------------------------------


def train(
    tuned: Tuned,
    config: Config,
    train_rows: list[dict[str, list[int]]],
    validation_rows: list[dict[str, list[int]]],
    seed: int,
    work_dir: Path,
    *,
    marker: Any,
    resume_from: Path | None = None,
) -> Tuned:
    """Fit the adapter, checkpointing into `work_dir` (from `resume_from` when given); with early stopping the best
    checkpoint's adapter is restored. The per-step log lands in `log_history`, timings and memory in `summary`."""
    from transformers import Trainer

    train_cfg = config.training
    trainer, seconds = run_trainer(
        lambda: Trainer(
            model=tuned.loaded.model,
            args=training_arguments(train_cfg, tuned.loaded, work_dir, seed, tuned.notes),
            train_dataset=Rows(train_rows),
            eval_dataset=Rows(validation_rows),
            data_collator=collator(tuned, config.sft.packing),
            processing_class=tuned.loaded.tokenizer,
            callbacks=training_callbacks(train_cfg, marker),
        ),
        resume_from,
    )
    tuned.log_history = reproducible_log(trainer.state.log_history)
    tuned.summary = training_summary(
        trainer,
        train_cfg,
        notes=tuned.notes,
        log_history=tuned.log_history,
        parameters=(tuned.trainable_parameters, tuned.total_parameters),
        counts={
            "train_examples": len(train_rows),
            "train_tokens_per_epoch": sum(len(row["input_ids"]) for row in train_rows),
            "answer_tokens_per_epoch": sum(sum(t != IGNORE for t in row["labels"]) for row in train_rows),
        },
        seconds=seconds,
        resume_from=resume_from,
        best_metric_name="loss",
        loss="answer-token cross-entropy",
    )
    return tuned


# ---- save -----------------------------------------------------------------------------------------------


def save(tuned: Tuned, out_dir: Path, max_length: int) -> Path:
    """Adapter and tokenizer, loadable by `PeftModel.from_pretrained` on the NF4 base; sft.json holds the prompt
    format (template or chat template, the stop token), so generation renders prompts as training did."""
    target = out_dir / ADAPTER_DIR
    tuned.loaded.model.save_pretrained(target)
    tuned.loaded.tokenizer.save_pretrained(target)
    record = {"prompt_format": tuned.prompt.to_dict(), "max_length": max_length, "base_model": tuned.loaded.source}
    (target / SFT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("adapter saved to %s", target)
    return target

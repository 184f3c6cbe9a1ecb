"""The QLoRA recipe: setup → train → evaluate → save. Readable top to bottom.

A 4-bit NF4 base (`modeling.load_model`, sequence-classification head), `prepare_model_for_kbit_training`, LoRA
adapters on the configured linear layers, and the freshly initialised classification head trained in full and
saved with the adapter (`modules_to_save`). With `training.head: lm_label` the base is the causal LM and the class
logits are its logits of one label word per class after a prompt (`lm_label.py`); nothing new is initialised.
HF `Trainer` runs the loop (optimizer by name, warmup + cosine, gradient accumulation, length-grouped batches,
mixed precision on GPUs); only the loss and the class logits are ours (`losses.py`, `class_logits_fn`).
Every decision that differs from what the config literally says is logged and returned in `notes`.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from qlora_pipeline import lm_label
from qlora_pipeline.checkpoints import checkpoint_step
from qlora_pipeline.errors import UserError
from qlora_pipeline.losses import classification_loss, loss_weights
from qlora_pipeline.modeling import (
    HEAD_NAMES,
    POOLER,
    UNQUANTIZED_MODULES,
    LoadedModel,
    Task,
    check_max_length,
    load_model,
)
from qlora_pipeline.trainer import eval_metrics, make_trainer_class, training_arguments, training_callbacks

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.config import Config

log = logging.getLogger(__name__)

ADAPTER_DIR = "lora_adapter"


@dataclass
class FineTuned:
    loaded: LoadedModel  # .model is the PeftModel with the trained adapter
    head: str
    trained_in_full: list[str]  # the head, and BERT's pooler: peft's modules_to_save
    trainable_parameters: int
    total_parameters: int
    label_words: lm_label.LabelWords | None = None  # head lm_label: the prompt and the class tokens
    log_history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # timings, throughput, memory, notes: config.json
    notes: list[str] = field(default_factory=list)


# ---- setup ----------------------------------------------------------------------------------------------


def setup(config: Config, num_labels: int, seed: int, label_names: list[str] | None = None) -> FineTuned:
    """NF4 base with a `num_labels` head, prepared for k-bit training, wrapped with LoRA (+ the head in full);
    for `training.head: lm_label` the causal LM with the label words of `label_names` checked against its tokenizer."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    train = config.training
    lm = train.head == "lm_label"
    try:
        task: Task = "causal_lm" if lm else "sequence_classification"
        loaded = load_model(config.model, task=task, num_labels=None if lm else num_labels, seed=seed)
    except ValueError as exc:  # transformers' Auto class has no class for this architecture
        if "Unrecognized configuration class" not in str(exc):
            raise
        name = config.model.name_or_path
        if lm:
            raise UserError(
                f"model.name_or_path {name!r}: its architecture has no causal-LM class in transformers, which "
                "training.head lm_label needs; use training.head classification (encoders such as BERT)"
            ) from exc
        raise UserError(
            f"model.name_or_path {name!r}: its architecture has no sequence-classification class in transformers; "
            "set training.head: lm_label to score label words with its causal LM, choose a base with a "
            "*ForSequenceClassification class (Qwen, Llama, BERT, ...), or use experiment.mode embeddings"
        ) from exc
    model = loaded.model
    words = None
    if lm:
        head = _lm_head(loaded)
        names = label_names if label_names is not None else [str(i) for i in range(num_labels)]
        words = lm_label.resolve(loaded.tokenizer, train.label_words, names, train.prompt_template)
    else:
        found = next((name for name in HEAD_NAMES if isinstance(getattr(model, name, None), torch.nn.Module)), None)
        if found is None:
            raise UserError(f"model {loaded.source!r} has no classification head named {' or '.join(HEAD_NAMES)}")
        head = found
    check_max_length(loaded, train.max_length, "training.max_length")
    targets = check_target_modules(model, train.target_modules, head)
    if loaded.quantization != "none":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},  # the reentrant variant warns and is deprecated
        )
    elif train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # A new classification head is trained in full and saved beside the adapter; so is a BERT-style pooler, the
    # dense layer between the encoder and the classifier (new when the checkpoint lacks it, else pretrained for
    # another task). peft then puts no LoRA on it, whatever target_modules says. lm_label's LM head stays as it is.
    in_full = [] if lm else [head, *([POOLER] if _has_module(model, POOLER) else [])]
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if lm else TaskType.SEQ_CLS,
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=targets,
        modules_to_save=list(in_full) or None,  # peft adds its SEQ_CLS defaults to the list it is given
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):  # LoRA A matrices are random: draw them under the run's seed
        torch.manual_seed(seed)
        model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d on %s, %s trained in full; trainable %d of %d parameters (%.2f%%)",
        train.lora_r,
        targets,
        " and ".join(in_full) or "nothing",
        trainable,
        total,
        100 * trainable / total,
    )
    loaded = dataclasses.replace(loaded, model=model)
    tuned = FineTuned(loaded, head, in_full, trainable, total, label_words=words)  # model notes: config.json
    if POOLER in in_full:
        tuned.notes.append(f"the encoder's {POOLER} is trained in full with the {head}, in full precision")
    if words is not None:
        tuned.notes.append(
            "lm_label head: class scores are the LM logits of "
            + " / ".join(f"{w!r} (token {t})" for w, t in zip(words.words, words.token_ids, strict=True))
            + f" after the prompt {words.template!r}"
        )
        log.info(tuned.notes[-1])
    return tuned


def _lm_head(loaded: LoadedModel) -> str:
    """The name of the causal LM's output layer. Refused for encoders (BERT and kin load a masked-LM head whose
    logits at the last token are no next-word prediction) and when the LM head's weights were not in the
    checkpoint (freshly initialised, its label-word logits would mean nothing)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model, source = loaded.model, loaded.source
    fix = "use training.head classification for this base"
    if model.config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(model.config, "is_decoder", False):
        raise UserError(
            f"model {source!r} is an encoder ({model.config.model_type}), and training.head lm_label needs a causal "
            f"(decoder) LM that predicts the word after the prompt; {fix}"
        )
    output = model.get_output_embeddings()
    name = next((n for n, module in model.named_modules() if module is output), None)
    if name is None:
        raise UserError(f"model {source!r} has no output embedding layer to score label words with; {fix}")
    if any(key.startswith(name + ".") for key in loaded.new_weights):
        raise UserError(
            f"model {source!r} has no pretrained LM head ({name} is newly initialised), so training.head lm_label "
            f"has nothing to score label words with; {fix}"
        )
    return name.rsplit(".", 1)[-1]


def _has_module(model: torch.nn.Module, name: str) -> bool:
    return any(path.rsplit(".", 1)[-1] == name for path, _ in model.named_modules())


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct last name components of the model's linear layers (4-bit, 8-bit or plain)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_linear(module)}
    return sorted(names)


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def check_target_modules(model: torch.nn.Module, targets: str | list[str], head: str) -> str | list[str]:
    """`all-linear` passes through (peft excludes the head); each listed name must match some linear layer."""
    if isinstance(targets, str):
        if targets != "all-linear":
            targets = [targets]
        else:
            return targets
    available = linear_layer_names(model)
    missing = [t for t in targets if t not in available or t == head]
    if missing:
        choices = ", ".join(n for n in available if n != head)
        raise UserError(
            f"training.target_modules: {', '.join(repr(m) for m in missing)} "
            f"{'matches' if len(missing) == 1 else 'match'} no linear layer of the model "
            f"(the head '{head}' is trained in full anyway); its linear layers are: {choices}; or use 'all-linear'"
        )
    return list(targets)


# ---- train ----------------------------------------------------------------------------------------------


def pair_column(frame: Any) -> list[str] | None:
    """The second texts of a pair task (the split frames carry `text_pair` only then), else None."""
    return frame["text_pair"].tolist() if "text_pair" in frame else None


class _Examples(torch.utils.data.Dataset[dict[str, Any]]):
    """Tokenized texts, or text pairs as one sequence (unpadded; the collator pads per batch), with labels."""

    def __init__(self, tokenizer: Any, frame: Any, max_length: int, words: lm_label.LabelWords | None) -> None:
        encoded = encode_texts(tokenizer, frame["text"].tolist(), pair_column(frame), max_length, words)
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
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int, words: lm_label.LabelWords | None
) -> dict[str, list[list[int]]]:
    """Unpadded `input_ids` and `attention_mask` per text (or pair): as one sequence for a classification head,
    inside the prompt for lm_label."""
    if words is None:
        return dict(tokenizer(texts, pairs, truncation=True, max_length=max_length))
    ids = lm_label.encode(tokenizer, words, texts, pairs, max_length)
    return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}


def class_logits_fn(words: lm_label.LabelWords | None) -> Callable[[Any, dict[str, Any]], torch.Tensor]:
    """`(model, inputs) -> [batch, classes]` logits: the classification head's, or the label words'."""
    if words is None:
        return lambda model, inputs: model(**inputs).logits
    token_ids = torch.tensor(words.token_ids)
    return lambda model, inputs: lm_label.class_logits(model, inputs, token_ids)


def train(
    tuned: FineTuned,
    config: Config,
    train_split: pd.DataFrame,
    validation: pd.DataFrame,
    seed: int,
    work_dir: Path,
    *,
    marker: Any,
    resume_from: Path | None = None,
    data_weights: dict[int, float] | None = None,
) -> FineTuned:
    """Fit the adapter and head, checkpointing into `work_dir` (from `resume_from` when given); with early
    stopping the best checkpoint's adapter and head are restored. The per-step log lands in `log_history`."""
    from transformers import DataCollatorWithPadding, PrinterCallback

    train_cfg = config.training
    tokenizer, model = tuned.loaded.tokenizer, tuned.loaded.model
    labels = train_split["label"].to_numpy()
    words = tuned.label_words
    num_labels = len(words.words) if words is not None else int(model.config.num_labels)
    weights, source = loss_weights(train_cfg.class_weights, labels, num_labels, data_weights)
    if weights is not None:
        tuned.notes.append(f"class weights ({source}) " + ", ".join(f"{w:.3f}" for w in weights.tolist()))
        log.info("loss class weights (%s): %s", source, [round(w, 4) for w in weights.tolist()])
    loss_fn = classification_loss(train_cfg.loss, weights, train_cfg.focal_gamma)
    train_set = _Examples(tokenizer, train_split, train_cfg.max_length, tuned.label_words)
    eval_set = _Examples(tokenizer, validation, train_cfg.max_length, tuned.label_words)
    args = training_arguments(train_cfg, tuned.loaded, work_dir, seed, tuned.notes)
    # full_determinism switches deterministic algorithms on for the whole process; switched back after training,
    # so a notebook that trains and then predicts is not left on the slower kernels.
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=eval_metrics,
        callbacks=training_callbacks(train_cfg, marker),
        loss_fn=loss_fn,
        logits_fn=class_logits_fn(tuned.label_words),
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; training_log.csv keeps them
    tokens = sum(len(row["input_ids"]) for row in train_set.rows)
    start = time.perf_counter()
    with warnings.catch_warnings():  # already a note in config.json, not a warning on every run
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            torch.use_deterministic_algorithms(deterministic_before)
    seconds = time.perf_counter() - start
    state = trainer.state
    steps_here = state.global_step - ((checkpoint_step(resume_from) or 0) if resume_from else 0)
    # Under torchrun every process takes its own batch_size per micro-step: the optimizer sees world_size times more.
    world = int(args.world_size)
    effective_batch = train_cfg.batch_size * train_cfg.gradient_accumulation_steps * world
    samples = steps_here * effective_batch
    if world > 1:
        tuned.notes.append(
            f"data-parallel on {world} processes (DDP, {args.distributed_state.backend}): effective batch "
            f"{effective_batch} = {train_cfg.batch_size} per process x {train_cfg.gradient_accumulation_steps} "
            f"accumulation x {world}; a rerun reproduces with the same number of processes"
        )
    tuned.log_history = [  # timings vary run to run; the log keeps what reproduces
        {k: v for k, v in row.items() if not k.endswith(("_runtime", "_per_second"))}
        for row in state.log_history
        if "train_runtime" not in row
    ]
    step_losses = [row["loss"] for row in tuned.log_history if "loss" in row]
    if train_cfg.early_stopping_patience:
        stopped = state.global_step < state.max_steps
        tuned.notes.append(
            f"best checkpoint: step {state.best_global_step} (validation {train_cfg.early_stopping_metric} "
            f"{state.best_metric:.4f}), restored for evaluation and saved"
            + (f"; early stopping after {state.global_step} of {state.max_steps} steps" if stopped else "")
        )
    tuned.summary = {
        "optimizer_steps": state.global_step,
        "best_step": state.best_global_step if train_cfg.early_stopping_patience else None,
        "best_metric": state.best_metric if train_cfg.early_stopping_patience else None,
        "epochs": round(float(state.epoch or 0), 4),
        "train_loss": float(np.mean(step_losses)) if step_losses else None,  # mean per-step loss, resume-proof
        "train_seconds": round(seconds, 3),
        "samples_per_second": round(samples / seconds, 2),  # all processes together
        "world_size": world,
        "effective_batch_size": effective_batch,
        "train_tokens_per_epoch": tokens,
        "trainable_parameters": tuned.trainable_parameters,
        "total_parameters": tuned.total_parameters,
        "peak_rss_mb": peak_rss_mb(),
        "loss": train_cfg.loss,
        "notes": tuned.notes,
    }
    log.info(
        "trained %d steps in %.1f s (%.1f samples/s), peak RSS %.0f MB",
        steps_here,
        seconds,
        tuned.summary["samples_per_second"],
        tuned.summary["peak_rss_mb"],
    )
    return tuned


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---- evaluate -------------------------------------------------------------------------------------------


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
    encoded = encode_texts(tokenizer, texts, pairs, max_length, words)
    order = list(range(len(texts)))
    if by_length:
        order.sort(key=lambda i: len(encoded["input_ids"][i]))
    proba = np.zeros((len(texts), len(words.words) if words is not None else int(model.config.num_labels)))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        features = [{key: encoded[key][i] for key in encoded} for i in batch]
        inputs = tokenizer.pad(features, padding=True, return_tensors="pt").to(device)
        proba[batch] = torch.softmax(logits_of(model, dict(inputs)).double(), dim=-1).cpu().numpy()
    return proba


# ---- save -----------------------------------------------------------------------------------------------


def save(tuned: FineTuned, out_dir: Path, label_names: list[str], threshold: dict[str, Any] | None = None) -> Path:
    """Adapter (LoRA weights + the head) and tokenizer, loadable by `PeftModel.from_pretrained` on the same base;
    labels.json names the classes and, when calibrated, the P(positive) threshold that prediction should use.

    "The same base" is the base loaded as `modeling.load_model` loads it: a 4-bit base keeps the head (and pooler)
    in full precision, so a plain script passes labels.json's `unquantized_modules` to `BitsAndBytesConfig` as
    `llm_int8_skip_modules` (transformers would otherwise quantize BERT's classifier)."""
    import json

    target = out_dir / ADAPTER_DIR
    cut = None if threshold is None else {k: threshold[k] for k in ("metric", "value", "logit_margin")}
    tuned.loaded.model.save_pretrained(target)
    tuned.loaded.tokenizer.save_pretrained(target)
    quantized = tuned.loaded.quantization != "none"
    labels = {
        "label_names": label_names,
        "head": tuned.head,
        "trained_in_full": tuned.trained_in_full,
        # What a plain script keeps out of 4-bit when it builds the base (llm_int8_skip_modules); none for lm_label.
        "unquantized_modules": UNQUANTIZED_MODULES if quantized and tuned.trained_in_full else None,
        "threshold": cut,
        "lm_label": None if tuned.label_words is None else tuned.label_words.to_dict(),
    }
    text = json.dumps(labels, indent=2, ensure_ascii=False) + "\n"
    (target / "labels.json").write_text(text, encoding="utf-8")
    log.info("adapter saved to %s", target)
    return target

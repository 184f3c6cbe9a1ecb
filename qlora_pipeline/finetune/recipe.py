"""The QLoRA recipe: setup → train → save. Readable top to bottom.

A 4-bit NF4 base (`models.loading.load_model`, sequence-classification head), `prepare_model_for_kbit_training`,
LoRA adapters on the configured linear layers, and the freshly initialised classification head trained in full and
saved with the adapter (`modules_to_save`). With `training.head: lm_label` the base is the causal LM and the class
logits are its logits of one label word per class after a prompt (`lm_label.py`); nothing new is initialised.
HF `Trainer` runs the loop (`trainer.py`: optimizer by name, warmup + `training.lr_scheduler`, gradient accumulation,
length-grouped batches, mixed precision on GPUs); only the loss and the class logits are ours (`losses.py`,
`scoring.py`).
Every decision that differs from what the config literally says is logged and returned in `notes`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qlora_pipeline.errors import UserError
from qlora_pipeline.finetune import lm_label
from qlora_pipeline.finetune.losses import ClassLoss, classification_loss, loss_weights
from qlora_pipeline.finetune.scoring import Examples, class_logits_fn
from qlora_pipeline.integrity import record_checksums
from qlora_pipeline.models.loading import (
    POOLER,
    UNQUANTIZED_MODULES,
    LoadedModel,
    Task,
    check_max_length,
    load_model,
)
from qlora_pipeline.training.log import ADAPTER_DIR, reproducible_log, training_summary
from qlora_pipeline.training.lora import (
    add_lora,
    check_target_modules,
    check_trainable_float32,
    classification_head,
    output_layer_name,
    prepare_for_training,
    trained_in_full,
)
from qlora_pipeline.training.trainer import (
    eval_metrics,
    make_trainer_class,
    run_trainer,
    training_arguments,
    training_callbacks,
)

if TYPE_CHECKING:
    import pandas as pd

    from qlora_pipeline.config import Config, TrainingConfig

log = logging.getLogger(__name__)


@dataclass
class FineTuned:
    loaded: LoadedModel  # .model is the PeftModel with the trained adapter
    head: str
    trained_in_full: list[str]  # the head, and BERT's pooler: peft's modules_to_save
    trainable_parameters: int
    total_parameters: int
    label_words: lm_label.LabelWords | None = None  # head lm_label: the prompt and the class tokens
    pairs: bool = False  # trained on text pairs (joined as loaded.pair_encoding says)
    log_history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)  # timings, throughput, memory, notes: config.json
    notes: list[str] = field(default_factory=list)


# ---- setup ----------------------------------------------------------------------------------------------


def setup(config: Config, num_labels: int, seed: int, label_names: list[str] | None = None) -> FineTuned:
    """NF4 base with a `num_labels` head, prepared for k-bit training, wrapped with LoRA (+ the head in full);
    for `training.head: lm_label` the causal LM with the label words of `label_names` checked against its tokenizer."""
    train = config.training
    loaded = load_base(config, num_labels, seed)
    if train.head == "lm_label":
        head = _lm_head(loaded)
        names = label_names if label_names is not None else [str(i) for i in range(num_labels)]
        words: lm_label.LabelWords | None = lm_label.resolve(
            loaded.tokenizer, train.label_words, names, train.prompt_template
        )
        in_full: list[str] = []  # the LM head stays as it is
    else:
        head, words = classification_head(loaded.model, loaded.source), None
        in_full = trained_in_full(loaded.model, head)
    check_max_length(loaded, train.max_length, "training.max_length")
    targets = check_target_modules(loaded.model, train.target_modules, head)
    prepared = prepare_for_training(loaded, train, in_full)
    model = add_lora(prepared, train, targets, in_full, seed, causal_lm=train.head == "lm_label")
    check_trainable_float32(model)
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
        tuned.notes.append(f"the encoder's {POOLER} is trained in full with the {head}, in float32")
    if words is not None:
        tuned.notes.append(
            "lm_label head: class scores are the LM logits of "
            + " / ".join(f"{w!r} (token {t})" for w, t in zip(words.words, words.token_ids, strict=True))
            + f" after the prompt {words.template!r}"
        )
        log.info(tuned.notes[-1])
    return tuned


def load_base(config: Config, num_labels: int, seed: int) -> LoadedModel:
    """The base for the head: the causal LM for lm_label, else a `num_labels` sequence-classification model."""
    lm = config.training.head == "lm_label"
    task: Task = "causal_lm" if lm else "sequence_classification"
    name = config.model.name_or_path
    if lm:
        unsupported = (
            f"model.name_or_path {name!r}: its architecture has no causal-LM class in transformers, which "
            "training.head lm_label needs; use training.head classification (encoders such as BERT)"
        )
    else:
        unsupported = (
            f"model.name_or_path {name!r}: its architecture has no sequence-classification class in transformers; "
            "set training.head: lm_label to score label words with its causal LM, choose a base with a "
            "*ForSequenceClassification class (Qwen, Llama, BERT, ...), or use experiment.mode embeddings"
        )
    return load_model(
        config.model, task=task, num_labels=None if lm else num_labels, seed=seed, unsupported=unsupported
    )


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
    name = output_layer_name(model)
    if name is None:
        raise UserError(f"model {source!r} has no output embedding layer to score label words with; {fix}")
    if any(key.startswith(name + ".") for key in loaded.new_weights):
        raise UserError(
            f"model {source!r} has no pretrained LM head ({name} is newly initialised), so training.head lm_label "
            f"has nothing to score label words with; {fix}"
        )
    return name.rsplit(".", 1)[-1]


# ---- train ----------------------------------------------------------------------------------------------


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
    stopping the best checkpoint's adapter and head are restored. The per-step log lands in `log_history`,
    timings, throughput and memory in `summary`."""
    train_cfg, tokenizer = config.training, tuned.loaded.tokenizer
    loss_fn = make_loss(tuned, train_cfg, train_split["label"].to_numpy(), data_weights)
    pair_encoding = tuned.loaded.pair_encoding
    tuned.pairs = "text_pair" in train_split
    if tuned.pairs and pair_encoding.describe() not in tuned.notes:
        tuned.notes.append(pair_encoding.describe())
        log.info(tuned.notes[-1])
    train_set = Examples(tokenizer, train_split, train_cfg.max_length, tuned.label_words, pair_encoding)
    eval_set = Examples(tokenizer, validation, train_cfg.max_length, tuned.label_words, pair_encoding)
    trainer, seconds = run_trainer(
        lambda: make_trainer(tuned, train_cfg, work_dir, seed, train_set, eval_set, loss_fn, marker), resume_from
    )
    tuned.log_history = reproducible_log(trainer.state.log_history)
    tuned.summary = training_summary(
        trainer,
        train_cfg,
        notes=tuned.notes,
        log_history=tuned.log_history,
        parameters=(tuned.trainable_parameters, tuned.total_parameters),
        counts={"train_tokens_per_epoch": sum(len(row["input_ids"]) for row in train_set.rows)},
        seconds=seconds,
        resume_from=resume_from,
        best_metric_name=train_cfg.early_stopping_metric,
        loss=train_cfg.loss,
    )
    return tuned


def make_loss(
    tuned: FineTuned, train_cfg: TrainingConfig, labels: np.ndarray, data_weights: dict[int, float] | None
) -> ClassLoss:
    """Cross-entropy or focal loss, with the class weights `training.class_weights` (or `data.balance`) asks for."""
    words = tuned.label_words
    num_labels = len(words.words) if words is not None else int(tuned.loaded.model.config.num_labels)
    weights, source = loss_weights(train_cfg.class_weights, labels, num_labels, data_weights)
    if weights is not None:
        tuned.notes.append(f"class weights ({source}) " + ", ".join(f"{w:.3f}" for w in weights.tolist()))
        log.info("loss class weights (%s): %s", source, [round(w, 4) for w in weights.tolist()])
    return classification_loss(train_cfg.loss, weights, train_cfg.focal_gamma)


def make_trainer(
    tuned: FineTuned,
    train_cfg: TrainingConfig,
    work_dir: Path,
    seed: int,
    train_set: Examples,
    eval_set: Examples,
    loss_fn: ClassLoss,
    marker: Any,
) -> Any:
    """The HF Trainer with our loss and class logits, checkpointing into `work_dir` (`run_trainer` trains it)."""
    from transformers import DataCollatorWithPadding

    tokenizer = tuned.loaded.tokenizer
    return make_trainer_class()(
        model=tuned.loaded.model,
        args=training_arguments(train_cfg, tuned.loaded, work_dir, seed, tuned.notes),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        compute_metrics=eval_metrics,
        callbacks=training_callbacks(train_cfg, marker),
        loss_fn=loss_fn,
        logits_fn=class_logits_fn(tuned.label_words),
        per_micro_batch=train_cfg.loss_normalization == "micro_batch",
    )


# ---- save -----------------------------------------------------------------------------------------------


def save(tuned: FineTuned, out_dir: Path, label_names: list[str], threshold: dict[str, Any] | None = None) -> Path:
    """Adapter (LoRA weights + the head) and tokenizer, loadable by `PeftModel.from_pretrained` on the same base;
    labels.json names the classes and, when calibrated, the P(positive) threshold that prediction should use.

    "The same base" is the base loaded as `models.loading.load_model` loads it: a 4-bit base keeps the head (and pooler)
    in full precision, so a plain script passes labels.json's `unquantized_modules` to `BitsAndBytesConfig` as
    `llm_int8_skip_modules` (transformers would otherwise quantize BERT's classifier)."""
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
        # How a pair became one input (model.pair_template): a plain script joins its pairs the same way.
        "pair_encoding": tuned.loaded.pair_encoding.record() if tuned.pairs else None,
    }
    text = json.dumps(labels, indent=2, ensure_ascii=False) + "\n"
    (target / "labels.json").write_text(text, encoding="utf-8")
    # Checked by `qlora predict` before it loads the adapter (integrity.py).
    record_checksums(out_dir, sorted(p.relative_to(out_dir).as_posix() for p in target.rglob("*") if p.is_file()))
    log.info("adapter saved to %s", target)
    return target

"""LoRA on a (4-bit) base, as both training paths set it up: k-bit preparation, gradient checkpointing, the target
modules checked against the model's linear layers, and the adapter's random matrices drawn under the run's seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from qlora_pipeline.errors import UserError
from qlora_pipeline.models.loading import HEAD_NAMES, POOLER, quiet_library_warnings

if TYPE_CHECKING:
    from qlora_pipeline.config import TrainingConfig
    from qlora_pipeline.models.loading import LoadedModel


def prepare_for_training(loaded: LoadedModel, train: TrainingConfig, in_full: Sequence[str] = ()) -> Any:
    """The base at the precision it trains and scores in (`use_training_precision`: what trains is float32; `in_full`
    names the modules trained in full, the head and a BERT pooler); gradient checkpointing when asked for (a
    quantized base through peft's `prepare_model_for_kbit_training`, which also sets up input gradients for it)."""
    model = use_training_precision(loaded, in_full, gradient_checkpointing=train.gradient_checkpointing)
    if loaded.quantization == "none" and train.gradient_checkpointing:
        with quiet_library_warnings():
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def use_training_precision(loaded: LoadedModel, in_full: Sequence[str], *, gradient_checkpointing: bool = False) -> Any:
    """Everything that trains is float32, whatever the base's dtype; training and `qlora predict` both call this,
    so prediction computes as the run did.

    A quantized base goes through peft's `prepare_model_for_kbit_training`: every parameter that is not 4-bit (layer
    norms, embeddings, the head) in float32. An unquantized base keeps its dtype (bfloat16 on most GPUs: half the
    memory), and only the modules trained in full (`in_full`: the head, BERT's pooler) become float32, each casting
    its input to float32; the LoRA matrices peft adds are float32 already (`autocast_adapter_dtype`). On a GPU the
    Trainer's bf16/fp16 autocast then runs their matmuls in half precision, with float32 weights and updates."""
    from peft import prepare_model_for_kbit_training

    model = loaded.model
    if loaded.quantization != "none":
        with quiet_library_warnings():
            return prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},  # the reentrant variant is deprecated
            )
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] in in_full and any(p.dtype != torch.float32 for p in module.parameters()):
            module.float()
            module.register_forward_pre_hook(_float32_inputs)
    return model


def _float32_inputs(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def check_trainable_float32(model: Any) -> None:
    """Every trainable parameter is float32 (see `use_training_precision`): a bare bfloat16 weight would lose
    updates smaller than its 8-bit mantissa can hold."""
    half = sorted(name for name, p in model.named_parameters() if p.requires_grad and p.dtype != torch.float32)
    if half:
        raise RuntimeError(f"trainable parameters not in float32: {half[:5]}")


def add_lora(
    model: Any, train: TrainingConfig, targets: str | list[str], in_full: list[str], seed: int, *, causal_lm: bool
) -> Any:
    """The peft model: LoRA on `targets`, the modules in `in_full` trained in full (and saved with the adapter).
    `causal_lm`: the base is a causal LM (peft's CAUSAL_LM task), else a sequence classifier (SEQ_CLS)."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if causal_lm else TaskType.SEQ_CLS,
        r=train.lora_r,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=targets,
        modules_to_save=list(in_full) or None,  # peft adds its SEQ_CLS defaults to the list it is given
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):  # LoRA A matrices are random: draw them under the run's seed
        torch.manual_seed(seed)
        with quiet_library_warnings():
            return get_peft_model(model, lora)


def output_layer_name(model: Any) -> str | None:
    """The dotted name of the model's output layer (a causal LM's head), None when it has none."""
    output = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is output), None)


def classification_head(model: torch.nn.Module, source: str) -> str:
    """The name of a *ForSequenceClassification model's head (`HEAD_NAMES`)."""
    found = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)), None)
    if found is None:
        raise UserError(f"model {source!r} has no classification head named {' or '.join(HEAD_NAMES)}")
    return found


def has_module(model: torch.nn.Module, name: str) -> bool:
    """Some module of the model has `name` as the last component of its path."""
    return any(path.rsplit(".", 1)[-1] == name for path, _ in model.named_modules())


def trained_in_full(model: torch.nn.Module, head: str) -> list[str]:
    """A new classification head is trained in full and saved beside the adapter; so is a BERT-style pooler, the
    dense layer between the encoder and the classifier (new when the checkpoint lacks it, else pretrained for
    another task). peft then puts no LoRA on them, whatever target_modules says."""
    return [head, *([POOLER] if has_module(model, POOLER) else [])]


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

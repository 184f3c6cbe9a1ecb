"""LoRA on a (4-bit) base, as both training paths set it up: k-bit preparation, gradient checkpointing, the target
modules checked against the model's linear layers, and the adapter's random matrices drawn under the run's seed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from qlora_pipeline.errors import UserError
from qlora_pipeline.models.loading import quiet_library_warnings

if TYPE_CHECKING:
    from qlora_pipeline.config import TrainingConfig
    from qlora_pipeline.models.loading import LoadedModel


def prepare_for_training(loaded: LoadedModel, train: TrainingConfig) -> Any:
    """A quantized base through peft's `prepare_model_for_kbit_training` (layer norms in float32, input gradients
    for checkpointing); gradient checkpointing when asked for."""
    from peft import prepare_model_for_kbit_training

    model = loaded.model
    with quiet_library_warnings():
        if loaded.quantization != "none":
            return prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=train.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},  # the reentrant variant is deprecated
            )
        if train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


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

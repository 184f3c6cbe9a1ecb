"""Classification losses for fine-tuning: cross-entropy with optional class weights, or focal loss.

Class weights come from the config (a list, one per class) or from the training split ("balanced":
total / (classes × count), as the original experiments computed them).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from qlora_pipeline.errors import UserError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_weights(setting: str | list[float], labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """None for "none"; total / (classes × count) per class for "balanced"; a given list as is."""
    if setting == "none":
        return None
    if setting == "balanced":
        counts = np.bincount(labels, minlength=num_classes)
        if (counts == 0).any():
            empty = [int(i) for i in np.flatnonzero(counts == 0)]
            raise UserError(
                f"training.class_weights: 'balanced' needs every class in the training split; classes {empty} "
                "have no examples (give explicit weights or more data)"
            )
        return torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)
    if isinstance(setting, str):  # validated by the config; a guard for configs built around it
        raise ValueError(f"unknown class_weights setting {setting!r}")
    if len(setting) != num_classes:
        raise UserError(
            f"training.class_weights has {len(setting)} weights but the data has {num_classes} classes; "
            "give one weight per class, in label order"
        )
    return torch.tensor(setting, dtype=torch.float32)


def classification_loss(kind: str, weights: torch.Tensor | None, gamma: float = 2.0) -> LossFn:
    """`cross_entropy` (weighted mean, as torch computes it) or `focal`: −w_y (1 − p_y)^γ log p_y,
    normalised by the summed weights like weighted cross-entropy, so γ = 0 gives exactly cross-entropy."""
    if kind == "cross_entropy":

        def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            weight = None if weights is None else weights.to(logits.device)
            return F.cross_entropy(logits, labels, weight=weight)

        return cross_entropy
    if kind == "focal":

        def focal(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            log_p = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
            per_example = -((1 - log_p.exp()) ** gamma) * log_p
            w = torch.ones_like(log_p) if weights is None else weights.to(logits.device)[labels]
            return (w * per_example).sum() / w.sum()

        return focal
    raise ValueError(f"unknown loss {kind!r}")


def loss_weights(
    setting: str | list[float], labels: np.ndarray, num_classes: int, data_weights: dict[int, float] | None
) -> tuple[torch.Tensor | None, str]:
    """The loss's class weights and where they came from: `training.class_weights`, or, when that is "none",
    the data layer's (`data.balance: class_weights`, {class index: weight})."""
    if setting == "none" and data_weights:
        return torch.tensor([data_weights[c] for c in range(num_classes)], dtype=torch.float32), "data.balance"
    weights = class_weights(setting, labels, num_classes)
    return weights, f"training.class_weights {setting if isinstance(setting, str) else 'list'}"

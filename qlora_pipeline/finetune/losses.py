"""Classification losses for fine-tuning: cross-entropy with optional class weights, or focal loss.

Class weights come from the config (a list, one per class) or from the training split ("balanced":
total / (classes × count), as the original experiments computed them).

A loss is a weighted mean, Σ w_i l_i / Σ w_i, with w_i the weight of example i's class (1 without weights). Over one
optimizer step the mean must run over every example of the step, whichever micro-batch (gradient accumulation) or
process (DDP) it landed in; otherwise 8 × 1 and 4 × 2 train differently. So a `ClassLoss` gives per-example terms
(`terms`), and the example weights from the labels alone (`example_weights`), which the Trainer sums over the whole
step before any forward pass (`trainer.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from qlora_pipeline.errors import UserError

IGNORE_INDEX = -100  # a label the loss skips (weight 0), as torch and transformers mark it


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


@dataclass(frozen=True)
class ClassLoss:
    """`cross_entropy` or `focal` (−w_y (1 − p_y)^γ log p_y), both normalised by the summed weights, so γ = 0 gives
    exactly weighted cross-entropy. Calling it gives the weighted mean over a batch, as `F.cross_entropy` does."""

    kind: str
    weights: torch.Tensor | None = None
    gamma: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("cross_entropy", "focal"):
            raise ValueError(f"unknown loss {self.kind!r}")

    def example_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """w_i per example: its class weight (1 without weights), 0 for an ignored label."""
        valid = labels != IGNORE_INDEX
        if self.weights is None:
            return valid.to(torch.float32)
        return torch.where(valid, self.weights.to(labels.device)[labels.clamp_min(0)], 0.0)

    def terms(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_i l_i, w_i) per example; the loss of any set of examples is the sum of the first over the second."""
        w = self.example_weights(labels).to(device=logits.device, dtype=logits.dtype)
        log_p = F.log_softmax(logits, dim=-1).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
        per_example = -log_p if self.kind == "cross_entropy" else -((1 - log_p.exp()) ** self.gamma) * log_p
        return w * per_example, w

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The weighted mean over this batch."""
        weighted, w = self.terms(logits, labels)
        return weighted.sum() / w.sum()

    def micro_batch_mean(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch mean as 0.1.0 computed it (`training.loss_normalization: micro_batch`): torch's weighted
        cross-entropy, bit for bit, so that archived runs reproduce."""
        if self.kind == "cross_entropy":
            weight = None if self.weights is None else self.weights.to(logits.device)
            return F.cross_entropy(logits, labels, weight=weight)
        return self(logits, labels)


def classification_loss(kind: str, weights: torch.Tensor | None, gamma: float = 2.0) -> ClassLoss:
    """The configured loss (`training.loss`, `training.focal_gamma`) with these class weights."""
    return ClassLoss(kind, weights, gamma)


def loss_weights(
    setting: str | list[float], labels: np.ndarray, num_classes: int, data_weights: dict[int, float] | None
) -> tuple[torch.Tensor | None, str]:
    """The loss's class weights and where they came from: `training.class_weights`, or, when that is "none",
    the data layer's (`data.balance: class_weights`, {class index: weight})."""
    if setting == "none" and data_weights:
        return torch.tensor([data_weights[c] for c in range(num_classes)], dtype=torch.float32), "data.balance"
    weights = class_weights(setting, labels, num_classes)
    return weights, f"training.class_weights {setting if isinstance(setting, str) else 'list'}"

"""An unquantized base in bfloat16 trains its head and LoRA matrices in float32 (a bare bfloat16 weight loses the
small updates of a low learning rate), keeps the frozen base in bfloat16, and `qlora predict` scores at the
precision the run trained and evaluated in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import MINILM, fast_args, predict_own_test_split

from qlora_pipeline.cli import main
from qlora_pipeline.config import load_config
from qlora_pipeline.finetune import recipe

BF16 = ["model.quantization=none", "model.compute_dtype=bfloat16"]


@pytest.mark.parametrize(
    "settings",
    [[], ["training.head=lm_label", "training.label_words=[差, 好]"], [f"model.name_or_path={MINILM}"]],
    ids=["qwen-classification", "qwen-lm_label", "bert-classification"],
)
def test_a_bfloat16_base_trains_every_trainable_weight_in_float32(settings: list[str]) -> None:
    config = load_config("qlora_tiny", [*BF16, *settings])
    tuned = recipe.setup(config, 2, config.experiment.seed, ["negative", "positive"])
    model = tuned.loaded.model
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}, trainable
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert torch.bfloat16 in frozen  # the base keeps its half-precision memory
    if not settings or "bert" in settings[0] or "gt_all" in settings[0]:  # the head trains in full
        assert any("modules_to_save" in n for n in trainable)
    batch = tuned.loaded.tokenizer(["好看", "太差了"], padding=True, return_tensors="pt")
    from qlora_pipeline.finetune.scoring import class_logits_fn

    logits = class_logits_fn(tuned.label_words)(model, dict(batch))
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.slow  # a QLoRA run on an unquantized bfloat16 base, and its predictions again
def test_a_bfloat16_run_predicts_its_own_test_split_again(tmp_path: Path) -> None:
    assert main(fast_args(tmp_path / "out", *BF16, "training.gradient_checkpointing=false")) == 0
    original, predicted = predict_own_test_split(tmp_path / "out" / "run_001", tmp_path)
    assert predicted["prediction_name"].tolist() == original["prediction_name"].tolist()
    columns = [c for c in original.columns if c.startswith("prob_")]
    assert (predicted[columns] - original[columns]).abs().to_numpy().max() < 1e-6

"""How far `qlora check`'s memory estimate is from what torch allocates, measured side by side on CPU.

Usage: python scripts/check_memory_estimate.py [--no-wide]

For each variant it builds the model as a run does (NF4 base, k-bit preparation, LoRA, the head in full), measures
the bytes its weights hold and the peak bytes one training step allocates beyond them (torch's profiler memory
timeline: activations, temporaries, gradients, optimizer state), and prints them beside `qlora check`'s estimate of
the same workload (`plan.make_plan`, the same code the command runs) with the ratio estimate / measured.

Variants: the tiny built-in model as configs/qlora_tiny.yaml trains it (float32, gradient checkpointing on and off),
the same under bfloat16 autocast (the dtype flow of mixed-precision GPU training, emulated on CPU), the lm_label
head, and (unless --no-wide) a wider random Qwen2 model (hidden 512, 4 layers) whose dimensions the activation
inventory was not counted on. No GPU is needed and none is measured: CUDA kernels, the CUDA context and the
allocator's overhead are not part of these figures (see README "Dry run").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

BATCH, LENGTH = 8, 64


def wide_model(folder: Path) -> str:
    """A random Qwen2 model, wider and deeper than the tiny one, with the tiny model's tokenizer."""
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qlora_pipeline.models.tiny import ensure_tiny_qwen3

    tiny = ensure_tiny_qwen3()
    config = Qwen2Config(
        vocab_size=6000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, folder / name)
    return str(folder)


def measure(config_name: str, overrides: list[str], autocast: bool) -> dict[str, Any]:
    import torch

    from qlora_pipeline.config import load_config
    from qlora_pipeline.finetune import recipe
    from qlora_pipeline.finetune.scoring import class_logits_fn
    from qlora_pipeline.models import memory
    from qlora_pipeline.plan import make_plan

    config = load_config(config_name, [f"training.max_length={LENGTH}", f"training.batch_size={BATCH}", *overrides])
    plan = make_plan(config)
    if plan.problems:
        raise SystemExit(f"{config_name}: {plan.problems}")
    estimate = plan.facts["memory"]["parts"]
    assert plan.facts["tokens"]["max"] >= LENGTH, "the data must fill the batch to max_length"
    tuned = recipe.setup(config, 2, config.experiment.seed, ["negative", "positive"])
    model = tuned.loaded.model
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 5000, (BATCH, LENGTH), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.randint(0, 2, (BATCH,), generator=generator)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    step = memory.measure_training_step(model, inputs, labels, class_logits_fn(tuned.label_words), context)
    weights = memory.measured_weight_parts(model)
    static = ("weights_quantized", "weights_other", "lora", "trained_copies")
    return {
        "weights": (sum(estimate.get(k, 0) for k in static), sum(weights.values())),
        "step": (sum(v for k, v in estimate.items() if k not in static), step),
        "activations_estimated": estimate.get("activations", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-wide", action="store_true", help="skip the wider random model")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    variants: list[tuple[str, str, list[str], bool]] = [
        ("tiny, float32, checkpointing on", "qlora_tiny", [], False),
        ("tiny, float32, checkpointing off", "qlora_tiny", ["training.gradient_checkpointing=false"], False),
        ("tiny, bf16 autocast, checkpointing on", "qlora_tiny", ["model.compute_dtype=bfloat16"], True),
        (
            "tiny, bf16 autocast, checkpointing off",
            "qlora_tiny",
            ["model.compute_dtype=bfloat16", "training.gradient_checkpointing=false"],
            True,
        ),
        ("tiny lm_label, float32, checkpointing on", "qlora_tiny_lm_label", [], False),
    ]
    with tempfile.TemporaryDirectory() as folder:
        if not args.no_wide:
            wide = wide_model(Path(folder))
            for dtype in ("float32", "bfloat16"):
                for checkpointing in ("on", "off"):
                    extra = [
                        f"model.name_or_path={wide}",
                        f"model.compute_dtype={dtype}",
                        f"training.gradient_checkpointing={checkpointing == 'on'}",
                    ]
                    shown = "float32" if dtype == "float32" else "bf16 autocast"
                    name = f"wide (hidden 512, 4 layers), {shown}, checkpointing {checkpointing}"
                    variants.append((name, "qlora_tiny", extra, dtype == "bfloat16"))
        print(f"batch {BATCH} x {LENGTH} tokens; MiB estimated / measured (ratio)")
        print(f"{'variant':<58} {'weights':>26} {'one training step':>28} {'total':>26}")
        results = {}
        for name, config, overrides, autocast in variants:
            found = measure(config, overrides, autocast)
            total = tuple(a + b for a, b in zip(found["weights"], found["step"], strict=True))
            cells = [_cell(*found[k]) for k in ("weights", "step")] + [_cell(*total)]
            print(f"{name:<58} {cells[0]:>26} {cells[1]:>28} {cells[2]:>26}")
            results[name] = {**found, "total": total}
        print(
            json.dumps(
                {k: {p: list(v) if isinstance(v, tuple) else v for p, v in r.items()} for k, r in results.items()}
            )
        )


def _cell(estimated: int, measured: int) -> str:
    return f"{estimated / 2**20:.2f} / {measured / 2**20:.2f} ({estimated / measured:.2f}x)"


if __name__ == "__main__":
    main()

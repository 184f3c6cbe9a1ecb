"""`qlora export --run R --merge OUT`: the adapter merged into a full-precision copy of the base, a model directory
that plain `AutoModelForCausalLM.from_pretrained(OUT)` loads, with no peft and no bitsandbytes.

The adapter was trained against the NF4 base, whose weights are the NF4-rounded ones, not the original
full-precision checkpoint. It is therefore merged into those very weights: the base is loaded in NF4 as the run
loaded it, dequantized (`model.dequantize`, float32), and the LoRA products are added to it (peft's
`merge_and_unload`, `safe_merge`). The merged model computes what NF4 base + adapter computes, up to float rounding,
so it generates the same greedy text; merging into the original full-precision weights instead would give a model
the adapter never saw (on the tiny model, logits ~0.07 apart and different greedy answers). A run trained without
quantization merges into its plain base.

The directory is written beside OUT and renamed into place when complete, so an interrupted export leaves nothing
that looks finished; an existing non-empty OUT is refused. Besides the weights and tokenizer it holds
generation_config.json (the answer's stop token as eos) and sft.json (the prompt format to render prompts with).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from qlora_pipeline.errors import UserError
from qlora_pipeline.sft.generation import SFT_FILE, run_config, stop_ids
from qlora_pipeline.training.log import ADAPTER_DIR

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_merged(
    run_dir: str | Path, out_dir: str | Path, *, dtype: Literal["float32", "bfloat16", "float16"] = "float32"
) -> Path:
    """Merge the run's adapter into its (dequantized) base and save the model directory `out_dir`."""
    from dataclasses import replace

    from transformers import GenerationConfig

    from qlora_pipeline.models.loading import load_model, quiet_library_warnings

    run, config, record = run_config(run_dir)
    target = Path(out_dir).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--merge {target}: it exists and is not an empty directory; choose a new path")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    # Dequantizing runs where the weights are; a run trained on a GPU exports on this machine's device (auto).
    model_cfg = replace(config.model, device="auto")
    loaded = load_model(model_cfg, task="causal_lm", seed=config.experiment.seed)
    from peft import PeftModel  # after load_model: its bitsandbytes import stays quiet

    base = loaded.model
    if loaded.quantization != "none":
        base = base.dequantize(dtype=torch.float32)  # the NF4 weights the adapter was trained against
        log.info("export: %s base dequantized to float32", loaded.quantization)
    base = base.to(torch.float32)
    with quiet_library_warnings():
        merged = PeftModel.from_pretrained(base, run / "models" / "all" / ADAPTER_DIR).merge_and_unload(safe_merge=True)
    merged = merged.to(DTYPES[dtype])
    merged.generation_config = GenerationConfig(
        eos_token_id=stop_ids(record["prompt_format"]["stop_token_ids"], loaded.tokenizer),
        pad_token_id=loaded.tokenizer.pad_token_id,
        do_sample=False,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar on the console
    try:
        merged.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        exported = {
            **record,
            "merged_from": {"run": str(run.resolve()), "adapter": f"models/all/{ADAPTER_DIR}", "dtype": dtype},
            "merge": "into the dequantized NF4 base weights the adapter was trained against"
            if loaded.quantization != "none"
            else "into the unquantized base",
        }
        (staging / SFT_FILE).write_text(json.dumps(exported, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        staging.chmod(0o755)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if bar:
            hf_logging.enable_progress_bar()
    log.info("merged model written to %s", target)
    return target

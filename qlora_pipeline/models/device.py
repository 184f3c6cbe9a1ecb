"""Where a model runs: the device, the compute dtype, and torch's CPU thread count for a run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qlora_pipeline.errors import UserError

if TYPE_CHECKING:
    from qlora_pipeline.config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(cfg: ModelConfig) -> str:
    """`auto` → cuda when a GPU is visible, else cpu. An explicit `cuda` without a GPU is a user error."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is 'cuda' but no CUDA GPU is visible; set model.device to 'cpu' or 'auto'")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def resolve_compute_dtype(cfg: ModelConfig, device: str, quantization: str = "none") -> torch.dtype:
    """`auto` → bfloat16 on a GPU that supports it, float16 on an older GPU; on CPU, bfloat16 for an unquantized
    model where the CPU has native bf16 instructions (measured here, all-MiniLM-L6-v2: ~2.8x the float32
    throughput, cosine 0.9999 to float32), else float32. 4-bit on CPU stays float32: bitsandbytes then
    dequantizes to bf16 with no speed-up measured, and its CPU bf16 path is the one `_keep_cpu_4bit_weights_
    unpacked` works around."""
    if cfg.compute_dtype != "auto":
        return DTYPES[cfg.compute_dtype]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if quantization == "none" and cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 (x86, from /proc/cpuinfo); elsewhere (no such file, other CPUs) False."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Torch's CPU threads set to `count` inside the block (None leaves them alone), the previous count after.

    Why a run may want 1: torch starts one OpenMP thread per core, and they spin-wait for each other between
    parallel regions. On a 2-core machine shared with another busy process they then wait on each other's time
    slices. Measured with the tiny QLoRA recipe (scripts/bench_training.py --contention), 1 thread trained ~3x
    faster than the default 2 beside a one-core Python loop and 2.6-25x faster beside another torch process, and
    ~10% slower on an idle CPU: the tiny model's ops are too small to gain from splitting. Large models do."""
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    log.info("torch CPU threads: %d (model.cpu_threads; %d before this run)", count, before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def free_memory(device: str) -> int | None:
    """Bytes a new model could take now: free GPU memory (after emptying the CUDA cache) or the CPU's available
    memory (Linux /proc/meminfo); None where it cannot be told."""
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def release_memory(device: str) -> None:
    """Collect dropped models and hand the CUDA allocator's cached blocks back (so the next model finds them)."""
    import gc

    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()

"""qlora-pipeline: config-driven text-classification and instruction fine-tuning experiments with 4-bit Qwen models."""

from typing import Any

__version__ = "0.2.0"
__all__ = ["Generator", "Predictor", "load_generator", "load_predictor"]


def __getattr__(name: str) -> Any:
    """`load_predictor`, `load_generator` and their classes load on first use, so `import qlora_pipeline` stays free
    of torch."""
    if name in ("Predictor", "load_predictor"):
        from qlora_pipeline import predict

        return getattr(predict, name)
    if name in ("Generator", "load_generator"):
        from qlora_pipeline.sft import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'qlora_pipeline' has no attribute {name!r}")

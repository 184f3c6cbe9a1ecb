"""qlora-pipeline: config-driven text-classification experiments with 4-bit Qwen models."""

__version__ = "0.1.0"

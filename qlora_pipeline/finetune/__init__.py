"""The QLoRA path: NF4 base + LoRA adapter + head trained end to end, with checkpoints, resume and DDP."""

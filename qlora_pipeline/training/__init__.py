"""What the training paths share: LoRA on a k-bit base, the HF Trainer's settings, checkpoints and resume, logs."""

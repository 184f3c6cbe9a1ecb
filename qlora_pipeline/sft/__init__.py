"""The instruction path (mode sft): NF4 base + LoRA on the causal LM, answer-only loss, generation, reference scores."""

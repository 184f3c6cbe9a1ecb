"""Loading a tokenizer + model with the quantization the config asks for, and the built-in tiny checkpoint."""

"""LoRA math: slot-buffered linear layers, the batched op, and injection into a transformers model."""

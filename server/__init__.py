"""loraplex: a multi-adapter LoRA inference server."""

__version__ = "0.1.0"

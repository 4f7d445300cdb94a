"""Kept for existing imports: the PEFT adapter helpers live in `tests/peft_adapters.py`."""

from tests.peft_adapters import ADAPTER_CONFIGS, make_peft_adapters, peft_reference

__all__ = ["ADAPTER_CONFIGS", "make_peft_adapters", "peft_reference"]

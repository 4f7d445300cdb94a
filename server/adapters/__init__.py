"""Adapter lifecycle: PEFT format parsing and validation, the disk store, the registry."""

"""LoRA fine-tuning with PEFT and plain PyTorch, plus the demo tasks and adapters.

`python -m server.train DATA.jsonl --output DIR` trains one adapter;
`python -m server.train.make_adapters` rebuilds the demo adapters in `adapters/`.
"""

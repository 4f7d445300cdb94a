"""The `loraplex.json` that `loraplex train` writes beside the adapter, read off its training data.

Prompt/completion data: the prefix and suffix every prompt shares become the prompt template
(`Input: {input}\\nOutput:` for the shipped tasks), so clients send only what varies. Chat data:
a system message every example starts with becomes the system prompt. Greedy decoding, a
`max_tokens` above the longest completion, and a newline stop when no completion holds one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from server.adapters.contract import INPUT_PLACEHOLDER, AdapterContract, SamplingDefaults

MAX_EXAMPLES = 3
MIN_MAX_TOKENS = 8


def read_records(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def contract_from_records(records: list[dict], completion_tokens: int, description: str) -> AdapterContract:
    """A contract for an adapter trained on `records`; `completion_tokens`: the longest completion in tokens."""
    completions = [_completion(r) for r in records]
    stop = ["\n"] if completions and not any("\n" in c.strip() for c in completions) else None
    defaults = SamplingDefaults(temperature=0.0, max_tokens=max(MIN_MAX_TOKENS, completion_tokens * 3 // 2),
                                stop=stop)
    template: str | None = None
    inputs: list[str] = []
    prompts = [r["prompt"] for r in records if isinstance(r.get("prompt"), str)]
    if prompts and len(prompts) == len(records):
        template, inputs = _template(prompts)
    system = _shared_system(records)
    return AdapterContract(description=description, prompt_template=template, system_prompt=system,
                           defaults=defaults, examples=inputs[:MAX_EXAMPLES] or None)


def _completion(record: dict) -> str:
    if isinstance(record.get("completion"), str):
        return record["completion"]
    messages = record.get("messages") or [{}]
    return str(messages[-1].get("content", ""))


def _template(prompts: list[str]) -> tuple[str | None, list[str]]:
    """`prefix{input}suffix` from the shared prefix and suffix of all prompts, and the inputs they frame."""
    # Cut back to whitespace, so a first letter the inputs happen to share stays part of the input.
    prefix = _to_whitespace(os.path.commonprefix(prompts))
    suffix = _to_whitespace(os.path.commonprefix([p[len(prefix):][::-1] for p in prompts]))[::-1]
    if not prefix and not suffix:
        return None, []
    inputs = [p[len(prefix):len(p) - len(suffix)] for p in prompts]
    if not all(inputs):
        return None, []
    return prefix + INPUT_PLACEHOLDER + suffix, inputs


def _to_whitespace(shared: str) -> str:
    """`shared` up to and including its last whitespace character ("" if it has none)."""
    cut = max(shared.rfind(c) for c in " \n\t")
    return shared[:cut + 1] if cut >= 0 else ""


def _shared_system(records: list[dict]) -> str | None:
    systems = set()
    for record in records:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages or messages[0].get("role") != "system":
            return None
        systems.add(messages[0].get("content"))
    return systems.pop() if len(systems) == 1 and isinstance(next(iter(systems)), str) else None

"""What the engine cannot serve exactly is refused at start-up, by name; a step that fails is a server fault.

The refusals are real models saved by transformers: one whose attention does not go through
transformers' AttentionInterface (Bloom), one whose layers are partly recurrent (RecurrentGemma), and one
whose attention adds ALiBi biases the paged attention does not compute (Falcon with `alibi`). A served
`loraplex serve --model FOLDER` of such a model exits with the reason and never reports ready.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.api.errors import engine_error_response
from server.engine.attention import UnsupportedModelError
from server.engine.request import EngineFaultError
from tests.e2e.server_process import free_port
from tests.engine.conftest import greedy, make_engine

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
REFUSED = {
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4), "does not go through transformers' AttentionInterface"),
    "recurrent-gemma": ("RecurrentGemmaConfig", dict(block_types=["recurrent", "attention"], num_key_value_heads=2,
                                                     lru_width=64, intermediate_size=96, attention_window_size=8),
                        "1 of its 2 layers are attention layers"),
    "falcon-alibi": ("FalconConfig", dict(alibi=True, new_decoder_architecture=False), "alibi=True"),
}


def save_model(folder: Path, config_name: str, overrides: dict, tokenizer_dir: Path) -> Path:
    """A random model (with the default model's tokenizer) saved by transformers."""
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SMALL, **overrides})
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_at_load_with_the_reason(name, tmp_path, tokenizer_dir):
    config_name, overrides, reason = REFUSED[name]
    folder = save_model(tmp_path / name, config_name, overrides, tokenizer_dir)
    with pytest.raises(UnsupportedModelError) as refusal:
        make_engine(folder, tmp_path / "store")
    arch = config_name.removesuffix("Config")
    assert arch.lower() in str(refusal.value).lower() and reason in str(refusal.value)


@pytest.mark.full
def test_server_exits_with_the_reason_and_never_reports_ready(tmp_path, tokenizer_dir):
    folder = save_model(tmp_path / "bloom", *REFUSED["bloom"][:2], tokenizer_dir)
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(folder), "--port",
                                 str(port), "--adapters-dir", str(tmp_path / "store"), "--device", "cpu"], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    ready, deadline = [], time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            ready.append(httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1.0).status_code)
        except httpx.TransportError:
            time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    output = log.read_text()
    assert proc.wait(timeout=10) == 2, output
    assert "BloomForCausalLM cannot be served" in output
    assert 200 not in ready


def test_failed_step_is_a_server_error_and_the_engine_goes_on(tiny_llama_dir, tmp_path, started, monkeypatch):
    engine = started(make_engine(tiny_llama_dir, tmp_path / "store"))
    real_step = engine.core.runner.step
    calls = []

    def failing_once(plan):
        calls.append(len(plan))
        if len(calls) == 1:
            raise RuntimeError("an injected fault")
        return real_step(plan)

    monkeypatch.setattr(engine.core.runner, "step", failing_once)
    with pytest.raises(EngineFaultError) as fault:
        asyncio.run(engine.generate(greedy(engine.base_name, "Hello there", 4)))
    response = engine_error_response(fault.value)
    assert response.status_code == 500
    assert b'"type":"server_error"' in response.body and b'"code":"internal_error"' in response.body
    result = asyncio.run(engine.generate(greedy(engine.base_name, "Hello there", 4)))
    assert result.completion_tokens == 4 and len(calls) > 1

"""The embedded model served from its GGUF blocks (`--gguf-blocks keep`): the shipped adapters and the
base in one mixed batch give PEFT's greedy tokens and log-probabilities on the float32 model of the
same weights, and the resident weights are the GGUF's size, not float32's."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
from peft import PeftModel

from server.huge_pages import HUGE_PAGE
from server.huge_pages import available as huge_pages_available
from server.models import embedded_gguf_path, load_base_model
from server.quant.linear import QuantEmbedding, QuantLinear
from tests.engine.conftest import greedy, make_engine, run_all
from tests.engine.test_architectures import check_against_oracle

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Input: Maria, 34, from Lisbon thinks the new phone is wonderful.\nOutput:",
           "Input: Priya, 23, from Buenos Aires thinks the movie is poor.\nOutput:"]
ADAPTERS = ["sentiment", "shout", "extract-json"]
NEW_TOKENS = 6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    engine = make_engine(None, ROOT / "adapters", gguf_blocks="keep", max_loras=4)
    engine.start()
    yield engine
    engine.stop()


def test_every_layer_is_served_from_the_blocks_within_the_files_size(engine):
    model = engine.base.model
    quantized = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    assert len(quantized) == 30 * 7 + 2  # every linear layer, the embedding, the tied head
    resident = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.parameters()}.values())
    file_weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(embedded_gguf_path())).tensors)
    assert resident <= 1.1 * file_weights, (resident, file_weights)
    if huge_pages_available():  # the tied head's 17.7 MB of blocks, streamed every step: from 2 MiB pages
        largest = max(model.parameters(), key=lambda p: p.numel() * p.element_size())
        assert largest.numel() >= 8 * HUGE_PAGE and largest.data_ptr() % HUGE_PAGE == 0


def test_mixed_batch_equals_peft_on_the_float32_weights(engine, default_settings):
    requests = [replace(greedy(model, prompt, NEW_TOKENS, ignore_eos=True, logprobs=1), apply_template=False)
                for prompt in PROMPTS for model in [engine.base_name, *ADAPTERS]]
    results = asyncio.run(run_all(engine, requests, stagger=0.01))
    base = load_base_model(default_settings).model  # float32, from the same GGUF
    for request, result in zip(requests, results):
        oracle = base if request.model == engine.base_name else \
            PeftModel.from_pretrained(base, ROOT / "adapters" / request.model).eval()
        ids = engine.tokenizer(request.prompt)["input_ids"]
        assert len(check_against_oracle(oracle, ids, result)) == NEW_TOKENS
        if oracle is not base:
            base = oracle.unload()  # the float32 base back, without this adapter
    assert results[0].text != results[1].text  # the adapters change the answer


@pytest.mark.full  # a second engine of the embedded model (10 s); the int8 kernels' bounds run in make test
def test_int8_mode_starts_and_keeps_its_linears_int8():
    """The start-up probe checks attention with the linears exact (int8 differs by design) and leaves them int8."""
    engine = make_engine(None, ROOT / "adapters", gguf_blocks="keep", quant_compute="int8", max_loras=4)
    try:
        linears = [m for m in engine.base.model.modules() if isinstance(m, QuantLinear)]
        assert linears and all(m.int8 for m in linears)
        assert engine.probe_difference <= 2e-3
    finally:
        engine.stop()

"""`quantize_from_gguf` on a small Llama written as a GGUF of mixed types: every type with a kernel is
served from its blocks (q/k rows in the model's order, the tied head sharing the embedding's blocks), a
type without one (F16 here) stays float32 with a log line that says so, and the model computes what the
float32 model of the same weights computes."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.native.loader import load_kernels
from server.quant.gguf_weights import quantize_from_gguf
from server.quant.linear import QuantEmbedding, QuantLinear
from tests.quant.blocks import WEIGHT_STD, quantized

Q = gguf.GGMLQuantizationType
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 96
TYPES = {"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.F16, "attn_output": Q.Q3_K, "ffn_gate": Q.Q2_K,
         "ffn_up": Q.Q5_0, "ffn_down": Q.Q6_K}
MODULES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert load_kernels()


def tiny_llama() -> torch.nn.Module:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)


def rotary_order(rows: int, heads: int) -> torch.Tensor:
    """Model row i is the GGUF's row order[i] (llama.cpp's converter interleaves each head's halves)."""
    return torch.arange(rows).view(heads, rows // heads // 2, 2).transpose(1, 2).reshape(rows)


def file_tensor(qtype, rows: int, cols: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """(the GGUF's data, its float32 weight in the file's row order)."""
    if qtype == Q.F16:
        weight = (WEIGHT_STD * np.random.default_rng(seed).standard_normal((rows, cols))).astype(np.float16)
        return weight, torch.from_numpy(weight.astype(np.float32))
    blocks, weight = quantized(qtype, rows, cols, seed)
    return blocks.numpy(), weight


@pytest.fixture(scope="module")
def model_and_gguf(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A tiny Llama holding the float32 weights transformers would read from the GGUF written beside it."""
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", Q.Q8_0)


@pytest.fixture(scope="module")
def model_and_q6_k_table(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The same with a Q6_K token table (a type the int8 mode holds in its lane layout)."""
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-q6k.gguf", Q.Q6_K)


def tiny_gguf(path: Path, table_type) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = tiny_llama()
    writer = gguf.GGUFWriter(path, "llama")
    layer = model.model.layers[0]
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // 2, HIDDEN), "attn_v": (HIDDEN // 2, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTERMEDIATE, HIDDEN), "ffn_up": (INTERMEDIATE, HIDDEN),
              "ffn_down": (HIDDEN, INTERMEDIATE)}
    with torch.no_grad():
        for seed, (key, qtype) in enumerate(TYPES.items()):
            data, weight = file_tensor(qtype, *shapes[key], seed)
            writer.add_tensor(f"blk.0.{key}.weight", data, raw_dtype=None if qtype == Q.F16 else qtype)
            if key in ("attn_q", "attn_k"):
                weight = weight[rotary_order(weight.shape[0], HEADS if key == "attn_q" else KV_HEADS)]
            layer.get_submodule(MODULES[key]).weight.copy_(weight)
        table, weight = file_tensor(table_type, VOCAB, HIDDEN, 99)
        writer.add_tensor("token_embd.weight", table, raw_dtype=table_type)
        model.model.embed_tokens.weight.copy_(weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_kept_types_are_served_from_blocks_and_others_dequantized_with_a_log_line(model_and_gguf, caplog):
    float_model, path = model_and_gguf
    model = copy.deepcopy(float_model)
    with caplog.at_level(logging.INFO, logger="server.quant.gguf_weights"):
        report = quantize_from_gguf(model, path)
    layer = model.model.layers[0]
    for key, qtype in TYPES.items():
        module = layer.get_submodule(MODULES[key])
        assert isinstance(module, QuantLinear) == (qtype != Q.F16), key
    assert report.kept == {"model.layers.0.self_attn.v_proj": "F16 (the kernels compute Q4_0, Q4_1, Q5_0, Q5_1, "
                           "Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"}
    assert "1 layers dequantized to float32 at load, not kept in blocks: 1 x F16" in caplog.text
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.lm_head.blocks.data_ptr() == model.model.embed_tokens.blocks.data_ptr()  # tied: one table
    ids = torch.tensor([[5, 17, 3, 90, 41, 8]])
    expected, got = logits(float_model, ids), logits(model, ids)
    torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)


def test_int8_mode_stays_near_the_float32_model(model_and_gguf):
    float_model, path = model_and_gguf
    model = copy.deepcopy(float_model)
    quantize_from_gguf(model, path, int8=True)
    assert all(m.int8 for m in model.modules() if isinstance(m, QuantLinear))
    ids = torch.tensor([[5, 17, 3, 90, 41, 8]])
    expected = torch.log_softmax(logits(float_model, ids[:, :1]), -1)  # one decode row: the int8 path
    got = torch.log_softmax(logits(model, ids[:, :1]), -1)
    difference = float((got - expected).abs().max())
    assert 0 < difference < 0.1, difference  # a random model: the real bound is test_int8_accuracy.py's


def test_int8_mode_holds_a_tied_table_once_in_its_layout(model_and_q6_k_table):
    """int8 on a VNNI build: the Q4_K and Q6_K linears and the tied Q6_K table in the lane layout, the table held
    once (the embedding reads its rows from the head's blocks), its rows read back exactly. (The direct loader's
    route: test_gguf_loader.py.)"""
    float_model, path = model_and_q6_k_table
    model = copy.deepcopy(float_model)
    quantize_from_gguf(model, path, int8=True)
    head, table = model.lm_head, model.model.embed_tokens
    assert isinstance(head, QuantLinear) and isinstance(table, QuantEmbedding)
    assert head.blocks.data_ptr() == table.blocks.data_ptr() and head.qtype == table.qtype
    if head.qtype == Q.Q6_K:
        pytest.skip("this build has no VNNI int8 kernel, so no lane layout")
    assert head.qtype == 114 and model.model.layers[0].self_attn.q_proj.qtype == 112
    ids = torch.tensor([[5, 17, 3, 90, 41, 8]])
    with torch.no_grad():
        assert torch.equal(table(ids), float_model.model.embed_tokens(ids))
    expected = torch.log_softmax(logits(float_model, ids[:, :1]), -1)
    difference = float((torch.log_softmax(logits(model, ids[:, :1]), -1) - expected).abs().max())
    assert 0 < difference < 0.2, difference  # the head in int8 too (0.12 here in either layout); bound: test_quant_linear

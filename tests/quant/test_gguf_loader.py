"""`load_gguf_model`: a model built straight from a GGUF (no float32 copy) equals what transformers loads from the
same file with the blocks swapped in afterwards: the same modules, the same blocks (q/k rows permuted as
transformers permutes them), the same float32 norms, the same logits; the tied head shares the embedding's
blocks; the resident weights are the file's."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from server.config import Settings
from server.models import embedded_gguf_path, embedded_model_dir, load_base_model
from server.native.loader import load_kernels
from server.quant.gguf_loader import GGUFLoadError, load_gguf_model
from server.quant.gguf_weights import quantize_from_gguf
from server.quant.linear import QuantEmbedding, QuantLinear
from tests.quant.test_gguf_weights import (
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    KV_HEADS,
    MODULES,
    TYPES,
    VOCAB,
    file_tensor,
    rotary_order,
)

Q = gguf.GGMLQuantizationType
LAYERS = 2


@pytest.fixture(scope="module", autouse=True)
def built():
    assert load_kernels()


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def float_model_and_gguf(tmp_path_factory):
    """A 2-layer Llama GGUF of mixed types (F16 v, F32 norms) and the float32 model of its weights."""
    return _tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", Q.Q8_0)


def _tiny_gguf(path, table_type):
    model = AutoModelForCausalLM.from_config(_config(), dtype=torch.float32).eval().requires_grad_(False)
    writer = gguf.GGUFWriter(path, "llama")
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // 2, HIDDEN), "attn_v": (HIDDEN // 2, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTERMEDIATE, HIDDEN), "ffn_up": (INTERMEDIATE, HIDDEN),
              "ffn_down": (HIDDEN, INTERMEDIATE)}
    rng = np.random.default_rng(5)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for seed, (key, qtype) in enumerate(TYPES.items()):
                data, weight = file_tensor(qtype, *shapes[key], seed + 10 * i)
                writer.add_tensor(f"blk.{i}.{key}.weight", data, raw_dtype=None if qtype == Q.F16 else qtype)
                if key in ("attn_q", "attn_k"):
                    weight = weight[rotary_order(weight.shape[0], HEADS if key == "attn_q" else KV_HEADS)]
                layer.get_submodule(MODULES[key]).weight.copy_(weight)
            for key, norm in (("attn_norm", layer.input_layernorm), ("ffn_norm", layer.post_attention_layernorm)):
                values = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
                writer.add_tensor(f"blk.{i}.{key}.weight", values)
                norm.weight.copy_(torch.from_numpy(values))
        values = rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)
        writer.add_tensor("output_norm.weight", values)
        model.model.norm.weight.copy_(torch.from_numpy(values))
        table, weight = file_tensor(table_type, VOCAB, HIDDEN, 99)
        writer.add_tensor("token_embd.weight", table, raw_dtype=table_type)
        model.model.embed_tokens.weight.copy_(weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model, path


def test_direct_load_equals_the_float32_first_route(float_model_and_gguf):
    float_model, path = float_model_and_gguf
    model, report = load_gguf_model(_config(), path)
    swapped = AutoModelForCausalLM.from_config(_config(), dtype=torch.float32).eval()
    swapped.load_state_dict(float_model.state_dict())
    expected_report = quantize_from_gguf(swapped, path)
    assert report.quantized == expected_report.quantized and report.block_bytes == expected_report.block_bytes
    assert set(report.kept) == {f"model.layers.{i}.self_attn.v_proj" for i in range(LAYERS)}
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in swapped.named_modules()}
    got, expected = model.state_dict(), swapped.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.blocks.data_ptr() == model.model.embed_tokens.blocks.data_ptr()  # tied: one table
    ids = torch.tensor([[5, 17, 3, 90, 41, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, float_model(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(model(ids).logits, swapped(ids).logits)


def test_int8_mode_loads_as_the_float32_first_route_with_one_table(tmp_path):
    """int8 with a tied Q6_K table: the same modules and blocks as the float32-first route (on a VNNI build, Q4_K
    and Q6_K in the lane layout), the table held once, its rows read back exactly."""
    float_model, path = _tiny_gguf(tmp_path / "tiny-q6k.gguf", Q.Q6_K)
    model, _ = load_gguf_model(_config(), path, int8=True)
    swapped = AutoModelForCausalLM.from_config(_config(), dtype=torch.float32).eval()
    swapped.load_state_dict(float_model.state_dict())
    quantize_from_gguf(swapped, path, int8=True)
    got, expected = model.state_dict(), swapped.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    head, table = model.lm_head, model.model.embed_tokens
    assert head.blocks.data_ptr() == table.blocks.data_ptr() and head.qtype == table.qtype
    assert head.qtype == swapped.lm_head.qtype and head.qtype in (Q.Q6_K, 114)
    ids = torch.tensor([[5, 17, 3, 90, 41, 8]])
    with torch.no_grad():
        assert torch.equal(table(ids), float_model.model.embed_tokens(ids))
        assert torch.equal(model(ids).logits, swapped(ids).logits)


def test_a_parameter_without_a_tensor_is_refused(float_model_and_gguf):
    _, path = float_model_and_gguf
    config = _config()
    config.num_hidden_layers = LAYERS + 1  # layer 2 has no tensors in the file
    with pytest.raises(GGUFLoadError, match="no tensor for model.layers.2"):
        load_gguf_model(config, path)


@pytest.mark.full  # 15 s: two loads of the embedded model (the tiny model's test above covers the route itself)
def test_embedded_model_loads_directly_as_the_float32_first_route_gives_it():
    model = load_base_model(Settings(device="cpu", gguf_blocks="keep")).model
    reference = AutoModelForCausalLM.from_pretrained(embedded_model_dir(Settings().cache_dir), dtype=torch.float32)
    quantize_from_gguf(reference, embedded_gguf_path())
    got, expected = model.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    resident = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
    file_weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(embedded_gguf_path())).tensors)
    assert resident <= 1.1 * file_weights, (resident, file_weights)

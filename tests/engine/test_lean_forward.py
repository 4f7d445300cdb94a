"""The lean decoder forward (server/engine/lean_forward.py) against the transformers path it replaces: the same
runner steps (prefill chunks beside decode rows, decode-only steps, adapters and the base mixed) give the same
logits, over float32 and quantized linears (fused q/k/v and gate/up blocks included); models it does not
support keep the transformers forward; the rotary/cache kernel equals transformers' rotary."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, MistralConfig, Qwen3Config
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import LoraModuleWeights, ParsedAdapter
from server.engine.attention import use_paged_attention
from server.engine.kv_cache import KVCache
from server.engine.probe import lean_forward_for
from server.engine.runner import ModelRunner
from server.engine.scheduler import ScheduledSeq
from server.lora.model import LoraModel
from server.lora.ops import backend_for
from server.native.loader import load_kernels
from server.quant.linear import QuantLinear
from tests.quant.blocks import Q, quantized

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, initializer_range=0.2)
CONFIGS = {"llama": (LlamaConfig, {}), "mistral-window": (MistralConfig, dict(sliding_window=6)),
           "qwen3-qk-norms": (Qwen3Config, dict(head_dim=16))}


@pytest.fixture(scope="module", autouse=True)
def built():
    assert load_kernels(), "the compiled CPU kernels must build here (a C++ compiler and ninja are installed)"


def _quantize(model: torch.nn.Module) -> None:
    """Layer 0's linears as Q8_0 blocks (q/k/v and gate/up fuse), layer 1's q as Q4_1 beside Q8_0 k/v (no fusion)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or "layers." not in name:
            continue
        qtype = Q.Q4_1 if name.endswith("layers.1.self_attn.q_proj") else Q.Q8_0
        blocks, weight = quantized(qtype, module.out_features, module.in_features, seed=len(name))
        with torch.no_grad():
            module.weight.copy_(weight)  # the float32 twin computes the same weights
        model.set_submodule(name, QuantLinear(blocks, int(qtype), module.in_features, module.out_features))


def _adapter(layout: BaseLayout, seed: int) -> ParsedAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {name: LoraModuleWeights(a=torch.randn(4, fan_in, generator=gen) * 0.3,
                                       b=torch.randn(fan_out, 4, generator=gen) * 0.3, scale=1.0)
               for name, (fan_in, fan_out) in layout.linear.items()}
    return ParsedAdapter(rank=4, alpha=4.0, target_modules=tuple(sorted(modules)), modules=modules, config={},
                         size_bytes=0)


def _runner(model: torch.nn.Module, lean: bool) -> ModelRunner:
    layout = BaseLayout.from_model(model)
    lora = LoraModel(model, layout, 2, 4, backend_for(torch.device("cpu"), torch.float32))
    for slot in range(2):
        lora.write_slot(slot, _adapter(layout, slot))
    kv = KVCache.from_token_budget(model.config, 256, 4)
    return ModelRunner(lora, use_paged_attention(model), kv, decode_kernel=True, lean=lean)


def _run(runner: ModelRunner, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Prefill of sequence 0, then sequence 1's prefill beside 0's decode rows, then decode-only steps; the
    logits of every step. Sequence i runs adapter slot i - 1 (-1: the base)."""
    kv = runner.kv_cache
    seqs = [SimpleNamespace(token_ids=list(p), num_computed=0, blocks=kv.allocator.allocate(kv.blocks_for(len(p) + 8)),
                            slot=i - 1, prompt_logprobs=None) for i, p in enumerate(prompts)]
    steps = [[(0, len(prompts[0]))], [(0, 1), (1, len(prompts[1]))]] + [[(0, 1), (1, 1)]] * 4
    out = []
    for step in steps:
        for i, n in step:  # a decode step feeds the token after the computed ones
            seq = seqs[i]
            if seq.num_computed + n > len(seq.token_ids):
                seq.token_ids.append((7 * len(seq.token_ids) + i) % 100 + 5)
        computed = [seqs[i].num_computed + n for i, n in step]
        _, logits = runner.step([ScheduledSeq(seqs[i], n, True) for i, n in step])
        for (i, _), value in zip(step, computed):  # (set here: the scheduler advances it in the engine)
            seqs[i].num_computed = value
        out.append(logits.clone())
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("quantize", [False, True], ids=["float32", "quantized"])
def test_lean_steps_equal_the_transformers_path(name, quantize):
    config_cls, extra = CONFIGS[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**TINY, **extra)).eval()
    if quantize:
        _quantize(model)
    lean, plain = _runner(copy.deepcopy(model), True), _runner(model, False)
    assert lean.lean is not None and plain.lean is None
    layer = lean.lean.layers[0]  # every group's deltas in one compiled call each (the adapters are pooled)
    assert all(p.delta is not None for p in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj))
    prompts = [[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [27, 18, 28, 18, 28, 45, 90, 45]]
    for got, expected in zip(_run(lean, prompts), _run(plain, prompts)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    if quantize:  # layer 0's q/k/v blocks lie side by side in one buffer, layer 1's q (another type) apart
        attn0, attn1 = (lean.lora.model.model.layers[i].self_attn for i in (0, 1))
        q0, k0 = attn0.q_proj.base.blocks, attn0.k_proj.base.blocks
        assert k0.data_ptr() == q0.data_ptr() + q0.numel()
        assert attn1.q_proj.base.blocks.untyped_storage().data_ptr() != \
            attn1.k_proj.base.blocks.untyped_storage().data_ptr()


def test_unsupported_models_keep_the_transformers_forward():
    torch.manual_seed(0)
    config = Gemma2Config(**TINY, head_dim=16, query_pre_attn_scalar=16)
    model = AutoModelForCausalLM.from_config(config).eval()
    paged = use_paged_attention(model)
    assert lean_forward_for(paged, KVCache.from_token_budget(config, 64, 4), decode_kernel=True) is None
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).eval()
    paged = use_paged_attention(llama)
    assert lean_forward_for(paged, KVCache.from_token_budget(llama.config, 64, 4), decode_kernel=False) is None


def test_rope_cache_kernel_equals_transformers_rotary():
    gen = torch.Generator().manual_seed(0)
    n, heads, kv_heads, dim, block = 5, 4, 2, 16, 4
    q, k, v = (torch.randn(n, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    angles = torch.rand(n, dim // 2, generator=gen) * 50
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    k_pool, v_pool = torch.zeros(kv_heads, 4, block, dim), torch.zeros(kv_heads, 4, block, dim)
    slots = torch.tensor([3, 0, 9, 14, 6])
    q2, k2 = q.clone(), k.clone()
    torch.ops.loraplex.rope_cache_write(q2, k2, v, cos, sin, slots, k_pool, v_pool)
    assert torch.equal(q2, q_ref[0].transpose(0, 1)) and torch.equal(k2, k_ref[0].transpose(0, 1))
    assert torch.equal(k_pool.view(kv_heads, -1, dim)[:, slots], k2.transpose(0, 1))
    assert torch.equal(v_pool.view(kv_heads, -1, dim)[:, slots], v.transpose(0, 1))


def test_add_rms_norm_kernel_equals_the_residual_add_and_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(0)
    h, delta = torch.randn(7, 96, generator=gen) * 3, torch.randn(7, 96, generator=gen)
    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=gen) + 0.5)
    expected_h = h + delta
    expected = norm(expected_h)
    out = torch.empty_like(h)
    torch.ops.loraplex.add_rms_norm(h, delta, norm.weight.detach(), norm.variance_epsilon, out)
    assert torch.equal(h, expected_h)  # the residual stream, updated in place
    torch.testing.assert_close(out, expected, rtol=4e-7, atol=0)  # the mean's sum in another order: an ulp or two
    torch.ops.loraplex.add_rms_norm(h, None, norm.weight.detach(), norm.variance_epsilon, out)
    assert torch.equal(h, expected_h)
    torch.testing.assert_close(out, expected, rtol=4e-7, atol=0)

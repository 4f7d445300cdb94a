"""PEFT adapter parsing: equal to what HF PEFT builds, and every bad input refused by name."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from server.adapters import peft_config
from server.adapters.layout import BaseLayout
from server.adapters.peft_format import AdapterFormatError, ParsedAdapter, load_peft_adapter, parse_peft_adapter

MakeAdapter = Callable[..., tuple[Path, PeftModel]]
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"


# ---------------------------------------------------------------- helpers


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, folder / "adapter_model.safetensors")


def peft_lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    return {
        name.removeprefix(PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


def assert_equals_peft(parsed: ParsedAdapter, model: PeftModel) -> None:
    layers = peft_lora_layers(model)
    assert parsed.target_modules == tuple(sorted(layers))
    assert set(parsed.modules) == set(layers)
    for name, layer in layers.items():
        got = parsed.modules[name]
        assert torch.equal(got.a, layer.lora_A["default"].weight.detach()), name
        assert torch.equal(got.b, layer.lora_B["default"].weight.detach()), name
        assert got.scale == pytest.approx(layer.scaling["default"], rel=1e-12), name
        # A contiguous; B the transpose of a contiguous [r, out] (the pool's rank-major block)
        assert got.a.dtype == got.b.dtype == torch.float32 and got.a.is_contiguous() and got.b.t().is_contiguous()
    assert parsed.rank == max(layer.r["default"] for layer in layers.values())


def rejected(folder: Path, layout: BaseLayout, *words: str, max_rank: int = 64) -> str:
    with pytest.raises(AdapterFormatError) as info:
        load_peft_adapter(folder, layout, max_rank)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# ---------------------------------------------------------------- layout


def test_layout_llama(layout: BaseLayout) -> None:
    assert len(layout.linear) == 14
    assert layout.linear[Q0] == (32, 32)
    assert layout.linear["model.layers.1.self_attn.k_proj"] == (32, 16)
    assert layout.linear["model.layers.1.mlp.down_proj"] == (64, 32)
    assert layout.output_name == "lm_head" and "lm_head" in layout.other and "lm_head" not in layout.linear
    assert layout.embeddings == {"model.embed_tokens"} and "model.norm" in layout.other


def test_layout_gpt2_conv1d() -> None:
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    layout = BaseLayout.from_model(GPT2LMHeadModel(config))
    assert layout.linear["transformer.h.0.attn.c_attn"] == (32, 96)
    assert layout.linear["transformer.h.0.mlp.c_fc"] == (32, 128)
    assert layout.linear["transformer.h.0.mlp.c_proj"] == (128, 32)
    assert layout.output_name == "lm_head" and "lm_head" not in layout.linear


def test_gpt2_conv1d_adapter_equals_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    layout = BaseLayout.from_model(GPT2LMHeadModel(config))
    lora = LoraConfig(target_modules=["c_attn", "c_fc"], r=4, fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(GPT2LMHeadModel(config), lora)
    model.save_pretrained(tmp_path)
    assert_equals_peft(load_peft_adapter(tmp_path, layout, 16), model)


# ---------------------------------------------------------------- valid adapters equal PEFT

VALID = {
    "list": dict(target_modules=["q_proj", "v_proj"]),
    "regex": dict(target_modules=r".*\.(q|k|down)_proj"),
    "all_linear": dict(target_modules="all-linear"),
    "patterns": dict(
        target_modules="all-linear",
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
        alpha_pattern={"v_proj": 3, "down_proj": 16.5},
    ),
    "rslora": dict(target_modules=["q_proj", "o_proj"], use_rslora=True, lora_alpha=5, rank_pattern={"o_proj": 3}),
    "layers": dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1]),
    "layers_int_pattern": dict(target_modules=["k_proj"], layers_to_transform=0, layers_pattern="layers"),
    "exclude_list": dict(target_modules="all-linear", exclude_modules=["down_proj", Q0]),
    "exclude_regex": dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*"),
    "fan_in_fan_out": dict(target_modules=["q_proj"], fan_in_fan_out=True),  # ignored for nn.Linear
}


@pytest.mark.parametrize("case", VALID)
def test_valid_adapter_equals_peft(case: str, make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, model = make_adapter(**VALID[case])
    parsed = load_peft_adapter(folder, layout, max_rank=16)
    assert_equals_peft(parsed, model)
    assert parsed.size_bytes == (folder / "adapter_model.safetensors").stat().st_size
    assert parsed.config["peft_type"] == "LORA" and parsed.alpha == float(parsed.config["lora_alpha"])


def test_patterns_give_per_module_rank_and_scale(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter(**VALID["patterns"])
    modules = load_peft_adapter(folder, layout, 16).modules
    assert modules[Q0].a.shape == (2, 32) and modules[Q0].scale == 8 / 2
    assert modules["model.layers.1.mlp.up_proj"].b.shape == (64, 6)
    assert modules["model.layers.0.mlp.up_proj"].b.shape == (64, 4)
    assert modules["model.layers.0.self_attn.v_proj"].scale == 3 / 4
    assert modules["model.layers.1.mlp.down_proj"].scale == 16.5 / 4


def test_all_linear_string_in_config(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    # save_pretrained writes the expanded list; a hand-written config may keep the shorthand.
    folder, model = make_adapter(target_modules="all-linear")
    edit_config(folder, target_modules="ALL-LINEAR")
    assert_equals_peft(load_peft_adapter(folder, layout, 16), model)


def test_bytes_api_and_default_segment_and_half_dtypes(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, model = make_adapter()
    tensors = {k.replace(".weight", ".default.weight"): v for k, v in weights(folder).items()}
    config = (folder / "adapter_config.json").read_bytes()
    assert_equals_peft(parse_peft_adapter(config, save(tensors), layout, 16), model)
    for dtype in (torch.float16, torch.bfloat16):
        half = {k: v.to(dtype) for k, v in tensors.items()}
        parsed = parse_peft_adapter(config, save(half), layout, 16)
        for key, tensor in half.items():
            module = key.removeprefix(PREFIX).split(".lora_")[0]
            got = parsed.modules[module].a if ".lora_A." in key else parsed.modules[module].b
            assert got.dtype == torch.float32 and torch.equal(got, tensor.float())


@pytest.mark.parametrize("layers", [2, 3])
def test_many_exact_names_with_layers_to_transform(layers: int, make_adapter: MakeAdapter, new_llama: Any) -> None:
    # PEFT condenses 20+ target names to suffixes, and only suffix matches obey
    # layers_to_transform: 14 exact names ignore it, 21 exact names do not.
    names = sorted(BaseLayout.from_model(new_llama(layers)).linear)
    folder, model = make_adapter(num_hidden_layers=layers, target_modules=names, layers_to_transform=[1])
    edit_config(folder, target_modules=names)  # PEFT saved its condensed list
    parsed = load_peft_adapter(folder, BaseLayout.from_model(new_llama(layers)), 16)
    assert_equals_peft(parsed, model)
    assert len(parsed.target_modules) == (14 if layers == 2 else 7)


# ---------------------------------------------------------------- refused: files


def test_pickle_bin_refused(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    torch.save(weights(folder), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    rejected(folder, layout, "pickle", "adapter_model.bin", "safetensors")


def test_pickle_bytes_refused(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    buffer = io.BytesIO()
    torch.save(weights(folder), buffer)
    with pytest.raises(AdapterFormatError, match="pickle"):
        parse_peft_adapter((folder / "adapter_config.json").read_bytes(), buffer.getvalue(), layout, 16)


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_file(missing: str, make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    (folder / missing).unlink()
    rejected(folder, layout, missing)


def test_missing_folder(tmp_path: Path, layout: BaseLayout) -> None:
    rejected(tmp_path / "nope", layout, "does not exist")


@pytest.mark.parametrize(
    "data", [b"", b"garbage" * 10, b"\xff\xff\xff\xff\xff\xff\xff\x7f{}", b"\x04\x00\x00\x00\x00\x00\x00\x00{}ab"]
)
def test_garbage_weights(data: bytes, make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    (folder / "adapter_model.safetensors").write_bytes(data)
    rejected(folder, layout, "safetensors")


def test_truncated_weights(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    rejected(folder, layout, "safetensors", "truncated")


# ---------------------------------------------------------------- refused: config

BAD_CONFIGS = [
    (dict(peft_type="IA3"), "LORA"),
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(bias="all"), "bias"),
    (dict(lora_bias=True), "lora_bias"),
    (dict(init_lora_weights="pissa_niter_4"), "base weights"),
    (dict(target_modules=["nonexistent_proj"]), "no module"),
    (dict(target_modules=["embed_tokens", "q_proj"], use_dora=True), "DoRA on the input embedding"),
    (dict(modules_to_save=["norm"]), "only the output layer"),
    (dict(trainable_token_indices=[3, 3]), "twice"),
    (dict(trainable_token_indices=[100_000]), "outside the vocabulary"),
    (dict(target_modules=["mlp", "q_proj"]), "not a linear layer"),
    (dict(target_modules="(unclosed"), "regular expression"),
    (dict(rank_pattern={"q_proj[": 2}), "regular expression"),
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
    (dict(layers_pattern="layers"), "layers_to_transform"),
    (dict(layers_to_transform=["0"]), "layers_to_transform"),
    (dict(r=0), "positive integer"),
    (dict(r="4"), "positive integer"),
    (dict(lora_alpha=None), "finite number"),
    (dict(rank_pattern={"q_proj": 2.5}), "rank_pattern"),
    (dict(target_modules=None), "target_modules"),
    (dict(target_modules=[1, 2]), "target_modules"),
    (dict(use_rslora="yes"), "use_rslora"),
]


@pytest.mark.parametrize(("changes", "word"), BAD_CONFIGS, ids=[str(c) for c, _ in BAD_CONFIGS])
def test_bad_config(changes: dict, word: str, make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    edit_config(folder, **changes)
    rejected(folder, layout, word)


@pytest.mark.parametrize(
    ("text", "word"),
    [(b"{not json", "JSON"), (b"\xff\xfe\x00", "JSON"), (b"[1, 2]", "object"), (b"[" * 100_000, "JSON")],
)
def test_config_not_json_object(text: bytes, word: str, make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    (folder / "adapter_config.json").write_bytes(text)
    rejected(folder, layout, word)


def test_real_dora_adapter_parsed(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter(use_dora=True)
    adapter = load_peft_adapter(folder, layout, 64)
    assert adapter.dora and all(m.magnitude is not None for m in adapter.modules.values())


def test_real_embedding_and_head_adapter_parsed(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter(target_modules=["embed_tokens", "lm_head", "q_proj"])
    adapter = load_peft_adapter(folder, layout, 64)
    assert {"model.embed_tokens", "lm_head"} <= set(adapter.modules)


def test_rank_above_limit(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter(r=4, rank_pattern={"v_proj": 12})
    message = rejected(folder, layout, "rank 12", "8", "--max-lora-rank", max_rank=8)
    assert "v_proj" in message


@pytest.mark.parametrize("pattern", [r"((a{100}){100}){100}", r"(?:x{50000})", "(" * 600 + ")" * 600])
def test_costly_regex_refused_before_compiling(pattern: str, make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    edit_config(folder, target_modules=pattern)
    rejected(folder, layout, "target_modules")


def test_regex_time_budget(monkeypatch: pytest.MonkeyPatch, make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter(target_modules=r".*\.q_proj")
    monkeypatch.setattr(peft_config, "REGEX_BUDGET_S", 0.0)
    rejected(folder, layout, "too long")


# ---------------------------------------------------------------- refused: tensors

A0, B0 = f"{PREFIX}{Q0}.lora_A.weight", f"{PREFIX}{Q0}.lora_B.weight"


def _tamper(tensors: dict[str, torch.Tensor], case: str) -> None:
    if case == "shape":
        tensors[A0] = torch.randn(4, 31)
    elif case == "int":
        tensors[A0] = tensors[A0].to(torch.int32)
    elif case == "bool":
        tensors[B0] = tensors[B0] > 0
    elif case in ("nan", "inf"):
        tensors[B0][1, 2] = float(case)
    elif case == "missing":
        del tensors[B0]
    elif case == "extra_key":
        tensors[f"{PREFIX}{Q0}.something.weight"] = torch.zeros(2)
    elif case == "extra_module":
        k = Q0.replace("q_proj", "k_proj")
        tensors[f"{PREFIX}{k}.lora_A.weight"] = torch.zeros(4, 32)
        tensors[f"{PREFIX}{k}.lora_B.weight"] = torch.zeros(16, 4)
    elif case == "unknown_module":
        tensors[A0.replace("layers.0", "layers.7")] = torch.zeros(4, 32)
    elif case == "lm_head":
        tensors[f"{PREFIX}lm_head.lora_A.weight"] = torch.zeros(4, 32)
    elif case == "embedding":
        tensors[f"{PREFIX}model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 128)
    elif case == "dora":
        tensors[f"{PREFIX}{Q0}.lora_magnitude_vector"] = torch.ones(32)
    elif case == "lora_bias":
        tensors[f"{PREFIX}{Q0}.lora_B.bias"] = torch.zeros(32)
    elif case == "duplicate":
        tensors[A0.replace(".weight", ".default.weight")] = tensors[A0].clone()
    elif case == "no_prefix":
        tensors[A0.removeprefix(PREFIX)] = tensors.pop(A0)


BAD_TENSORS = {
    "shape": "shape",
    "int": "dtype",
    "bool": "dtype",
    "nan": "NaN",
    "inf": "Inf",
    "missing": "missing",
    "extra_key": "unexpected",
    "extra_module": "unexpected",
    "unknown_module": "no such module",
    "lm_head": "does not target",
    "embedding": "does not target",
    "dora": "DoRA",
    "lora_bias": "lora_bias",
    "duplicate": "duplicate",
    "no_prefix": "unexpected",
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_bad_tensors(case: str, make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    tensors = weights(folder)
    _tamper(tensors, case)
    write_weights(folder, tensors)
    rejected(folder, layout, BAD_TENSORS[case])


def test_tensor_rank_disagrees_with_config(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter(r=8)
    edit_config(folder, r=4)
    rejected(folder, layout, "shape", "rank 4")


# ---------------------------------------------------------------- fuzz: never anything but AdapterFormatError


def test_fuzzed_bytes_only_raise_format_errors(make_adapter: MakeAdapter, layout: BaseLayout) -> None:
    folder, _ = make_adapter()
    config = (folder / "adapter_config.json").read_bytes()
    data = (folder / "adapter_model.safetensors").read_bytes()
    rng = random.Random(0)
    outcomes = set()
    for i in range(400):
        cfg, blob = bytearray(config), bytearray(data)
        target, limit = (cfg, 40) if i % 4 == 0 else (blob, 200)  # mostly the header and early data
        for _ in range(rng.randint(1, 4)):
            target[rng.randrange(min(limit, len(target)))] = rng.randrange(256)
        if i % 5 == 0:
            del blob[rng.randrange(len(blob)) :]
        try:
            parse_peft_adapter(bytes(cfg), bytes(blob), layout, 16)
            outcomes.add("ok")
        except AdapterFormatError:
            outcomes.add("refused")
    assert "refused" in outcomes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_check_refuses_every_nan_and_inf_and_no_large_finite_value(dtype):
    from server.adapters.peft_extras import all_finite

    big = torch.full((4096,), torch.finfo(dtype).max, dtype=dtype)  # a float32 sum would overflow to inf
    assert all_finite(big) and all_finite(-big) and all_finite(torch.zeros(0, dtype=dtype))
    for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
        tensor = torch.randn(64, dtype=torch.float32).to(dtype)
        tensor[3:3 + len(bad)] = torch.tensor(bad, dtype=dtype)
        assert not all_finite(tensor), bad

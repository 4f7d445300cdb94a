"""The shipped demo adapters in adapters/: plain PEFT folders, and (slow) each shows its task's behaviour."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from server.adapters.contract import parse_contract
from server.train.make_adapters import HELDOUT_SEED, TRAIN_EXAMPLES, TRAIN_SEED, cell, install
from server.train.tasks import TASKS, sentences

STORE = Path(__file__).resolve().parents[2] / "adapters"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_adapter_is_a_small_peft_folder(name):
    folder = STORE / name
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors", "loraplex.json"]
    contract = parse_contract((folder / "loraplex.json").read_bytes())
    assert contract.prompt_template == "Input: {input}\nOutput:" and contract.defaults.temperature == 0
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and 8 <= config["r"] <= 16
    assert config["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
    weights = folder / "adapter_model.safetensors"
    assert weights.stat().st_size < 16_000_000
    with safe_open(weights, framework="pt") as tensors:
        keys = list(tensors.keys())
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
        for key in keys:
            shape = tensors.get_slice(key).get_shape()
            assert (shape[0] if ".lora_A." in key else shape[1]) == config["r"]
    assert "exact match" in (folder / "README.md").read_text()


def installed_over(tmp_path: Path, existing: str, content: str) -> tuple[Path, Path]:
    """(target, staging): `store/demo` holding file `existing`, replaced by `install` with a staged folder."""
    target = tmp_path / "store" / "demo"
    target.mkdir(parents=True)
    (target / existing).write_text(content)
    staging = tmp_path / "store" / ".demo-new"
    staging.mkdir()
    (staging / "adapter_config.json").write_text("{}")
    install(staging, target)
    return target, staging


def test_install_swaps_the_folder_in_whole(tmp_path: Path):
    target, staging = installed_over(tmp_path, "old.txt", "old")
    assert [p.name for p in target.iterdir()] == ["adapter_config.json"] and not staging.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["demo"]
    assert os.stat(target / "adapter_config.json").st_mode & 0o777 == 0o644


def test_install_keeps_the_hand_written_contract(tmp_path: Path):
    target, _ = installed_over(tmp_path, "loraplex.json", '{"description": "kept"}')
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "loraplex.json"]
    assert json.loads((target / "loraplex.json").read_text()) == {"description": "kept"}


def test_card_cells_stay_on_one_table_row():
    assert cell("City: Lisbon | Name: Maria") == r"`City: Lisbon \| Name: Maria`"
    assert cell("a\nb") == r"`a\nb`" and cell("") == "(nothing)"


@pytest.mark.slow
@pytest.mark.full
def test_one_prompt_gives_each_adapters_behaviour():
    """The real base model with every shipped adapter, on held-out prompts: each checker passes."""
    from peft import PeftModel

    from server.config import Settings
    from server.models import load_base_model
    from server.train.data import Example
    from server.train.evaluate import generate_greedy
    from server.train.tasks import format_prompt

    train = frozenset(text for text, _ in sentences(TRAIN_EXAMPLES, TRAIN_SEED))
    texts = [text for text, _ in sentences(4, HELDOUT_SEED, exclude=train)]
    prompts = [Example(format_prompt(text), "") for text in texts]
    base = load_base_model(Settings(device="cpu"))
    names = sorted(TASKS)
    model = PeftModel.from_pretrained(base.model, STORE / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(STORE / name, adapter_name=name)
    for name in names:
        model.set_adapter(name)
        outputs = generate_greedy(model, base.tokenizer, prompts, max_new_tokens=40)
        assert all(TASKS[name].check(p.prompt, o) for p, o in zip(prompts, outputs)), (name, outputs)

"""The LoRA layers skip the modules that no adapter of a step targets, and give the same output."""

from __future__ import annotations

import copy

import torch

from server.adapters.layout import BaseLayout
from server.adapters.peft_format import load_peft_adapter
from server.lora.model import LoraModel
from tests.conftest import tiny_llama
from tests.lora.padded_batch import forward_logits
from tests.peft_adapters import peft_reference, save_adapter


def test_modules_no_adapter_of_the_step_targets_are_skipped(tmp_path):
    base = tiny_llama()
    qv = save_adapter(base, tmp_path / "qv", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    mlp = save_adapter(base, tmp_path / "mlp", seed=2, r=8, lora_alpha=8, target_modules=["down_proj"])
    model = copy.deepcopy(base)
    layout = BaseLayout.from_model(model)
    lora = LoraModel(model, layout, max_loras=2, max_rank=8)
    lora.write_slot(0, load_peft_adapter(qv, layout, 8))
    lora.write_slot(1, load_peft_adapter(mlp, layout, 8))
    rows = [[5, 9, 17, 33, 2], [7, 7, 40, 3]]

    ours = forward_logits(lora, rows, [0, -1], pad_id=0)  # only the q/v adapter in this step
    with torch.inference_mode():
        expected = peft_reference(base, qv)(input_ids=torch.tensor([rows[0]])).logits[0]
        base_logits = base(input_ids=torch.tensor([rows[1]])).logits[0]
    torch.testing.assert_close(ours[0], expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours[1], base_logits, atol=1e-4, rtol=1e-4)
    def shrinks(members: int) -> list[int]:  # per layer: q/k/v has 3 members, gate/up 2
        return [g.shrinks for g in lora.groups if g.members == members]

    down = [layer for name, layer in lora.layers.items() if name.endswith("down_proj")]
    assert shrinks(3) == [1, 1] and shrinks(2) == [0, 0]
    assert [layer.group.shrinks for layer in down] == [0, 0]
    # Every member that read a shrink dropped it: no activations kept past the step.
    assert all(g._cache.x is None and g._cache.t is None for g in lora.groups)

    forward_logits(lora, rows, [0, 1], pad_id=0)  # now down_proj has an adapter in the step
    assert [layer.group.shrinks for layer in down] == [1, 1] and shrinks(2) == [0, 0]

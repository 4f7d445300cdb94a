"""Smoke tests of the benchmark tools: cheap adapters the registry accepts, the report's parsing and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.common import TARGET_SETS, lora_bytes, percentile, write_random_adapter  # noqa: E402
from server.adapters.layout import BaseLayout  # noqa: E402
from server.adapters.peft_format import load_peft_adapter  # noqa: E402

pytest.importorskip("matplotlib")

STEP_OUT = """base: 91.5 ms/step
2 adapters: 107.0 ms/step
ratio base/LoRA step time: 0.855

=== profile, 0 adapters ===
-----------------------------  ------------  ------------  ------------  ------------  ------------  ------------
                         Name    Self CPU %      Self CPU   CPU total %     CPU total  CPU time avg    # of Calls
-----------------------------  ------------  ------------  ------------  ------------  ------------  ------------
                     aten::mm        84.35%     201.219ms        84.41%     201.360ms     318.104us           633
           aten::index_select         1.41%       3.369ms         1.65%       3.938ms      21.171us           186
                  aten::copy_         0.41%     975.425us         0.41%     975.425us       1.327us           735
-----------------------------  ------------  ------------  ------------  ------------  ------------  ------------
Self CPU time total: 238.561ms

=== profile, 2 adapters ===
                     aten::mm        80.00%     202.000ms        84.41%     201.360ms     318.104us           633
                    aten::bmm         3.00%       9.000ms         1.65%       3.938ms      21.171us           186
"""


def test_cheap_adapter_parses_with_the_bytes_it_claims(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    layout = BaseLayout.from_model(model)
    pool = torch.randn(1 << 16)
    written = write_random_adapter(tmp_path / "a", layout, 8, TARGET_SETS["attn"], seed=1, pool=pool)
    adapter = load_peft_adapter(tmp_path / "a", layout, max_rank=16)
    assert adapter.rank == 8 and len(adapter.target_modules) == 8  # 4 projections x 2 layers
    assert written == lora_bytes(layout, 8, TARGET_SETS["attn"])


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile([3.0], 99) == 3.0


def test_report_parses_step_profile_and_writes_plots(tmp_path, monkeypatch):
    steps, profiles = report.parse_step(STEP_OUT)
    assert steps == {"base": 91.5, "2 adapters": 107.0}
    assert profiles["0 adapters"]["aten::mm"] == pytest.approx(201.219 / report.PROFILED_STEPS)
    assert profiles["0 adapters"]["aten::copy_"] == pytest.approx(0.975425 / report.PROFILED_STEPS)
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "step.txt").write_text(STEP_OUT)
    runs = {str(c): {"tok_s": 10.0 / (1 + c / 1000), "ratio": 1 / (1 + c / 1000), "ttft_p99_ms": 100.0 + c,
                     "itl_p99_ms": 50.0} for c in (1, 10, 100)}
    scaling = {"meta": {"max_loras": 4, "max_cpu_loras": 8, "quick": True}, "runs": {"zipf": runs}}
    (tmp_path / "scaling.json").write_text(json.dumps(scaling))
    (tmp_path / "scaling.md").write_text("# Scaling\n\n| table |\n")
    report.main()
    assert {p.name for p in tmp_path.glob("*.png")} == {"scaling.png", "step.png"}
    text = (tmp_path / "results.md").read_text()
    assert "## Scaling" in text and "![step](step.png)" in text

"""lm-evaluation-harness as a real client of `loraplex serve`: its per-example loglikelihoods equal those of
lm-eval's own `hf` model with `peft=` on the same folders (within 1e-3), and its generations are the same,
through completions (token-id prompts, echo + logprobs) and through chat."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import TEST_CACHE
from tests.e2e.server_process import running_server

pytestmark = [pytest.mark.slow, pytest.mark.full]
pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]', or make eval)")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "eval"))
import score  # noqa: E402  (eval/score.py)

LIMIT = 8
MODELS = ("SmolLM2-135M-Instruct", "sentiment", "template")  # adapters without a bound response_format


@pytest.fixture(scope="module")
def url():
    with running_server("--adapters-dir", str(ROOT / "adapters"), "--cache-dir", str(TEST_CACHE),
                        "--device", "cpu", timeout=600) as base_url:
        yield base_url


@pytest.mark.parametrize("model", MODELS)
def test_server_scores_equal_hf_with_peft(url, model):
    info = score.served(url, None)
    tasks = list(score.DEFAULT_TASKS)
    api = score.api_scores(url, model, info.base_root, tasks, LIMIT)
    ref = score.hf_scores(info.base_root, info.adapters.get(model), tasks, LIMIT)
    worst, differ, total = score.compare(api, ref)
    assert total == LIMIT and differ == 0
    assert worst <= 1e-3
    assert api.metrics == pytest.approx(ref.metrics, abs=1e-9)
    assert len(api.examples["loraplex_sentiment"]) == LIMIT


def test_chat_generations_equal_hf_with_peft(url):
    info = score.served(url, None)
    api = score.api_scores(url, "template", info.base_root, ["loraplex_template"], 4, chat=True)
    ref = score.hf_scores(info.base_root, info.adapters["template"], ["loraplex_template"], 4, chat=True)
    assert score.compare(api, ref)[1:] == (0, 4)

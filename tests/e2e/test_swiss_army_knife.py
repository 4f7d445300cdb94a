"""The shipped task adapters over real HTTP: one burst mixing every adapter and the base; each
answer shows its own task's behaviour and no other's, also with fewer device slots than adapters."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from server.train.tasks import TASKS, format_prompt, sentences
from tests.conftest import TEST_CACHE
from tests.e2e.server_process import running_server

pytestmark = pytest.mark.slow

SHIPPED = Path(__file__).resolve().parents[2] / "adapters"
BASE = "SmolLM2-135M-Instruct"
PER_MODEL = 3


async def burst(url: str, jobs: list[tuple[str, str]]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def complete(model: str, text: str) -> str:
            # The adapters' loraplex.json holds their prompt template: they get the bare sentence.
            prompt = format_prompt(text) if model == BASE else text
            response = await client.post("/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": 48, "temperature": 0})
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]
        return await asyncio.gather(*(complete(model, text) for model, text in jobs))


def check_burst(url: str) -> None:
    texts = [text for text, _ in sentences(PER_MODEL * (len(TASKS) + 1), seed=2026)]
    models = [*TASKS, BASE]
    jobs = [(models[i % len(models)], text) for i, text in enumerate(texts)]  # interleaved: every step mixes
    answers = asyncio.run(burst(url, jobs))
    for (model, text), answer in zip(jobs, answers):
        shown = {name for name, task in TASKS.items() if task.check(text, answer)}
        expected = set() if model == BASE else {model}
        assert shown == expected, f"{model} on {text!r} answered {answer!r}, which shows {shown or 'no task'}"


@pytest.mark.full
@pytest.mark.parametrize("max_loras", [8, 2])
def test_one_burst_every_adapter_shows_only_its_own_task(max_loras):
    assert {p.name for p in SHIPPED.iterdir() if p.is_dir()} >= set(TASKS)
    with running_server("--adapters-dir", str(SHIPPED), "--cache-dir", str(TEST_CACHE), "--device", "cpu",
                        "--max-loras", str(max_loras)) as url:
        check_burst(url)

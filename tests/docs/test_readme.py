"""README.md and docs/*.md as a doc test: every shell and Python block runs as pasted against a real server
started as `make serve` starts it (the default `adapters/` store, relative to the working folder; here a copy
of the checkout's, in a temporary folder), on a free port instead of 8000.

Blocks run in one simulated terminal session, README.md's first, then each file of docs/ in name order, each
file's in its order: variables a bash block exports are seen by the blocks after it. Each must exit 0 and print no error body. Blocks marked
`<!-- doctest: skip (reason) -->` are reported as skipped with their reason; blocks marked
`<!-- doctest: full (reason) -->` run only in `test_readme_with_training` (`make test-full`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_CACHE
from tests.docs.readme_blocks import Block, MarkerError, readme_blocks
from tests.e2e.server_process import free_port, stop_process, wait_until_healthy

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ADMIN_TOKEN = "change-me"  # the docs start the server with LORAPLEX_ADMIN_TOKEN=change-me
ERROR_BODY = re.compile(r'\{\s*"error"\s*:')
BLOCK_TIMEOUT, FULL_TIMEOUT = 120, 1800
BLOCKS = [block for doc in DOCS for block in readme_blocks(doc, doc.relative_to(ROOT).as_posix())]


@dataclass
class Session:
    """A server like `make serve`'s and the terminal the docs' blocks are pasted into."""

    workdir: Path
    url: str
    port: int
    env_file: Path
    log: Path

    def run(self, block: Block, timeout: float) -> subprocess.CompletedProcess:
        code = block.code.replace("localhost:8000", f"127.0.0.1:{self.port}")
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{self.port}")
        script = self.workdir / f".block-{block.id}"
        if block.language == "python":
            script.write_text(code)
            shell = f'set -a; . "{self.env_file}"; set +a; exec python3 "{script}"'
        else:
            # Like a terminal: what earlier blocks exported is set; what this one exports is kept.
            script.write_text(f'. "{self.env_file}"\nset -e -o pipefail\n{code}\nexport -p > "{self.env_file}"\n')
            shell = f'exec bash "{script}"'
        return subprocess.run(["bash", "-c", shell], cwd=self.workdir, env=client_env(self.workdir),
                              capture_output=True, text=True, timeout=timeout)

    def check(self, block: Block, timeout: float = BLOCK_TIMEOUT) -> str:
        done = self.run(block, timeout)
        where = f"{block.where} ({block.language})"
        assert done.returncode == 0, (f"{where} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n"
                                      f"--- stderr\n{done.stderr[-3000:]}\n--- server log\n{self.tail()}")
        assert not ERROR_BODY.search(done.stdout), f"{where} printed an error body:\n{done.stdout[-3000:]}"
        assert "Internal Server Error" not in done.stdout, f"{where}:\n{done.stdout[-3000:]}"
        return done.stdout

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def client_env(workdir: Path) -> dict[str, str]:
    """The user's shell: `python3`, `python` and `.venv/bin/loraplex` are this interpreter with this checkout
    (and the test suite's model cache, so `loraplex train` converts nothing)."""
    return {**os.environ, "PATH": f"{workdir / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "LORAPLEX_CACHE_DIR": str(TEST_CACHE)}


def make_workdir(workdir: Path) -> None:
    """A checkout as the docs' commands see it: adapters/ (a copy: uploads land there), examples/, .venv/bin."""
    shutil.copytree(ROOT / "adapters", workdir / "adapters",
                    ignore=shutil.ignore_patterns(".loraplex-registry.json", ".tmp-*", ".old-*"))
    shutil.copytree(ROOT / "examples", workdir / "examples")
    bin_dir = workdir / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, target in (("python", ""), ("python3", ""), ("loraplex", " -m server.cli")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{target} "$@"\n')
        shim.chmod(0o755)


@contextmanager
def readme_session(tmp: Path) -> Iterator[Session]:
    workdir = tmp / "checkout"
    workdir.mkdir()
    make_workdir(workdir)
    port = free_port()
    env_file = workdir / ".session-env"
    env_file.write_text("")
    log = tmp / "server.log"
    # `make serve` runs `loraplex serve` with no flags: only the port differs (and the test suite's model cache).
    env = {**client_env(workdir), "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN, "LORAPLEX_PORT": str(port),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for variable in ("LORAPLEX_ADAPTERS_DIR", "LORAPLEX_API_KEY"):
        env.pop(variable, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc, 180.0, log)
        yield Session(workdir, url, port, env_file, log)
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Iterator[Session]:
    with readme_session(tmp_path_factory.mktemp("readme")) as started:
        yield started


def test_markers_are_well_formed(tmp_path: Path):
    """Every marker precedes a runnable block and gives a reason (a stray marker is an error, not a skip)."""
    assert {b.source for b in BLOCKS} >= {"README.md", "docs/api.md", "docs/adapters.md"}, "runnable blocks missing"
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)
    assert all(b.reason for b in BLOCKS if b.mode != "run")
    for bad in ("<!-- doctest: skip -->\n```bash\ntrue\n```\n",  # no reason
                "<!-- doctest: skip (why) -->\nsome prose\n```bash\ntrue\n```\n",  # not before the block
                "<!-- doctest: skip (why) -->\n```\noutput\n```\n"):  # a block that never runs
        (tmp_path / "bad.md").write_text(bad)
        with pytest.raises(MarkerError):
            readme_blocks(tmp_path / "bad.md")
    (tmp_path / "good.md").write_text("<!-- doctest: full (long) -->\n\n```sh\nmake x\n```\n```python\nprint(1)\n```\n")
    assert [(b.language, b.mode, b.reason) for b in readme_blocks(tmp_path / "good.md")] == [
        ("bash", "full", "long"), ("python", "run", "")]


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block(block: Block, session: Session):
    if block.mode == "skip":
        pytest.skip(f"{block.where}: {block.reason}")
    if block.mode == "full":
        pytest.skip(f"{block.where}: full ({block.reason}); make test-full runs it")
    session.check(block)


@pytest.mark.slow
def test_shipped_adapters_are_read_only_on_a_plain_make_serve(session: Session):
    """After every block ran: the store is the default one, so the shipped adapters cannot be deleted or replaced."""
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    folder = session.workdir / "adapters" / "sentiment"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    deleted = httpx.delete(f"{session.url}/v1/adapters/sentiment", headers=headers, timeout=30)
    assert deleted.status_code == 403 and "--adapters-dir" in deleted.json()["error"]["message"]
    files = {f: (f, before[f]) for f in ("adapter_config.json", "adapter_model.safetensors")}
    replaced = httpx.post(f"{session.url}/v1/adapters", headers=headers, data={"name": "sentiment", "overwrite": "true"},
                          files=files, timeout=60)
    assert replaced.status_code == 403, replaced.text
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    answer = httpx.post(f"{session.url}/v1/completions", timeout=60, json={
        "model": "sentiment", "prompt": "Input: Tom, 40, from Oslo thinks the hotel is awful.\nOutput:",
        "max_tokens": 3, "temperature": 0})
    assert answer.json()["choices"][0]["text"].strip() == "negative"


@pytest.mark.full
def test_readme_with_training(tmp_path: Path):
    """Every runnable block, the `full` ones included (train the sample data set, upload it, ask it), then the
    trained adapter must answer held-out examples right."""
    with readme_session(tmp_path) as started:
        for block in BLOCKS:
            if block.mode != "skip":
                started.check(block, FULL_TIMEOUT if block.mode == "full" else BLOCK_TIMEOUT)
        held_out = [json.loads(line) for line in (ROOT / "examples" / "city-heldout.jsonl").read_text().splitlines()]
        answers = [httpx.post(f"{started.url}/v1/completions", timeout=60, json={
            "model": "city", "prompt": r["prompt"], "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
            for r in held_out[:10]]
        right = sum(a.strip() == r["completion"].strip() for a, r in zip(answers, held_out))
        assert answers[0].strip() == held_out[0]["completion"].strip()  # docs/adapters.md's own question
        assert right >= 9, list(zip(answers, [r["completion"] for r in held_out]))

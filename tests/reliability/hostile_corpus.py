"""At least 30 hostile adapter uploads, each with a pattern its refusal message must match.

A case is a multipart body (`fields` + `files`, or a raw body for the multipart bombs) and
a regex over the error message: the message must name the problem, not just say "bad".
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import tarfile
import warnings
import zipfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import save as save_safetensors

from tests.api.archive_builders import make_tar, make_zip, tar_member
from tests.reliability.adapter_factory import Adapter, lora_config, lora_tensors, random_adapter
from tests.reliability.safetensors_bytes import build, edit_header, first_tensor, split
from tests.reliability.server_proc import BASE_NAME

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
BOMB_BYTES = 400 * 2**20  # decompressed size of the bombs: past the default 256 MiB --max-adapter-bytes
CASE_TIMEOUT = 30.0


@dataclass
class Case:
    label: str
    expect: str                        # regex (case-insensitive) the error message must match
    name: str = "hostile-anchor"   # an adapter that exists: every refused upload asks to overwrite it
    files: list = field(default_factory=list)   # httpx files list: (field, (filename, bytes))
    raw: tuple[bytes, str] | None = None       # (body, content type) sent as is


def _good() -> Adapter:
    return random_adapter(4242, rank=4, targets=("q_proj",), scale_b=0.1)


def pair(config: bytes, weights: bytes, name: str = "hostile-anchor", weights_name: str = WEIGHTS) -> dict:
    return {"name": name, "files": [(CONFIG, (CONFIG, config)), (weights_name, (weights_name, weights))]}


def archive(data: bytes, filename: str = "adapter.zip") -> dict:
    return {"files": [("archive", (filename, data))]}


def _tensors(**changes) -> bytes:
    tensors = lora_tensors(4242, 4, ("q_proj",), 0.1)
    for key, value in changes.items():
        tensors[key] = value
    return save_safetensors(tensors)


def _a_key(layer: int = 0) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight"


def _b_key(layer: int = 0) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_B.weight"


def _pickled() -> bytes:
    return pickle.dumps({"lora": [1.0, 2.0]}, protocol=4)


def _torch_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:  # torch.save's container: a zip holding data.pkl
        z.writestr("archive/data.pkl", _pickled())
    return buffer.getvalue()


def _nested(depth: int) -> bytes:
    return b'{"r": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"


def _multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "hostileboundary") -> tuple[bytes, str]:
    out = io.BytesIO()
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _duplicate_zip(members: list[tuple[str, bytes]]) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        return make_zip([*members, (CONFIG, members[0][1])])


def _zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr(CONFIG, _good().config)
        with z.open(WEIGHTS, "w", force_zip64=True) as member:
            chunk = bytes(2**20)
            for _ in range(BOMB_BYTES // len(chunk)):
                member.write(chunk)
    return buffer.getvalue()


def _gzip_bomb() -> bytes:
    good = _good()
    info = tarfile.TarInfo(WEIGHTS)
    info.size = BOMB_BYTES
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tar:
            config = tarfile.TarInfo(CONFIG)
            config.size = len(good.config)
            tar.addfile(config, io.BytesIO(good.config))
            tar.addfile(info, _Zeros(BOMB_BYTES))
    return raw.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def weights_cases(good: Adapter) -> list[Case]:
    blob = good.weights
    header, data = split(blob)
    key = first_tensor(header)

    def lie(edit) -> bytes:
        return edit_header(blob, edit)

    return [
        Case("pickle named adapter_model.safetensors", r"pickle", **pair(good.config, _pickled())),
        Case("pickle named adapter_model.bin", r"pickle", **pair(good.config, _pickled(), weights_name="adapter_model.bin")),
        Case("torch.save zip named .safetensors", r"pickle|torch\.save", **pair(good.config, _torch_zip())),
        Case("header length past the end", r"safetensors|header", **pair(good.config, build(header, data, 2**40))),
        Case("data offsets past the end", r"safetensors|offset|truncated|corrupt",
             **pair(good.config, lie(lambda h: h[key].update(data_offsets=[0, len(data) + 4096])))),
        Case("dtype that does not match the byte size", r"safetensors|size|dtype|corrupt",
             **pair(good.config, lie(lambda h: h[key].update(dtype="F64")))),
        Case("overlapping data offsets", r"safetensors|offset|overlap|corrupt",
             **pair(good.config, lie(lambda h: [h[k].update(data_offsets=[0, h[k]["data_offsets"][1] - h[k]["data_offsets"][0]])
                                                for k in h if k != "__metadata__"]))),
        Case("truncated weights", r"safetensors|truncated|corrupt", **pair(good.config, blob[: len(blob) // 2])),
        Case("empty weights file", r"safetensors|empty|truncated|corrupt", **pair(good.config, b"")),
        Case("huge declared shape", r"safetensors|shape|size|corrupt",
             **pair(good.config, lie(lambda h: h[key].update(shape=[2**31, 2**31])))),
        Case("NaN in lora_A", r"nan", **pair(good.config, _tensors(**{_a_key(): torch.full((4, 576), float("nan"))}))),
        Case("Inf in lora_B", r"inf", **pair(good.config, _tensors(**{_b_key(3): torch.full((576, 4), float("inf"))}))),
        Case("integer dtype", r"dtype", **pair(good.config, _tensors(**{_a_key(): torch.ones(4, 576, dtype=torch.int32)}))),
        Case("lora_B rank does not match r", r"shape", **pair(good.config, _tensors(**{_b_key(): torch.ones(576, 3)}))),
        Case("lora_A wider than the layer", r"shape", **pair(good.config, _tensors(**{_a_key(): torch.ones(4, 100_000)}))),
        Case("tensor that is not a LoRA weight", r"unexpected tensor",
             **pair(good.config, _tensors(**{"base_model.model.lm_head.weight": torch.ones(2, 2)}))),
        Case("missing lora_B", r"missing", **pair(good.config, save_safetensors(
            {k: v for k, v in lora_tensors(4242, 4, ("q_proj",), 0.1).items() if k != _b_key(5)}))),
        Case("DoRA magnitude vector", r"dora", **pair(good.config, _tensors(
            **{"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(576)}))),
    ]


def config_cases(good: Adapter) -> list[Case]:
    big = lora_tensors(1, 32, ("q_proj",), 0.1, layers=range(30))
    return [
        Case("rank above the server limit", r"rank", **pair(lora_config(32, ("q_proj",)), save_safetensors(big))),
        Case("unknown target module", r"foo_proj|target", **pair(lora_config(4, ("foo_proj",)), good.weights)),
        Case("config is a JSON list", r"object|adapter_config", **pair(b'[1, 2, 3]', good.weights)),
        Case("config nested 10,000 deep", r"nest|deep|json|adapter_config", **pair(_nested(10_000), good.weights)),
        Case("config is not JSON", r"json", **pair(b"\xff\xfe not json {", good.weights)),
        Case("config r is a string", r"\br\b|rank|integer", **pair(json.dumps({**json.loads(good.config), "r": "8"}).encode(),
                                                               good.weights)),
    ]


def name_cases(good: Adapter) -> list[Case]:
    names = [("name with /", "a/b"), ("name ..", ".."), ("name with NUL", "ab\x00c"),
             ("unicode look-alike name", "ѕhout"), ("name starting with .", ".hidden"),
             ("name of 65 characters", "x" * 65), ("base name in another case", BASE_NAME.lower()),
             ("name with a space", "a b")]
    return [Case(label, r"name", **pair(good.config, good.weights, name=value)) for label, value in names]


def archive_cases(good: Adapter) -> list[Case]:
    members = [(CONFIG, good.config), (WEIGHTS, good.weights)]
    inner = make_zip(members)
    return [
        Case("zip slip", r"\.\.", **archive(make_zip([("../../evil/" + CONFIG, good.config), (WEIGHTS, good.weights)]))),
        Case("zip absolute path", r"absolute", **archive(make_zip([("/etc/" + CONFIG, good.config), (WEIGHTS, good.weights)]))),
        Case("tar symlink", r"link", **archive(make_tar([(CONFIG, good.config),
                                                         tar_member(WEIGHTS, kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
                                               "adapter.tar")),
        Case("tar hard link", r"link", **archive(make_tar([(CONFIG, good.config),
                                                           tar_member(WEIGHTS, kind=tarfile.LNKTYPE, linkname=CONFIG)]),
                                                 "adapter.tar")),
        Case("tar device node", r"device", **archive(make_tar([(CONFIG, good.config), (WEIGHTS, good.weights),
                                                               tar_member("dev", kind=tarfile.CHRTYPE)]), "adapter.tar")),
        Case("zip bomb", r"larger|limit|too large|bytes", **archive(_zip_bomb())),
        Case("gzip bomb (tar.gz)", r"larger|limit|too large|bytes", **archive(_gzip_bomb(), "adapter.tar.gz")),
        Case("duplicate members", r"more than one|duplicate|twice", **archive(_duplicate_zip(members))),
        Case("archive inside an archive", r"no adapter_config|nested|archive", **archive(make_zip([("inner.zip", inner)]))),
        Case("archive that is no archive", r"archive", **archive(b"\x00garbage" * 100, "adapter.zip")),
        Case("zip with 5,000 members", r"members", **archive(make_zip([*members, *((f"f{i}", b"") for i in range(5000))]))),
        Case("pickle inside a zip", r"pickle", **archive(make_zip([(CONFIG, good.config), ("adapter_model.bin", _pickled())]))),
    ]


def multipart_cases(good: Adapter) -> list[Case]:
    many = [("name", f"n{i}".encode(), None) for i in range(5000)]
    files = [(CONFIG, good.config, CONFIG), (WEIGHTS, good.weights, WEIGHTS)]
    return [
        Case("multipart with 5,000 parts", r"part|field|name|twice|more than once", raw=_multipart([*many, *files])),
        Case("multipart with 5,000 file parts", r"part|twice|more than once|unexpected",
             raw=_multipart([("name", b"hostile-anchor", None), *files, *((f"x{i}", b"", f"x{i}") for i in range(5000))])),
        Case("multipart without a closing boundary", r"multipart|malformed|missing|no adapter",
             raw=(_multipart([("name", b"hostile-anchor", None), *files])[0][:-20], "multipart/form-data; boundary=hostileboundary")),
    ]


def corpus() -> list[Case]:
    good = _good()
    return [*weights_cases(good), *config_cases(good), *name_cases(good), *archive_cases(good), *multipart_cases(good)]

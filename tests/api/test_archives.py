"""Archive safety, straight on `read_archive`: real zip and tar files, benign and hostile."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

import pytest

from server.api.archives import MAX_MEMBERS, ArchiveError, read_archive
from tests.api.archive_builders import (CHAR_DEVICE, CONFIG, SYMLINK, WEIGHTS, good_members, make_tar, make_zip,
                                        tar_member, zip_entry)

LIMIT = 1 << 20
WANTED = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}


def read(data: bytes, limit: int = LIMIT) -> dict[str, bytes]:
    """`read_archive` on a real file; the members it copies out, read back."""
    with tempfile.TemporaryDirectory() as work:
        archive = Path(work) / "upload"
        archive.write_bytes(data)
        return {name: path.read_bytes() for name, path in read_archive(archive, limit, Path(work)).items()}


@pytest.mark.parametrize("build", [
    lambda: make_zip(good_members()), lambda: make_zip(good_members("my-adapter/")),
    lambda: make_tar(good_members()), lambda: make_tar(good_members("my-adapter/")),
    lambda: make_tar(good_members("a/"), gz=True),
], ids=["zip", "zip-folder", "tar", "tar-folder", "tar.gz"])
def test_good_archives_give_the_two_files(build):
    assert read(build()) == WANTED


def refused(data: bytes, *words: str, status: int = 400) -> None:
    with pytest.raises(ArchiveError) as caught:
        read(data)
    assert caught.value.status == status
    for word in words:
        assert word in caught.value.message, caught.value.message


def test_zip_path_traversal():
    refused(make_zip([("../adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)]), "'..'")
    refused(make_zip([("a/../../x", b"x"), *good_members()]), "'..'")


def test_zip_absolute_path():
    refused(make_zip([("/etc/adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)]), "absolute")
    refused(make_zip([("C:/x/adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)]), "absolute")


def test_zip_symlink():
    refused(make_zip([zip_entry("adapter_config.json", SYMLINK, b"/etc/passwd"),
                      ("adapter_model.safetensors", WEIGHTS)]), "symbolic link")


def test_zip_device():
    refused(make_zip([zip_entry("dev", CHAR_DEVICE), *good_members()]), "device")


def test_zip_bomb_is_413():
    bomb = make_zip([("adapter_config.json", CONFIG), ("adapter_model.safetensors", b"\0" * (8 * LIMIT))])
    assert len(bomb) < LIMIT // 20  # tiny on the wire
    refused(bomb, "larger than the limit", status=413)


def test_zip_bomb_with_lying_header_is_413():
    # The header claims a small size; the bounded read still stops one byte past the limit.
    data = bytearray(make_zip([("adapter_config.json", CONFIG), ("adapter_model.safetensors", b"\0" * (2 * LIMIT))]))
    for marker in (b"PK\x01\x02", b"PK\x03\x04"):
        start = 0
        while (at := data.find(marker, start)) >= 0:
            offset = at + (24 if marker == b"PK\x01\x02" else 22)
            if int.from_bytes(data[offset:offset + 4], "little") == 2 * LIMIT:
                data[offset:offset + 4] = (100).to_bytes(4, "little")
            start = at + 4
    with pytest.raises(ArchiveError) as caught:
        read(bytes(data))
    assert caught.value.status in (400, 413)


def test_zip_too_many_members():
    refused(make_zip([(f"f{i}", b"") for i in range(MAX_MEMBERS + 1)] + good_members()), "members")


def test_zip_pickle_member():
    refused(make_zip([("adapter_config.json", CONFIG), ("adapter_model.bin", b"\x80\x04K\x01.")]), "pickle")


def test_zip_duplicates_and_missing():
    refused(make_zip([*good_members(), ("b/adapter_config.json", CONFIG)]), "more than one")
    refused(make_zip([("adapter_model.safetensors", WEIGHTS)]), "no adapter_config.json")


def test_zip_encrypted_member():
    data = bytearray(make_zip(good_members()))
    for marker, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (at := data.find(marker, start)) >= 0:
            data[at + flag_at] |= 0x1
            start = at + 4
    refused(bytes(data), "encrypted")


def test_tar_traversal_absolute_links_devices():
    refused(make_tar([("../adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)]), "'..'")
    refused(make_tar([("/abs/adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)]), "absolute")
    refused(make_tar([tar_member("adapter_config.json", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
                      ("adapter_model.safetensors", WEIGHTS)]), "link")
    refused(make_tar([("adapter_model.safetensors", WEIGHTS),
                      tar_member("adapter_config.json", kind=tarfile.LNKTYPE, linkname="adapter_model.safetensors")]),
            "link")
    refused(make_tar([tar_member("null", kind=tarfile.CHRTYPE), *good_members()]), "device")
    refused(make_tar([tar_member("fifo", kind=tarfile.FIFOTYPE), *good_members()]), "FIFO")


def test_tar_too_many_members():
    refused(make_tar([(f"f{i}", b"") for i in range(MAX_MEMBERS + 1)] + good_members()), "members")


def test_tar_gz_bomb_is_413():
    bomb = make_tar([("adapter_config.json", CONFIG), ("adapter_model.safetensors", b"\0" * (8 * LIMIT))], gz=True)
    assert len(bomb) < LIMIT // 20
    refused(bomb, "larger than the limit", status=413)


def test_plain_tar_oversized_member_is_413():
    refused(make_tar([("adapter_config.json", CONFIG), ("adapter_model.safetensors", b"\0" * (LIMIT + 1))]),
            "larger than the limit", status=413)


def test_not_an_archive_and_corrupt_archives():
    refused(b"hello world, not an archive", "not a .zip")
    refused(make_zip(good_members())[:-30], "zip")
    refused(make_tar(good_members(), gz=True)[:40], "truncated")

"""The registry's CPU tier is an LRU bounded by adapter count and by bytes of parsed weights."""

from __future__ import annotations

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore


def add(reg: AdapterRegistry, name: str, folder) -> None:
    reg.add(name, (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes())


def test_cpu_tier_evicts_lru_by_bytes_and_keeps_newest(make_adapter, layout, tmp_path):
    folders = [make_adapter()[0] for _ in range(4)]
    probe = AdapterRegistry(AdapterStore(tmp_path / "probe"), layout, max_rank=16, max_cpu_loras=8)
    add(probe, "probe", folders[0])
    size = probe.get("probe").size_bytes  # every adapter here has the same shape: rank 4 on q/v

    reg = AdapterRegistry(AdapterStore(tmp_path / "store"), layout, max_rank=16, max_cpu_loras=8,
                          max_cpu_bytes=2 * size + size // 2)
    for i, folder in enumerate(folders[:3]):
        add(reg, f"a{i}", folder)
    assert [reg.in_cpu(reg.get(f"a{i}")) for i in range(3)] == [False, True, True]
    assert reg.cpu_bytes() == 2 * size

    assert reg.cached(reg.get("a1")) is not None  # a1 becomes most recently used: a2 is evicted next
    add(reg, "a3", folders[3])
    assert [reg.in_cpu(reg.get(f"a{i}")) for i in range(4)] == [False, True, False, True]
    reg.remove("a3")
    assert reg.cpu_bytes() == size

    tiny = AdapterRegistry(AdapterStore(tmp_path / "tiny"), layout, max_rank=16, max_cpu_loras=8, max_cpu_bytes=1)
    add(tiny, "big", folders[0])
    add(tiny, "bigger", folders[1])
    assert tiny.cpu_keys() == [tiny.get("bigger").key]  # over budget on its own, the newest still stays


def test_cpu_tier_count_bound_still_holds(make_adapter, layout, tmp_path):
    reg = AdapterRegistry(AdapterStore(tmp_path / "store"), layout, max_rank=16, max_cpu_loras=2)
    for i in range(3):
        add(reg, f"a{i}", make_adapter()[0])
    assert reg.cpu_keys() == [reg.get("a1").key, reg.get("a2").key]

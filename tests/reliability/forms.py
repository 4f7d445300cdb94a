"""Sizes of every suite in its short form (`make test`) and its full form (`make soak`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Form:
    name: str
    churn_requests: int
    churn_names: int
    churn_contents: int
    churn_admin_ops: int
    churn_workers: int
    fuzz_cases: int
    leak_cycles: int
    leak_cancels: int
    crash_kills: int
    overload_factor: int
    slow_clients: int
    stall_upload_bytes: int
    stall_prompt_chars: int
    stall_samples: int


SHORT = Form("short", churn_requests=16, churn_names=3, churn_contents=4, churn_admin_ops=8, churn_workers=4,
             fuzz_cases=100, leak_cycles=8, leak_cancels=8, crash_kills=1, overload_factor=10, slow_clients=20,
             stall_upload_bytes=20 * 2**20, stall_prompt_chars=2**20 // 8, stall_samples=12)
SOAK = Form("soak", churn_requests=200, churn_names=16, churn_contents=24, churn_admin_ops=100, churn_workers=8,
            fuzz_cases=1200, leak_cycles=1000, leak_cancels=1000, crash_kills=20, overload_factor=10,
            slow_clients=200, stall_upload_bytes=200 * 2**20, stall_prompt_chars=2**20, stall_samples=200)

"""Which replica a request should reach: its adapter name is Ray Serve's multiplexed model id.

Pure functions, no Ray: the ingress reads the JSON body's `model` field once; requests for
one adapter then go to replicas that already hold it, while requests for the base model (and
everything that names no adapter: listings, admin, bad bodies) go to any replica, which
answers them as a single server would (a bad body still gets its 400 from the replica).
"""

from __future__ import annotations

import json

ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")
# Routes a replica's death may be retried on (nothing was sent yet, and running them again changes nothing).
RETRYABLE_PATHS = ROUTED_PATHS + ("/v1/models",)


def adapter_of(model: str) -> str:
    """`name@<sha256 prefix>` (a pinned version) routes as `name`: same adapter, same replicas."""
    name, at, _ = model.rpartition("@")
    return name if at else model


def multiplexed_model_id(method: str, path: str, body: bytes, base_name: str | None) -> str | None:
    """The adapter a completion names, or None: no affinity (base model, other routes, unreadable body)."""
    if method != "POST" or path not in ROUTED_PATHS or not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or not model.strip():
        return None
    name = adapter_of(model)
    return None if not name or name == base_name else name

#!/opt/venv/bin/python
"""Docker HEALTHCHECK: exit 0 when GET /ready answers 200, else 1 (the image has no curl).

/ready answers 503 while the model loads and while the server drains on SIGTERM, so an
orchestrator stops routing to a container that is shutting down.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    host = os.environ.get("LORAPLEX_HOST", "0.0.0.0")
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    url = f"http://{host}:{os.environ.get('LORAPLEX_PORT', '8000')}/ready"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""`python -m tests.api.fake_server_main PORT`: the real serving path (bind, background load,
SIGTERM drain, exit code) with the fake engine, for lifecycle tests that need a real process.

Environment: LORAPLEX_* settings as for `loraplex serve`; FAKE_LOAD_SECONDS (model load time),
FAKE_TOKEN_DELAY (seconds per generated token).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from server.api.app import create_app
from server.api.serving import bind, run
from server.config import Settings
from tests.api.conftest import ADMIN
from tests.api.fake_engine import FakeEngine


def build() -> FakeEngine:
    time.sleep(float(os.environ.get("FAKE_LOAD_SECONDS", "0")))
    return FakeEngine(delay=float(os.environ.get("FAKE_TOKEN_DELAY", "0.02")), context=100_000)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(port=int(sys.argv[1]), admin_token=os.environ.get("LORAPLEX_ADMIN_TOKEN", ADMIN))
    return run(create_app(None, settings), settings, build, bind(settings.host, settings.port))


if __name__ == "__main__":
    sys.exit(main())

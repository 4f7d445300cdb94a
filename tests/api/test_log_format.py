"""One log format across uvicorn's loggers and the server's own, as text or as one JSON object per line
(a real server process: the real serving path, the fake engine)."""

from __future__ import annotations

import json
import re
import signal

import httpx
import pytest

from server.logs import logging_config
from tests.api.test_lifecycle_process import fake_server, wait_for

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .+")


def served_log(tmp_path, log_format: str) -> list[str]:
    """The log lines of a server that started, answered one request and shut down on SIGTERM."""
    with fake_server(tmp_path, LORAPLEX_LOG_FORMAT=log_format, LORAPLEX_SHUTDOWN_GRACE="1") as (proc, url, log):
        wait_for(url, proc, "/ready", 200)
        assert httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2},
                          timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        return [line for line in log.read_text().splitlines() if line.strip()]


def test_text_lines_share_one_format(tmp_path):
    lines = served_log(tmp_path, "text")
    assert lines and all(TEXT_LINE.match(line) for line in lines), [l for l in lines if not TEXT_LINE.match(l)]
    loggers = {line.split(" ", 4)[3].rstrip(":") for line in lines}
    assert {"uvicorn.error", "server.api.access", "server.api.serving"} <= loggers


def test_json_lines_are_one_object_each(tmp_path):
    records = [json.loads(line) for line in served_log(tmp_path, "json")]
    assert all({"timestamp", "level", "logger", "message"} <= set(r) for r in records)
    assert not any("color_message" in r for r in records)  # uvicorn's terminal-coloured copy stays out
    assert {"uvicorn.error", "server.api.access", "server.api.serving"} <= {r["logger"] for r in records}
    access = next(r for r in records if r["logger"] == "server.api.access")
    assert "/v1/completions" in access["message"] and access["level"] == "INFO"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_uvicorn_loggers_propagate_to_the_one_handler(log_format):
    config = logging_config(log_format)
    assert set(config["root"]["handlers"]) == {"default"}
    assert all(spec["handlers"] == [] and spec["propagate"] for spec in config["loggers"].values())

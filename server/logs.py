"""One log format for every logger of the process: the server's own, and uvicorn's error and access loggers.

`text`: `<time> <LEVEL> <logger>: <message>`, one line each. `json`: one JSON object per line,
`{"timestamp", "level", "logger", "message"}` plus any extra fields (python-json-logger). The same
dictConfig is applied by the CLI and handed to uvicorn, which would otherwise install its own.
"""

from __future__ import annotations

import logging.config
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def logging_config(log_format: LogFormat = "text", level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` mapping: one stderr handler on the root; uvicorn's loggers propagate to it."""
    if log_format == "json":
        formatter: dict[str, Any] = {"()": "pythonjsonlogger.json.JsonFormatter",
                                     "fmt": "%(levelname)s %(name)s %(message)s", "timestamp": True,
                                     "rename_fields": {"levelname": "level", "name": "logger"},
                                     # uvicorn's copy of each message with terminal colour codes
                                     "reserved_attrs": [*RESERVED_ATTRS, "color_message"]}
    else:
        formatter = {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default",
                                 "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["default"], "level": level},
        "loggers": {name: {"handlers": [], "propagate": True, "level": level} for name in UVICORN_LOGGERS},
    }


def configure_logging(log_format: LogFormat = "text", level: str = "INFO") -> None:
    logging.config.dictConfig(logging_config(log_format, level))

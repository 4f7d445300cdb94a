"""docs/configuration.md's table of flags, written from `Settings` (server/config.py): one row per field,
its flag, environment variable, default and description, in the order `loraplex serve --help` lists them.

    python -m tests.docs.configuration           # print the table
    python -m tests.docs.configuration --write   # rewrite it in docs/configuration.md (make docs)

`tests/docs/test_configuration.py` fails when the file's table differs from this one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic.fields import FieldInfo

from server.cli import default_text, flag_of
from server.config import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
START, END = "<!-- settings-table -->", "<!-- /settings-table -->"
UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def shown_default(field: FieldInfo) -> str:
    if field.annotation is bool:
        return "on" if field.default else "off"
    text, home = default_text(field), str(Path.home()) + "/"
    if text.startswith(home):  # the cache folder: the same line on every machine
        text = "~/" + text[len(home):]
    if isinstance(field.default, int) and field.default >= 2**20:
        for size, unit in UNITS:
            if field.default % size == 0:
                return f"`{text}` ({field.default // size} {unit})"
    return text if text == "unset" else f"`{text}`"


def row(name: str, field: FieldInfo) -> str:
    flag = flag_of(name)
    flags = f"`{flag}`, `--no-{flag[2:]}`" if field.annotation is bool else f"`{flag}`"
    meaning = (field.description or "").replace("|", "\\|")
    return f"| {flags} | `LORAPLEX_{name.upper()}` | {shown_default(field)} | {meaning} |"


def table() -> str:
    lines = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    lines += [row(name, field) for name, field in Settings.model_fields.items()]
    return "\n".join(lines)


def with_table(text: str) -> str:
    """`text` (docs/configuration.md) with the part between the markers replaced by `table()`."""
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the table in docs/configuration.md")
    if parser.parse_args().write:
        DOC.write_text(with_table(DOC.read_text()))
        print(f"wrote {DOC}")
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())

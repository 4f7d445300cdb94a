"""docs/configuration.md lists every setting as `Settings` defines it (`make docs` rewrites the table)."""

from __future__ import annotations

from server.config import Settings
from tests.docs.configuration import DOC, END, START, table, with_table


def test_configuration_doc_matches_settings():
    text = DOC.read_text()
    assert START in text and END in text
    assert with_table(text) == text, "docs/configuration.md is out of date with server/config.py: run `make docs`"


def test_every_setting_has_a_row_and_a_description():
    rows = table().splitlines()[2:]
    assert len(rows) == len(Settings.model_fields)
    assert all(field.description for field in Settings.model_fields.values())

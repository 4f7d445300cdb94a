"""Every relative link of README.md and docs/*.md leads to a file of the checkout, and its `#anchor` to a
heading of that file (GitHub's heading ids)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text, fenced = [], False
    for line in path.read_text().splitlines():
        fenced = fenced != line.startswith("```")
        if not fenced and line.startswith("#"):
            text.append(slug(line.lstrip("#")))
    return set(text)


def links(doc: Path) -> list[str]:
    body = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    return [target for target in LINK.findall(body) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_links_resolve(doc: Path):
    for target in links(doc):
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: {target} leads nowhere"
        if anchor:
            assert anchor in anchors(path), f"{doc.name}: no heading #{anchor} in {path.name}"


def test_slug_is_githubs():
    assert slug(" Adapter contracts (`loraplex.json`)") == "adapter-contracts-loraplexjson"
    assert slug(" One prompt, four adapters and the base") == "one-prompt-four-adapters-and-the-base"

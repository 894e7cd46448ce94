"""What ``mkdocs build --strict`` refuses with current tools, checked without building: links to anchors that
no heading makes, and docstring arguments that are not in the signature (griffe's warning)."""

from __future__ import annotations

import inspect
import re
import unicodedata
from pathlib import Path

import pytest

import lightning_gradguard

DOCS = Path(__file__).resolve().parents[1] / "docs"
LINK = re.compile(r"\]\(([\w./-]+\.md)#([\w-]+)\)")


def _slug(heading: str) -> str:
    """Python-Markdown's ``toc`` slug: text without markup, lowercased, punctuation dropped, spaces to dashes."""
    text = re.sub(r"`|\*\*?|\[|\]\([^)]*\)", "", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.M)}
    explicit = set(re.findall(r"\{\s*#([\w-]+)", text))
    return headings | explicit


def test_every_link_to_an_anchor_of_another_page_finds_it() -> None:
    missing = []
    for page in sorted(DOCS.rglob("*.md")):
        for target, anchor in LINK.findall(page.read_text(encoding="utf-8")):
            linked = (page.parent / target).resolve()
            if linked.exists() and anchor not in _anchors(linked):
                missing.append(f"{page.relative_to(DOCS)} -> {target}#{anchor}")
    assert missing == []


@pytest.mark.parametrize("name", sorted(lightning_gradguard.__all__))
def test_documented_arguments_are_in_the_signature(name: str) -> None:
    obj = getattr(lightning_gradguard, name)
    if not inspect.isclass(obj) or not obj.__doc__ or "Args:" not in obj.__doc__:
        return
    params = inspect.signature(obj.__init__).parameters
    names = {
        ("**" if p.kind is p.VAR_KEYWORD else "*" if p.kind is p.VAR_POSITIONAL else "") + n for n, p in params.items()
    }
    block = obj.__doc__.split("Args:", 1)[1]
    block = re.split(r"\n\s*\n\s*[A-Z]\w+:\n", block, maxsplit=1)[0]
    documented = re.findall(r"^ {8}(\**\w+):", block, flags=re.M)
    assert documented and set(documented) <= names, set(documented) - names

"""MkDocs hooks (``hooks:`` in ``mkdocs.yml``): put ``examples/`` into the site from its own README.

``examples/README.md`` is the one source for the examples' documentation (it sits next to the scripts
it describes, and GitHub shows it there). The site serves it as ``examples/index.md`` together with the
example scripts, so its relative links (``quickstart.py``) resolve on the site as they do on GitHub.
Links from it back into ``docs/`` (``../docs/policies.md``) are rewritten to the site's pages.

The "Clipping policies" section of the nav gets one entry per policy: a link to the policy's section
of ``policies.md`` (one ``## `name`: ...`` heading per policy), so the policies keep one source page.
The anchors are computed with the same ``toc`` extension as the site and checked against the built page.

A page named in the nav that does not exist yet (docs are written in parallel) becomes a short
placeholder that says so, instead of breaking the ``--strict`` build of everyone else.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import markdown
from mkdocs.structure.files import File, Files
from mkdocs.structure.nav import Link, Navigation, Section

log = logging.getLogger("mkdocs.hooks.gradguard")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
_DOCS_LINK = re.compile(r"\]\(\.\./docs/")
_ROOT_LINK = re.compile(r"\[([^\]]+)\]\(\.\./(?!docs/)([^)#\s]+)[^)]*\)")


def _nav_paths(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav.split("#", 1)[0]] if nav.endswith(".md") or ".md#" in nav else []
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_paths(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_paths(value)]
    return []


def on_files(files: Files, config: Any) -> Files:
    readme = EXAMPLES / "README.md"
    if readme.is_file():
        files.append(File.generated(config, "examples/index.md", abs_src_path=str(readme)))
        for script in sorted(EXAMPLES.rglob("*")):
            if script.is_file() and script.suffix in (".py", ".yaml", ".yml") and "__pycache__" not in script.parts:
                uri = "examples/" + script.relative_to(EXAMPLES).as_posix()
                files.append(File.generated(config, uri, abs_src_path=str(script)))
    for path in _nav_paths(config["nav"]):
        if files.get_file_from_path(path) is None:
            log.info("placeholder for %s: the page is not written yet", path)
            content = f"# {Path(path).stem.replace('-', ' ').capitalize()}\n\nThis page has not been written yet.\n"
            files.append(File.generated(config, path, content=content))
    return files


POLICIES = "policies.md"
_POLICY_HEADING = re.compile(r"^## `(?P<name>[a-z_]+)`(?P<rest>.*)$", re.MULTILINE)
_anchors: dict[str, str] = {}  # policy section anchor -> nav title


def _policy_sections(path: Path) -> list[tuple[str, str]]:
    """(nav title, anchor) of every ``## `name`...`` heading of the policies page."""
    out = []
    for match in _POLICY_HEADING.finditer(path.read_text(encoding="utf-8")):
        md = markdown.Markdown(extensions=["toc"])
        md.convert(match.group(0))
        anchor = md.toc_tokens[0]["id"]  # type: ignore[attr-defined]
        title = match.group("name") + (" (default)" if "default" in match.group("rest") else "")
        out.append((title, anchor))
    return out


def on_nav(nav: Navigation, config: Any, files: Files) -> Navigation:
    policies = files.get_file_from_path(POLICIES)
    if policies is None or policies.abs_src_path is None:
        return nav
    for item in nav.items:
        if isinstance(item, Section) and any(getattr(c, "file", None) is policies for c in item.children):
            base = policies.url
            for title, anchor in _policy_sections(Path(policies.abs_src_path)):
                _anchors[anchor] = title
                link = Link(title, f"{base}#{anchor}")
                link.parent = item
                item.children.append(link)
    return nav


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri == POLICIES:
        ids = {tok.id for tok in _walk(page.toc)}
        for anchor, title in _anchors.items():
            if anchor not in ids:
                log.warning("nav entry %r points at #%s, which %s does not have", title, anchor, POLICIES)
    return html


def _walk(toc: Any) -> list[Any]:
    out = []
    for tok in toc:
        out.append(tok)
        out.extend(_walk(tok.children))
    return out


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    if page.file.src_uri != "examples/index.md":
        return markdown
    markdown = _DOCS_LINK.sub("](../", markdown)

    def _outside(match: re.Match[str]) -> str:
        # Files of the repository outside docs/ and examples/ are not on the site: name the path instead.
        text, target = match.group(1), match.group(2)
        return text if text.strip("`") == target else f"{text} (`{target}`)"

    return _ROOT_LINK.sub(_outside, markdown)

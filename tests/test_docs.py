"""The docs cannot drift from the code: their Python examples run (or at least compile), their images exist.

The site itself is built with ``mkdocs build --strict`` by ``python3 dev.py test``; these tests cover what
the build does not check: that the code shown to users still works.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(?P<lang>\w*)\n(?P<body>.*?)^```", re.MULTILINE | re.DOTALL)
IMAGE = re.compile(r"!\[[^\]]*\]\((?P<src>[^)\s]+)\)")
# Pages whose Python blocks are only compiled: fragments that need a model or data defined elsewhere.
COMPILED_ONLY = [
    "index.md",
    "concepts.md",
    "dashboard.md",
    "comparison.md",
    "benchmarks.md",
    "alerts.md",
    "plain-pytorch.md",
]


def python_blocks(path: Path) -> list[str]:
    return [m["body"] for m in FENCE.finditer(path.read_text(encoding="utf-8")) if m["lang"] == "python"]


def test_fence_parser_finds_blocks_in_order() -> None:
    text = "intro\n```python\na = 1\n```\n\n```bash\nls\n```\n```python\nb = a + 1\n```\n"
    found = [(m["lang"], m["body"]) for m in FENCE.finditer(text)]
    assert found == [("python", "a = 1\n"), ("bash", "ls\n"), ("python", "b = a + 1\n")]


def test_getting_started_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Python block of getting-started.md, executed in order in one namespace, as a reader would."""
    blocks = python_blocks(DOCS / "getting-started.md")
    assert len(blocks) >= 4, "getting-started.md lost its examples"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "getting_started"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"getting-started.md[block {i}]", "exec"), namespace)
    # The run really happened and logged where the page says it does.
    guard = namespace["guard"]
    assert guard.__class__.__name__ == "GradGuard"
    events = list((tmp_path / "runs" / "getting-started").rglob("events.out.tfevents.*"))
    assert events, "the example did not write TensorBoard event files under runs/getting-started"


def test_readme_usage_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in python_blocks(ROOT / "README.md") if "import" in b]
    assert blocks, "README.md has no self-contained Python usage block"
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        namespace: dict[str, object] = {"__name__": "readme"}
        exec(compile(block, f"README.md[block {i}]", "exec"), namespace)
        assert "trainer" in namespace or "guard" in namespace


@pytest.mark.parametrize("page", COMPILED_ONLY)
def test_python_blocks_compile(page: str) -> None:
    path = DOCS / page
    for i, block in enumerate(python_blocks(path)):
        compile(block, f"{page}[block {i}]", "exec")


def test_images_exist_and_are_small() -> None:
    referenced = set()
    for page in DOCS.glob("*.md"):
        for m in IMAGE.finditer(page.read_text(encoding="utf-8")):
            src = m["src"]
            if "://" in src:
                continue
            target = (page.parent / src).resolve()
            assert target.is_file(), f"{page.name} shows {src}, which does not exist"
            referenced.add(target)
    assert referenced, "no images found: the image pattern matches nothing in the docs"
    for target in referenced:
        assert target.stat().st_size < 300_000, f"{target.name} is {target.stat().st_size} bytes (keep < 300 KB)"


def test_plain_pytorch_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first block of plain-pytorch.md is a complete loop: it runs, clips, lowers the LR and logs."""
    block = python_blocks(DOCS / "plain-pytorch.md")[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "plain_pytorch"}
    with pytest.warns(UserWarning, match="GradGuard: LR guard"):
        exec(compile(block, "plain-pytorch.md[block 0]", "exec"), namespace)
    guard = namespace["guard"]
    assert guard.__class__.__name__ == "Guard"
    assert guard.clipped_steps > 0 and guard.lr_scale < 1.0 and guard.skipped_steps == 0  # type: ignore[attr-defined]
    assert list((tmp_path / "runs" / "plain").glob("events.out.tfevents.*"))

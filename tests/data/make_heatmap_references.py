"""Writes ``heatmap_*.png``: :func:`render_heatmap` output of the cases in ``tests/test_heatmap_pixels.py``
(``HEATMAP_CASES``), rendered by the code before ``render_heatmap`` was split into helpers (commit 69ced06).
Run: ``PYTHONPATH=$PWD python tests/data/make_heatmap_references.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent.parent))

from lightning_gradguard.outputs.heatmap import render_heatmap  # noqa: E402
from tests.test_heatmap_pixels import HEATMAP_CASES, write_png  # noqa: E402

if __name__ == "__main__":
    for name, (args, kwargs) in HEATMAP_CASES.items():
        write_png(render_heatmap(*args, **kwargs), HERE / f"heatmap_{name}.png")

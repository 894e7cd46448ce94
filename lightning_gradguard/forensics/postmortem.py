"""One picture per incident: the steps before it, what moved first, and what GradGuard concluded.

:func:`render_postmortem` draws an :class:`~lightning_gradguard.forensics.incidents.Incident` from the
record alone (its window holds every step before it, not only the log steps):

* top: the training loss and the global gradient norm (log scale) over the window, the incident's step marked;
* middle: the per-layer gradient norms over the same steps (log10, one row per layer, model order), the
  leading layers' names marked with their jump factor;
* bottom: the verdict in words: kind, step, epoch and batch, sample ids, LR and AMP scale before and at the
  incident, the replay verdict, and GradGuard's message (its remedy).

matplotlib is imported lazily (Agg canvas, no pyplot, no global state).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from lightning_gradguard.forensics.incidents import Incident

__all__ = ["describe", "render_postmortem"]


def describe(incident: Incident) -> list[str]:
    """The post-mortem in plain lines (the text report and the PNG's caption)."""
    lines = [incident.summary()]
    lr = ", ".join(f"{x:.3g}" for x in incident.lr) or "?"
    lr_before = ", ".join(f"{x:.3g}" for x in incident.lr_before) or "?"
    loss = "not measured" if incident.loss is None else f"{incident.loss:.4g}"
    lines.append(f"loss {loss} (median before {incident.loss_before:.4g}); LR {lr_before} -> {lr}")
    if incident.amp_scale is not None:
        lines.append(f"AMP loss scale {incident.amp_scale:.4g}")
    if incident.replay is not None:
        seconds = incident.replay_evidence.get("replay_seconds", math.nan)
        what = (
            "the same batch from the same weights did it again: a data or model-state problem (skip it on restart)"
            if incident.replay == "reproducible"
            else "the same batch from the same weights did not do it again: a transient fault"
        )
        lines.append(f"replay: {incident.replay} ({what}; {seconds:.3g} s)")
    if incident.message:
        lines.append(f"GradGuard: {incident.message}")
    return lines


def render_postmortem(incident: Incident, path: str | Path, width: int = 1000) -> Path:
    """Write the post-mortem PNG of ``incident`` to ``path``; returns the path.

    Raises:
        ImportError: matplotlib is missing (names what to install).
        ValueError: the incident has no window (written without history).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is a test dependency
        raise ImportError("the post-mortem PNG needs matplotlib: pip install matplotlib") from exc
    steps = list(incident.window_steps)
    if not steps:
        raise ValueError(f"incident at step {incident.step} has no window to draw (recorded without history)")
    rows = max(1, len(incident.window_layers))
    wrapped = "\n".join(textwrap.fill(line, width=int(width / 8.5)) for line in describe(incident))
    text_height = 30 + 13 * wrapped.count("\n")
    height = 330 + min(900, 16 * rows) + 60 + text_height
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 1, height_ratios=[300, min(900, 16 * rows) + 60, text_height], hspace=0.45)

    ax = fig.add_subplot(grid[0])
    norms = np.array([_finite_or_nan(v) for v in incident.window_norms], dtype=float)
    ax.semilogy(steps, np.where(norms > 0, norms, np.nan), color="tab:blue", label="global gradient norm")
    ax.set_ylabel("gradient norm")
    ax.axvline(incident.step, color="tab:red", linestyle="--", label=f"{incident.kind} (step {incident.step})")
    losses = np.array([_finite_or_nan(v) for v in incident.window_losses], dtype=float)
    if np.isfinite(losses).any():
        twin = ax.twinx()
        twin.plot(steps, losses, color="tab:orange", label="loss")
        twin.set_ylabel("loss")
        twin.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"GradGuard post-mortem: {incident.kind} at step {incident.step}")

    hm = fig.add_subplot(grid[1])
    if incident.window_layers:
        cells = np.array(
            [[_log10(v) for v in row] for row in incident.window_layer_norms],
            dtype=float,
        )
        masked = np.ma.masked_invalid(cells)
        image = hm.imshow(masked, aspect="auto", interpolation="nearest", cmap="viridis")
        image.cmap.set_bad("lightgrey")
        factors = {x.name: x.factor for x in incident.leading_layers}
        labels = [f"{name}  x{factors[name]:.3g}" if name in factors else name for name in incident.window_layers]
        hm.set_yticks(range(len(labels)))
        hm.set_yticklabels(labels, fontsize=7)
        for tick, name in zip(hm.get_yticklabels(), incident.window_layers, strict=True):
            if name in factors:
                tick.set_color("tab:red")
        ticks = np.linspace(0, len(steps) - 1, num=min(8, len(steps))).astype(int)
        hm.set_xticks(ticks)
        hm.set_xticklabels([str(steps[i]) for i in ticks], fontsize=8)
        hm.set_xlabel("optimizer step (last column: the incident)")
        fig.colorbar(image, ax=hm, label="log10 gradient L2 norm", fraction=0.03)
    else:
        hm.text(0.5, 0.5, "no per-layer history", ha="center", va="center")
        hm.set_axis_off()

    text = fig.add_subplot(grid[2])
    text.set_axis_off()
    text.text(0.0, 1.0, wrapped, va="top", ha="left", fontsize=8, family="monospace")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _finite_or_nan(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.nan


def _log10(value: float) -> float:
    return math.log10(value) if math.isfinite(value) and value > 0.0 else math.nan

"""TensorBoard-only outputs: the custom-scalars dashboard, raw histograms, text events and images.

Scalars go through every Lightning logger; what only TensorBoard understands goes through the
``SummaryWriter`` of the first :class:`~lightning.pytorch.loggers.TensorBoardLogger` attached to the
trainer. Both ``torch.utils.tensorboard`` and ``tensorboardX`` writers work. Text events go through an
:class:`EventLog`, which joins all events of one step into one entry (:func:`join_events`), because
TensorBoard's Text tab shows one entry per tag and step; ``gradguard report`` splits them again
(:func:`split_events`). The same log carries each event's JSON record under a second tag
(``event_records``), which is what the report reads. Lightning is imported only by :func:`find_writer`.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_gradguard.keys import namespace, tag

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

    from lightning_gradguard.measure.stats import HistogramData

__all__ = [
    "EVENT_SEPARATOR",
    "EventLog",
    "dashboard_layout",
    "find_writer",
    "join_events",
    "layer_norm_extremes",
    "split_events",
    "threshold_band",
    "write_histograms",
]

EVENT_SEPARATOR = "\n\n---\n\n"
"""Between two events of one step in a text entry (a markdown horizontal rule in the Text tab)."""


def find_writer(loggers: Iterable[Logger]) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoard logger, or ``None``."""
    from lightning.pytorch.loggers import TensorBoardLogger  # here: `gradguard report` starts without Lightning

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def dashboard_layout(optimizer_indices: Sequence[int]) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: three categories per optimizer, one question per card.

    TensorBoard draws a category's line charts first and its margin charts after them, two charts per
    row, so the categories are cut to put each band beside the line it is read with:

    * "GradGuard": **loss** | **norm within its threshold band**;
    * "GradGuard: layers": update-to-weight ratio, per-layer gradient norm, weight norm, per-layer norm
      extremes;
    * "GradGuard: LR, clipping, skipped steps": learning rate, LR guard scale, clipping, skipped steps
      and rollbacks, global norm between log steps.

    The cards:

    * **norm within its threshold band**: a margin chart, the pre-clip global norm drawn as a line
      inside a shaded band from the post-clip norm (lower) to the threshold (upper). While nothing is
      clipped the band's lower edge sits on the line; a clipped step pulls it below, and the gap
      between line and upper edge is the headroom left before clipping. TensorBoard refuses a margin
      chart whose three tags were not written at the same steps, and the threshold is absent during
      an uncapped warmup, so the chart reads the ``band/...`` copies of :func:`threshold_band`,
      written together and only while a threshold is in force.
    * **loss**: the training loss GradGuard carries (``loss``), to read a norm rise against.
    * **per-layer norm extremes**: a margin chart of the median layer norm between the smallest and
      the largest layer norm (``layer_norm_median`` within ``layer_norm_min`` .. ``layer_norm_max``).
    * **update-to-weight ratio (log10)** and **weight norm**: one line per layer.
    * **learning rate** and **LR guard scale**: each alone, so neither flattens the other.
    * **clipping**, **skipped steps and rollbacks** (counts), **global norm between log steps**
      (``global_norm`` with the interval's max and mean) and **per-layer gradient norm**.

    A torch ``SummaryWriter`` margin chart holds one series, so each band has its own card.

    Args:
        optimizer_indices: index in ``trainer.optimizers`` of every guarded optimizer.

    Returns:
        The dict ``SummaryWriter.add_custom_scalars`` takes: category -> chart title ->
        ``["Multiline", [regex, ...]]`` or ``["Margin", [value, lower, upper]]``.
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for idx in optimizer_indices:
        ns = namespace(idx)

        def t(name: str, idx: int = idx) -> str:
            # charts take regular expressions: anchor them, or `clipped` would also chart `clipped_total`
            return f"^{re.escape(tag(name, idx))}$"

        def each(prefix: str, ns: str = ns) -> str:
            return f"^{re.escape(ns)}/{prefix}/.*"

        title = "GradGuard" if idx == 0 else f"GradGuard (optimizer {idx})"
        # TensorBoard draws a category's multiline charts before its margin charts, two per row: each
        # category below holds the margin chart that must sit beside a given line chart.
        layout[title] = {
            # Margin series are exact tags, not regular expressions.
            "norm within its threshold band": [
                "Margin",
                [tag("band/global_norm", idx), tag("band/post_clip_norm", idx), tag("band/threshold", idx)],
            ],
            "loss": ["Multiline", [t("loss")]],
        }
        layout[f"{title}: layers"] = {
            "per-layer norm extremes": [
                "Margin",
                [tag("layer_norm_median", idx), tag("layer_norm_min", idx), tag("layer_norm_max", idx)],
            ],
            "update-to-weight ratio (log10)": ["Multiline", [each("update_ratio")]],
            "per-layer gradient norm": ["Multiline", [each("layer_norm")]],
            "weight norm": ["Multiline", [each("weight_norm")]],
        }
        layout[f"{title}: LR, clipping, skipped steps"] = {
            "learning rate": ["Multiline", [t("lr")]],
            "LR guard scale": ["Multiline", [t("lr_scale")]],
            "clipping": ["Multiline", [t("clip_rate"), t("clipped")]],
            "skipped steps and rollbacks": [
                "Multiline",
                [t("skipped"), t("skipped_total"), t("scaler_skipped"), t("rollbacks_total"), t("steps_lost")],
            ],
            "global gradient norm": [
                "Multiline",
                [t("global_norm"), t("global_norm_max"), t("global_norm_mean")],
            ],
        }
    return layout


def threshold_band(global_norm: float, post_clip_norm: float | None, threshold: float | None) -> dict[str, float]:
    """The three values of the "norm within its threshold band" card, all or none.

    A margin chart needs its value, lower and upper tags at the same steps; this returns the
    ``band/global_norm``, ``band/post_clip_norm`` and ``band/threshold`` values together when a
    threshold is in force and the norms are finite, else nothing.

    Args:
        global_norm: pre-clip global norm of the step.
        post_clip_norm: global norm after clipping (``None`` when clipping is off).
        threshold: the clip threshold in force (``None`` during an uncapped warmup or without clipping).

    Returns:
        Names relative to the namespace (pass them through :func:`~lightning_gradguard.keys.tag`).

    Example:

        >>> threshold_band(3.0, 2.0, 2.0)
        {'band/global_norm': 3.0, 'band/post_clip_norm': 2.0, 'band/threshold': 2.0}
        >>> threshold_band(3.0, 3.0, None)
        {}
    """
    if threshold is None or post_clip_norm is None:
        return {}
    values = (global_norm, post_clip_norm, threshold)
    if not all(math.isfinite(v) for v in values):
        return {}
    return dict(zip(("band/global_norm", "band/post_clip_norm", "band/threshold"), values, strict=True))


def layer_norm_extremes(layer_norms: Mapping[str, float]) -> dict[str, float]:
    """The three values of the "per-layer norm extremes" card, from the layer norms of one step.

    Non-finite norms are left out (the step's ``skipped`` count and the events report them); with no
    finite norm the result is empty.

    Args:
        layer_norms: layer name -> pre-clip L2 gradient norm.

    Returns:
        ``{"layer_norm_min": ..., "layer_norm_median": ..., "layer_norm_max": ...}`` (names relative
        to the namespace: pass them through :func:`~lightning_gradguard.keys.tag`).

    Example:

        >>> layer_norm_extremes({"a": 1.0, "b": 4.0, "c": 2.0, "d": float("nan")})
        {'layer_norm_min': 1.0, 'layer_norm_median': 2.0, 'layer_norm_max': 4.0}
    """
    finite = [v for v in layer_norms.values() if math.isfinite(v)]
    if not finite:
        return {}
    return {
        "layer_norm_min": min(finite),
        "layer_norm_median": statistics.median(finite),
        "layer_norm_max": max(finite),
    }


def write_histograms(writer: Any, optimizer_idx: int, step: int, histograms: Mapping[str, HistogramData]) -> None:
    """Write pre-binned histograms with ``add_histogram_raw`` (no tensor reaches the host)."""
    for layer, h in histograms.items():
        writer.add_histogram_raw(
            tag("hist/{layer}", optimizer_idx, layer),
            min=h.min,
            max=h.max,
            num=h.num,
            sum=h.sum,
            sum_squares=h.sum_squares,
            bucket_limits=h.bucket_limits,
            bucket_counts=h.bucket_counts,
            global_step=step,
        )


def join_events(texts: Sequence[str]) -> str:
    """All events of one step as one markdown text: the count, then each event, separated by rules.

    TensorBoard's Text tab shows one entry per tag and step (a second ``add_text`` at the same step
    replaces the first), so the events of a step must travel in one entry.

    Example:

        >>> join_events(["a", "b"]) == "**2 events**" + EVENT_SEPARATOR + "a" + EVENT_SEPARATOR + "b"
        True
        >>> join_events(["a"])
        'a'
    """
    if len(texts) == 1:
        return texts[0]
    return EVENT_SEPARATOR.join([f"**{len(texts)} events**", *texts])


def split_events(text: str) -> list[str]:
    """The events of a text entry written by :func:`join_events` (one entry: a list of one)."""
    parts = text.split(EVENT_SEPARATOR)
    if len(parts) > 1 and re.fullmatch(r"\*\*\d+ events\*\*", parts[0]):
        return parts[1:]
    return [text]


@dataclass
class EventLog:
    """Text events buffered per tag until their step is over, then written as one entry per step.

    :meth:`add` writes out a tag's pending events as soon as an event of a later step arrives, so at most
    one step per tag is held; :meth:`flush` writes everything pending (call it at the end of fit and
    before raising). Steps must not decrease per tag; an event for an earlier step than the pending one
    is joined to the pending entry rather than written out of order.

    Example:

        >>> class Writer:
        ...     def add_text(self, tag, text, step):
        ...         print(step, repr(text))
        >>> log = EventLog()
        >>> log.add("gradguard/events", 0, "a"); log.add("gradguard/events", 0, "b")
        >>> log.add("gradguard/events", 3, "c", writer=Writer())
        0 '**2 events**\\n\\n---\\n\\na\\n\\n---\\n\\nb'
        >>> log.flush(Writer())
        3 'c'
    """

    _pending: dict[str, tuple[int, list[str]]] = field(default_factory=dict)

    def add(self, name: str, step: int, text: str, writer: Any | None = None) -> None:
        """Buffer ``text`` for tag ``name`` at ``step``; an earlier pending step of ``name`` goes to ``writer``."""
        pending = self._pending.get(name)
        if pending is not None and step > pending[0]:
            if writer is not None:
                writer.add_text(name, join_events(pending[1]), pending[0])
            pending = None
        if pending is None:
            self._pending[name] = (step, [text])
        else:
            pending[1].append(text)

    def flush(self, writer: Any | None) -> None:
        """Write every pending step (one ``add_text`` per tag) and forget them."""
        pending, self._pending = self._pending, {}
        if writer is None:
            return
        for name, (step, texts) in pending.items():
            writer.add_text(name, join_events(texts), step)

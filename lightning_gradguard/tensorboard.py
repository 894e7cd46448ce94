"""TensorBoard-only outputs: the custom-scalars dashboard, raw histograms, text events and images.

Scalars go through every Lightning logger; what only TensorBoard understands goes through the
``SummaryWriter`` of the first :class:`~lightning.pytorch.loggers.TensorBoardLogger` attached to the
trainer. Both ``torch.utils.tensorboard`` and ``tensorboardX`` writers work. Text events go through an
:class:`EventLog`, which joins all events of one step into one entry (:func:`join_events`), because
TensorBoard's Text tab shows one entry per tag and step; ``gradguard report`` splits them again
(:func:`split_events`). Lightning is imported only by :func:`find_writer`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lightning_gradguard.keys import namespace, tag

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

    from lightning_gradguard.stats import HistogramData

__all__ = [
    "EVENT_SEPARATOR",
    "EventLog",
    "dashboard_layout",
    "find_writer",
    "join_events",
    "split_events",
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
    """Custom-scalars layout: one "GradGuard" category per optimizer.

    Charts: global norm (with the interval max/mean, threshold and post-clip norm), per-layer norms,
    clipping, skipped steps and the LR guard.
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for idx in optimizer_indices:
        ns = namespace(idx)

        def t(name: str, idx: int = idx) -> str:
            # charts take regular expressions: anchor them, or `clipped` would also chart `clipped_total`
            return f"^{re.escape(tag(name, idx))}$"

        title = "GradGuard" if idx == 0 else f"GradGuard (optimizer {idx})"
        layout[title] = {
            "global gradient norm": [
                "Multiline",
                [
                    t("global_norm"),
                    t("global_norm_max"),
                    t("global_norm_mean"),
                    t("threshold"),
                    t("post_clip_norm"),
                ],
            ],
            "per-layer gradient norm": ["Multiline", [f"^{re.escape(ns)}/layer_norm/.*"]],
            "clipping": ["Multiline", [t("clip_rate"), t("clipped")]],
            "skipped steps": ["Multiline", [t("skipped"), t("skipped_total"), t("scaler_skipped")]],
            "learning rate": ["Multiline", [t("lr_scale"), t("lr")]],
        }
    return layout


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

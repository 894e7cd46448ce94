"""TensorBoard-only outputs: the custom-scalars dashboard, raw histograms, text events and images.

Scalars go through every Lightning logger; what only TensorBoard understands goes through the
``SummaryWriter`` of the first :class:`~lightning.pytorch.loggers.TensorBoardLogger` attached to the
trainer. Both ``torch.utils.tensorboard`` and ``tensorboardX`` writers work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_gradguard.keys import namespace, tag
from lightning_gradguard.stats import HistogramData

__all__ = ["dashboard_layout", "find_writer", "write_histograms"]


def find_writer(loggers: Iterable[Logger]) -> Any | None:
    """The ``SummaryWriter`` of the first TensorBoard logger, or ``None``."""
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

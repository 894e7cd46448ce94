"""Every tag GradGuard writes, in one place.

The docs' logged-keys table (``docs/logged-keys.md``) is checked against :data:`KEYS` by the
test suite, and the report command reads event files through these names, so writer, reader and
docs cannot drift apart.

Tags of the first optimizer live under ``gradguard/``; those of optimizer ``i > 0`` (GANs, manual
optimization with several optimizers) under ``gradguard_opt{i}/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["KEYS", "Key", "log10_norm", "namespace", "tag"]

Kind = Literal["scalar", "histogram", "text", "image", "layout"]


@dataclass(frozen=True)
class Key:
    """One logged tag: ``name`` is relative to the namespace; ``{layer}`` stands for a layer name."""

    name: str
    kind: Kind
    meaning: str
    cadence: str


def namespace(optimizer_idx: int = 0) -> str:
    """Tag prefix of the optimizer with index ``optimizer_idx`` in ``trainer.optimizers``."""
    return "gradguard" if optimizer_idx == 0 else f"gradguard_opt{optimizer_idx}"


def tag(name: str, optimizer_idx: int = 0, layer: str | None = None) -> str:
    """Full tag for ``name`` (a :data:`KEYS` name), filling ``{layer}`` when given."""
    if layer is not None:
        name = name.replace("{layer}", layer)
    return f"{namespace(optimizer_idx)}/{name}"


def log10_norm(norm: float) -> float:
    """The heatmap cell of one layer norm: ``log10(norm)``; ``-inf`` for zero (drawn black), NaN otherwise.

    NaN (drawn grey) covers non-finite and missing norms, so a NaN gradient is never drawn as a dead layer.

    Example:

        >>> log10_norm(100.0), log10_norm(0.0), log10_norm(float("nan"))
        (2.0, -inf, nan)
    """
    if norm == 0.0:
        return -math.inf
    if math.isfinite(norm) and norm > 0:
        return math.log10(norm)
    return math.nan


LOG = "every log step (`log_every_n_steps`)"
HIST = "every `histogram_every_n_steps` optimizer steps"

KEYS: tuple[Key, ...] = (
    # monitoring (always on)
    Key("global_norm", "scalar", "pre-clip global L2 norm of all gradients of the optimizer, this step", LOG),
    Key("global_norm_max", "scalar", "largest pre-clip global norm of the steps since the last log step", LOG),
    Key(
        "global_norm_mean",
        "scalar",
        "mean pre-clip global norm of the finite steps since the last log step",
        LOG,
    ),
    Key("steps", "scalar", "optimizer steps since the last log step (this one included)", LOG),
    Key("layer_norm/{layer}", "scalar", "pre-clip L2 norm of the layer's gradients, this step", LOG),
    Key("layer_norm_min", "scalar", "smallest finite pre-clip layer gradient norm, this step", LOG),
    Key("layer_norm_median", "scalar", "median finite pre-clip layer gradient norm, this step", LOG),
    Key("layer_norm_max", "scalar", "largest finite pre-clip layer gradient norm, this step", LOG),
    Key(
        "loss",
        "scalar",
        "mean training loss of the optimizer step's micro-batches (the loss GradGuard carries), this step",
        LOG,
    ),
    Key("hist/{layer}", "histogram", "histogram of the layer's gradient values (built on the device)", HIST),
    # clipping
    Key("threshold", "scalar", "clip threshold in force this step (absent while warming up uncapped)", LOG),
    Key("post_clip_norm", "scalar", "global norm after clipping, this step", LOG),
    Key(
        "band/global_norm",
        "scalar",
        "copy of global_norm for the threshold-band chart, written only while a threshold is in force",
        LOG,
    ),
    Key(
        "band/post_clip_norm",
        "scalar",
        "copy of post_clip_norm for the threshold-band chart, written only while a threshold is in force",
        LOG,
    ),
    Key(
        "band/threshold", "scalar", "copy of threshold for the threshold-band chart (same steps as the other two)", LOG
    ),
    Key("clipped", "scalar", "1 if this step was clipped, else 0", LOG),
    Key("clip_rate", "scalar", "fraction of the finite steps since the last log step that were clipped", LOG),
    Key("clipped_total", "scalar", "clipped steps since the start of training", LOG),
    # non-finite gradients
    Key("skipped", "scalar", "steps skipped for non-finite gradients since the last log step", LOG),
    Key("skipped_total", "scalar", "steps skipped for non-finite gradients since the start of training", LOG),
    Key(
        "scaler_skipped",
        "scalar",
        "steps the AMP GradScaler skipped (inf/NaN at the current loss scale) since the last log step",
        LOG,
    ),
    # recovery
    Key("rollbacks_total", "scalar", "rollbacks to an earlier saved state since the start of training", LOG),
    Key(
        "steps_lost",
        "scalar",
        "optimizer steps whose work rollbacks discarded (step of the rollback minus step restored), in total",
        LOG,
    ),
    # update-to-weight ratio
    Key("weight_norm/{layer}", "scalar", "L2 norm of the layer's weights after the optimizer step", LOG),
    Key(
        "update_ratio/{layer}",
        "scalar",
        "log10 of the layer's update-to-weight ratio: L2 norm of the step's weight change over the weight norm",
        LOG,
    ),
    # LR guard
    Key("lr_scale", "scalar", "factor the LR guard applies on top of the scheduler's learning rate", LOG),
    Key("lr", "scalar", "effective learning rate of the first param group (scheduler LR x lr_scale)", LOG),
    # TensorBoard-only
    Key(
        "events",
        "text",
        "one entry per notable event: skipped step, LR reduction, diagnostic verdict, rollback",
        "on event",
    ),
    Key(
        "event_records",
        "text",
        "each event of `events` as one JSON record (kind, step, message, layers, evidence), read by `gradguard report`",
        "on event",
    ),
    Key("heatmap", "image", "layer x step image of log10 gradient L2 norm", "every `heatmap_every_n_steps` steps"),
)

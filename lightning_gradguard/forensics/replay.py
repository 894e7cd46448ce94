"""Replay attribution: run the incident's batch again from the same weights and see whether it does it again.

At the hook GradGuard decides in, the optimizer has not stepped yet: the weights are the ones the incident's
gradients came from. :func:`replay` keeps those gradients aside, runs the user's closure (forward and backward
of the same batch), measures the new gradients, puts the incident's gradients back (so the decision already
taken applies to exactly what it was taken on), and classifies:

* **reproducible**: the batch, with this state, does it again (a non-finite gradient is non-finite again; a
  spike comes back at least at ``REPRODUCED_SHARE`` of its norm, or of its loss for a loss spike): a data or
  model-state problem, worth skipping on a restart;
* **transient**: it does not (a one-off corruption: a bit flip, a flaky kernel, a race).

A replay costs one forward and backward pass and, under data parallelism, the collectives of that backward
plus one reduction of the new statistics, on incident steps only; every rank replays (the incident was
decided from reduced statistics, so every rank has it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["REPRODUCED_SHARE", "ReplayResult", "replay"]

#: A spike is reproduced when the replayed norm (or loss) is at least this share of the incident's.
REPRODUCED_SHARE = 0.5


@dataclass(frozen=True)
class ReplayResult:
    """What the replay found.

    Attributes:
        verdict: ``"reproducible"`` or ``"transient"``.
        norm: the replayed global gradient norm.
        loss: the replayed loss, when the closure returned one.
        seconds: the wall time of the replay.
        first_nonfinite: the first module whose forward output was non-finite in the replay (in the order the
            modules finished: the innermost that produced it), when a ``module`` was given and one was.
    """

    verdict: str
    norm: float
    loss: float | None
    seconds: float
    first_nonfinite: str | None = None

    def evidence(self) -> dict[str, float]:
        out: dict[str, float] = {"replay_norm": self.norm, "replay_seconds": self.seconds}
        if self.loss is not None:
            out["replay_loss"] = self.loss
        return out


def replay(
    params: Sequence[Tensor],
    closure: Callable[[], Tensor | float | None],
    measure: Callable[[], float],
    *,
    norm: float,
    loss: float | None = None,
    kind: str = "norm_spike",
    module: torch.nn.Module | None = None,
) -> ReplayResult:
    """Replay one step and classify the incident (see the module docstring).

    Args:
        params: the parameters whose gradients the closure writes (their gradients are restored after).
        closure: forward and backward of the incident's batch; returns the loss (or ``None``).
        measure: the global gradient norm of the current gradients (reduced across ranks if distributed).
        norm: the incident's global gradient norm.
        loss: the incident's loss.
        kind: the incident's kind; a ``"loss_spike"`` is judged on the loss, everything else on the norm.
        module: the model; its modules' forward outputs are watched during the replay for the first non-finite
            one (forward hooks, removed after).
    """
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    first: list[str] = []
    handles = []
    if module is not None:
        for name, sub in module.named_modules():
            handles.append(sub.register_forward_hook(_watch(name, first)))
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            value = closure()
        new_norm = float(measure())
        new_loss = (
            float(value.detach().float()) if isinstance(value, Tensor) else (None if value is None else float(value))
        )
    finally:
        for handle in handles:
            handle.remove()
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    seconds = time.perf_counter() - start
    if not math.isfinite(norm):
        reproduced = not math.isfinite(new_norm) or (new_loss is not None and not math.isfinite(new_loss))
    elif kind == "loss_spike" and loss is not None and new_loss is not None:
        reproduced = not math.isfinite(new_loss) or new_loss >= REPRODUCED_SHARE * loss
    else:
        reproduced = not math.isfinite(new_norm) or new_norm >= REPRODUCED_SHARE * norm
    verdict = "reproducible" if reproduced else "transient"
    return ReplayResult(verdict, new_norm, new_loss, seconds, first[0] if first else None)


def _watch(name: str, first: list[str]) -> Callable[..., None]:
    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        if first:
            return
        tensors = [output] if isinstance(output, Tensor) else [t for t in _flat(output) if isinstance(t, Tensor)]
        for t in tensors:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                first.append(name)
                return

    return hook


def _flat(value: object) -> list[object]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    return [value]

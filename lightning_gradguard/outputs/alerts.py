"""Alert records: a GradGuard event as a plain, JSON-ready dict for Slack, W&B alerts or a pager.

GradGuard reports every notable event (a skipped step, an LR reduction, a diagnostic verdict, a
rollback) as a ``GuardEvent(kind, step, message, layers=(), evidence={})`` to warnings, the TensorBoard
Text tab and, when given, the ``on_event`` hook. :func:`event_record` turns any object of that shape into
a dict of plain JSON types (non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"``, which
strict JSON cannot hold); :func:`event_json` into one line of JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["EventLike", "event_json", "event_record"]


class EventLike(Protocol):
    """The documented shape of a GradGuard event."""

    @property
    def kind(self) -> str: ...

    @property
    def step(self) -> int: ...

    @property
    def message(self) -> str: ...

    @property
    def layers(self) -> Sequence[str]: ...

    @property
    def evidence(self) -> Mapping[str, Any]: ...


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _plain(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def event_record(event: EventLike) -> dict[str, Any]:
    """``{"kind", "step", "message", "layers", "evidence"}`` of plain JSON types.

    Example:

        >>> from types import SimpleNamespace
        >>> e = SimpleNamespace(kind="skip", step=7, message="GradGuard: ...", layers=("fc1",),
        ...                     evidence={"global_norm": float("inf")})
        >>> event_record(e)
        {'kind': 'skip', 'step': 7, 'message': 'GradGuard: ...', 'layers': ['fc1'], 'evidence': {'global_norm': 'inf'}}
    """
    return {
        "kind": str(event.kind),
        "step": int(event.step),
        "message": str(event.message),
        "layers": [str(layer) for layer in event.layers],
        "evidence": _plain(dict(event.evidence)),
    }


def event_json(event: EventLike) -> str:
    """:func:`event_record` as one line of strict JSON (keys sorted)."""
    return json.dumps(event_record(event), sort_keys=True, allow_nan=False)

"""Incident records: what happened at a step GradGuard acted on or a spike, where it started, on which batch.

An :class:`IncidentRecorder` keeps references to the last ``window`` steps' host statistics (the per-layer
squared norms GradGuard already has on the host, the loss, the effective LRs): no copy, no device work and no
collective on a step without an incident. At an incident it ranks the layers by how far their own norm jumped
against their own recent median (the *leading layers*) and writes one :class:`Incident`.

Incidents are:

* every step GradGuard skipped, rolled back, cut the LR at, or stopped at (``RecoveryError``);
* a **norm spike**: a finite global gradient norm above ``norm_spike`` (10) times the median of the
  window's finite norms, once the window holds ``min_history`` (16) of them;
* a **loss spike**: a finite loss above ``loss_spike`` (5) times the median of the window's finite losses
  (same history rule); both ratios are scale-free.

Nothing here imports Lightning or torch.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_gradguard._checks import check_float, check_int

__all__ = [
    "INCIDENTS_FILE",
    "INCIDENT_KINDS",
    "Incident",
    "IncidentRecorder",
    "LeadingLayer",
    "read_incidents",
]

#: The file incidents are appended to, beside the run's event files.
INCIDENTS_FILE = "incidents.jsonl"

#: What an incident can be, by the action or the observation that made it one.
INCIDENT_KINDS = (
    "skipped",  # a step skipped for non-finite gradients or module buffers
    "nonfinite",  # non-finite gradients stepped through (on_nonfinite="warn" or monitor-only)
    "rollback",  # recovery restored a snapshot (or declined to, and said why)
    "lr_reduction",  # the LR guard lowered the LR
    "stopped",  # training stopped (NonFiniteGradientsError or RecoveryError)
    "norm_spike",  # the global gradient norm jumped against its recent median
    "loss_spike",  # the training loss jumped against its recent median
)

#: Steps between two recomputations of the spike limits (the medians of the window).
MEDIAN_EVERY = 8

#: Layers kept in an incident's window (the leading ones always, then evenly spaced ones in model order).
MAX_WINDOW_LAYERS = 48

#: Replay verdicts: the same batch from the same weights did it again, or did not.
REPLAY_VERDICTS = ("reproducible", "transient")


@dataclass(frozen=True)
class LeadingLayer:
    """A layer whose gradient norm jumped against its own recent history.

    Attributes:
        name: the layer.
        norm: its gradient norm at the incident (``nan``/``inf`` when non-finite).
        baseline: the median of its finite norms over the recorder's window (``nan`` without history).
        factor: ``norm / baseline`` (``inf`` for a non-finite norm or a zero baseline).
    """

    name: str
    norm: float
    baseline: float
    factor: float


@dataclass(frozen=True)
class Incident:
    """One incident, as written to ``incidents.jsonl`` and passed to ``on_event``.

    Attributes:
        kind: one of :data:`INCIDENT_KINDS`.
        step: the optimizer's own step index (GradGuard's count).
        global_step: the trainer's global step, or the step count of a plain loop.
        optimizer: the optimizer's index.
        epoch: the epoch, when the front-end knows it.
        batch_idx: the batch index within the epoch, when the front-end knows it.
        sample_ids: what the user's ``batch_ids`` callable returned for the batch, if given.
        global_norm: the pre-clip global gradient norm at the incident.
        norm_baseline: the median of the window's finite global norms (``nan`` without history).
        loss: the step's loss, if measured.
        loss_before: the median of the window's finite losses before the step (``nan`` without history).
        lr: the effective learning rates of the optimizer's param groups at the step.
        lr_before: the same, ``window`` steps earlier (or at the oldest step in the window).
        amp_scale: the AMP GradScaler's scale, if one is in use.
        leading_layers: the layers whose norms jumped most against their own history, largest first.
        message: GradGuard's message for the action at this step (empty for a spike it did not act on).
        replay: ``"reproducible"`` or ``"transient"`` after a replay of the batch from the same weights,
            ``None`` when not replayed.
        replay_evidence: the replayed norm and loss, and the seconds the replay took.
        window_steps: the optimizer steps of the window before the incident, then the incident's own step.
        window_norms: the global gradient norm at each of ``window_steps``.
        window_losses: the loss at each of ``window_steps`` (``nan`` where not measured).
        window_layers: the layers of ``window_layer_norms`` (at most ``MAX_WINDOW_LAYERS``, model order, the
            leading layers always among them).
        window_layer_norms: per layer of ``window_layers``, its gradient norm at each of ``window_steps``.
        origin: the layer whose forward output first went non-finite in the replay, when one did (it leads a
            non-finite incident: every layer's gradient is non-finite then, so the norms cannot say).
    """

    kind: str
    step: int
    global_step: int
    optimizer: int
    epoch: int | None
    batch_idx: int | None
    sample_ids: tuple[Any, ...] | None
    global_norm: float
    norm_baseline: float
    loss: float | None
    loss_before: float
    lr: tuple[float, ...]
    lr_before: tuple[float, ...]
    amp_scale: float | None
    leading_layers: tuple[LeadingLayer, ...]
    message: str = ""
    replay: str | None = None
    replay_evidence: Mapping[str, float] = field(default_factory=dict)
    window_steps: tuple[int, ...] = ()
    window_norms: tuple[float, ...] = ()
    window_losses: tuple[float, ...] = ()
    window_layers: tuple[str, ...] = ()
    window_layer_norms: tuple[tuple[float, ...], ...] = ()
    origin: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in INCIDENT_KINDS:
            raise ValueError(f"`kind` must be one of {', '.join(INCIDENT_KINDS)}, got {self.kind!r}")
        if self.replay is not None and self.replay not in REPLAY_VERDICTS:
            raise ValueError(f"`replay` must be one of {', '.join(REPLAY_VERDICTS)} or None, got {self.replay!r}")

    @property
    def leader(self) -> str | None:
        """The layer that led: where the replay's forward pass first went non-finite, else the largest jump."""
        if self.origin is not None:
            return self.origin
        return self.leading_layers[0].name if self.leading_layers else None

    def summary(self) -> str:
        """One line: kind, step, batch, leading layers with factors, replay verdict."""
        where = f"step {self.step}"
        if self.epoch is not None or self.batch_idx is not None:
            where += f" (epoch {self.epoch}, batch {self.batch_idx})"
        lead = ", ".join(f"{layer.name} x{_fmt(layer.factor)}" for layer in self.leading_layers) or "no layer jumped"
        norm = f"global norm {_fmt(self.global_norm)} (median {_fmt(self.norm_baseline)})"
        text = f"{self.kind} at {where}: {norm}; led by {lead}"
        if self.origin is not None:
            text += f"; the forward pass first went non-finite in {self.origin}"
        if self.sample_ids:
            text += f"; samples {list(self.sample_ids)[:8]}"
        if self.replay is not None:
            text += f"; replay: {self.replay}"
        return text

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        out: dict[str, Any] = _jsonable(asdict(self))
        return out

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Incident:
        """The inverse of :meth:`to_json`."""
        data = {k: _unjson(v) for k, v in record.items() if k in cls.__dataclass_fields__}
        data["leading_layers"] = tuple(LeadingLayer(**_unjson(x)) for x in record.get("leading_layers", ()))
        for key in ("lr", "lr_before", "window_steps", "window_norms", "window_losses", "window_layers"):
            data[key] = tuple(data.get(key) or ())
        data["window_layer_norms"] = tuple(tuple(row) for row in data.get("window_layer_norms") or ())
        if data.get("sample_ids") is not None:
            data["sample_ids"] = tuple(data["sample_ids"])
        return cls(**data)


class IncidentRecorder:
    """Turns steps into :class:`Incident` records, cheaply.

    Args:
        window: steps of history kept (references to the host statistics, no copies).
        norm_spike: a finite global norm above this multiple of the window's median is a norm spike.
        loss_spike: a finite loss above this multiple of the window's median loss is a loss spike.
        min_history: finite values needed in the window before a spike can be called.
        top_k: leading layers kept per incident.
        path: the ``incidents.jsonl`` file each incident is appended to (``None``: none written).
        batch_ids: ``batch -> sequence`` of sample identifiers, called only at an incident.
    """

    def __init__(
        self,
        window: int = 128,
        norm_spike: float = 10.0,
        loss_spike: float = 5.0,
        min_history: int = 16,
        top_k: int = 3,
        path: str | Path | None = None,
        batch_ids: Callable[[Any], Sequence[Any]] | None = None,
    ) -> None:
        window, min_history, top_k = (
            check_int("window", window, 1),
            check_int("min_history", min_history, 1),
            check_int("top_k", top_k, 1),
        )
        if min_history > window:
            raise ValueError(f"`min_history` ({min_history}) must not exceed `window` ({window})")
        norm_spike = check_float("norm_spike", norm_spike, 1.0, math.inf, lo_open=True, hi_open=True)
        loss_spike = check_float("loss_spike", loss_spike, 1.0, math.inf, lo_open=True, hi_open=True)
        if batch_ids is not None and not callable(batch_ids):
            raise TypeError(f"`batch_ids` must be a callable batch -> sequence of ids, got {type(batch_ids).__name__}")
        self.window, self.norm_spike, self.loss_spike = window, norm_spike, loss_spike
        self.min_history, self.top_k = min_history, top_k
        self.path = Path(path) if path is not None else None
        self.batch_ids = batch_ids
        self.incidents: list[Incident] = []
        self._sq: deque[Sequence[float]] = deque(maxlen=window)
        self._norms: deque[float] = deque(maxlen=window)
        self._losses: deque[float] = deque(maxlen=window)
        self._lrs: deque[tuple[float, ...]] = deque(maxlen=window)
        self._steps: deque[int] = deque(maxlen=window)
        self._window_losses: deque[float] = deque(maxlen=window)
        self._layers: Sequence[str] = ()
        self._limits: tuple[float | None, float | None] | None = None
        self._since_limits = 0

    # ------------------------------------------------------------------ per step
    def spike(self, global_norm: float, loss: float | None) -> str | None:
        """``"norm_spike"``, ``"loss_spike"`` or ``None`` for this step against the window (before :meth:`observe`).

        The medians are recomputed every ``MEDIAN_EVERY`` steps (a spike is a jump of ``norm_spike`` times, far
        beyond what the median moves in that many steps): two float comparisons on most steps.
        """
        early = len(self._norms) <= self.min_history + MEDIAN_EVERY  # until the history is there, every step
        if self._limits is None or self._since_limits >= MEDIAN_EVERY or early:
            self._limits = (self._limit(self._norms, self.norm_spike), self._limit(self._losses, self.loss_spike))
            self._since_limits = 0
        norm_limit, loss_limit = self._limits
        if norm_limit is not None and math.isfinite(global_norm) and global_norm > norm_limit:
            return "norm_spike"
        if loss_limit is not None and loss is not None and math.isfinite(loss) and loss > loss_limit:
            return "loss_spike"
        return None

    def _limit(self, values: deque[float], ratio: float) -> float | None:
        finite = [v for v in values if math.isfinite(v)]
        if len(finite) < self.min_history:
            return None
        median = statistics.median(finite)
        return ratio * median if median > 0.0 else None

    def observe(
        self,
        step: int,
        layers: Sequence[str],
        sq_norms: Sequence[float],
        global_norm: float,
        loss: float | None,
        lrs: Sequence[float],
    ) -> None:
        """Keep this step in the window (references only). Call after any :meth:`record` of the step."""
        if layers is not self._layers and list(layers) != list(self._layers):
            self._sq.clear()  # regrouped (a layer unfrozen): per-layer history restarts
            self._layers = layers
        self._since_limits += 1
        self._steps.append(step)
        self._sq.append(sq_norms)
        self._norms.append(global_norm)
        self._window_losses.append(math.nan if loss is None else loss)
        if loss is not None:
            self._losses.append(loss)
        self._lrs.append(tuple(lrs))

    # ------------------------------------------------------------------ at an incident
    def leading_layers(self, layers: Sequence[str], sq_norms: Sequence[float]) -> tuple[LeadingLayer, ...]:
        """The ``top_k`` layers whose norm is furthest above their own window median (factor > 1), largest first.

        A non-finite layer leads any finite one; among non-finite layers the model order is kept.
        """
        same = list(layers) == list(self._layers)
        found: list[tuple[float, int, LeadingLayer]] = []
        for i, (name, sq) in enumerate(zip(layers, sq_norms, strict=True)):
            norm = math.sqrt(sq) if sq >= 0.0 else sq
            history = [math.sqrt(row[i]) for row in self._sq if math.isfinite(row[i])] if same else []
            baseline = statistics.median(history) if history else math.nan
            if not math.isfinite(norm):
                factor = math.inf
            elif not history:
                continue
            elif baseline > 0.0:
                factor = norm / baseline
            else:
                factor = math.inf if norm > 0.0 else 1.0
            if factor > 1.0:
                rank = -math.inf if not math.isfinite(norm) else -factor
                found.append((rank, i, LeadingLayer(name, norm, baseline, factor)))
        found.sort(key=lambda x: (x[0], x[1]))
        return tuple(x[2] for x in found[: self.top_k])

    def record(
        self,
        kind: str,
        *,
        step: int,
        global_step: int,
        optimizer: int,
        layers: Sequence[str],
        sq_norms: Sequence[float],
        global_norm: float,
        loss: float | None,
        lrs: Sequence[float],
        amp_scale: float | None = None,
        epoch: int | None = None,
        batch_idx: int | None = None,
        batch: Any = None,
        message: str = "",
        replay: str | None = None,
        replay_evidence: Mapping[str, float] | None = None,
        origin: str | None = None,
    ) -> Incident:
        """Build the incident of this step (before :meth:`observe` of the step), keep it and append it to the file."""
        finite_norms = [v for v in self._norms if math.isfinite(v)]
        finite_losses = [v for v in self._losses if math.isfinite(v)]
        leading = self.leading_layers(layers, sq_norms)
        shown = _shown_layers(list(layers), {x.name for x in leading})
        same = list(layers) == list(self._layers)  # regrouped (a layer unfrozen) at this step: no per-layer history
        sample_ids = None
        if self.batch_ids is not None and batch is not None:
            sample_ids = tuple(plain_id(x) for x in self.batch_ids(batch))
        incident = Incident(
            kind=kind,
            step=int(step),
            global_step=int(global_step),
            optimizer=int(optimizer),
            epoch=epoch,
            batch_idx=batch_idx,
            sample_ids=sample_ids,
            global_norm=float(global_norm),
            norm_baseline=statistics.median(finite_norms) if finite_norms else math.nan,
            loss=loss,
            loss_before=statistics.median(finite_losses) if finite_losses else math.nan,
            lr=tuple(float(x) for x in lrs),
            lr_before=self._lrs[0] if self._lrs else tuple(float(x) for x in lrs),
            amp_scale=amp_scale,
            leading_layers=leading,
            message=message,
            replay=replay,
            replay_evidence=dict(replay_evidence or {}),
            origin=origin,
            window_steps=(*self._steps, int(step)),
            window_norms=(*self._norms, float(global_norm)),
            window_losses=(*self._window_losses, math.nan if loss is None else float(loss)),
            window_layers=tuple(layers[i] for i in shown),
            window_layer_norms=tuple(self._layer_row(i, sq_norms, same) for i in shown),
        )
        self.add(incident)
        return incident

    def _layer_row(self, i: int, sq_norms: Sequence[float], same: bool) -> tuple[float, ...]:
        """Layer ``i``'s norms over :attr:`window_steps` (``nan`` before a regrouping: no history)."""
        rows = self._sq if same else ()
        missing = len(self._steps) - len(rows)
        values = [math.nan] * missing + [_norm(row[i]) for row in rows]
        return (*values, _norm(sq_norms[i]))

    def add(self, incident: Incident) -> None:
        """Keep ``incident`` and append it to :attr:`path` (one JSON object per line)."""
        self.incidents.append(incident)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(incident.to_json(), sort_keys=True) + "\n")


def read_incidents(path: str | Path) -> list[Incident]:
    """The incidents of an ``incidents.jsonl`` file, in order.

    Raises:
        ValueError: a line is not an incident record (names the file and line).
    """
    path = Path(path)
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(Incident.from_json(json.loads(line)))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}:{number}: not an incident record ({exc}); the file may be truncated") from exc
    return out


def _norm(sq: float) -> float:
    return math.sqrt(sq) if sq >= 0.0 else sq


def _shown_layers(layers: list[str], leading: set[str]) -> list[int]:
    """Indices of at most ``MAX_WINDOW_LAYERS`` layers: the leading ones, then evenly spaced others, in model order."""
    if len(layers) <= MAX_WINDOW_LAYERS:
        return list(range(len(layers)))
    chosen = {i for i, name in enumerate(layers) if name in leading}
    others = [i for i in range(len(layers)) if i not in chosen]
    room = MAX_WINDOW_LAYERS - len(chosen)
    if room > 0:
        stride = len(others) / room
        chosen.update(others[int(k * stride)] for k in range(room))
    return sorted(chosen)


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)


def plain_id(value: Any) -> Any:
    """A sample id as a JSON type (tensors and numpy scalars via ``item()``)."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (ValueError, RuntimeError):
            pass
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _unjson(value: Any) -> Any:
    if value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, Mapping):
        return {k: _unjson(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unjson(v) for v in value]
    return value

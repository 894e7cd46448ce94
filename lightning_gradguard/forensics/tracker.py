"""The forensics of one front-end: per-optimizer incident recorders, replays and the skip list, driven by the step.

:class:`Forensics` is what :class:`~lightning_gradguard.step.OptimizerStep` calls at three points of an optimizer
step: :meth:`Forensics.listed` before deciding (a batch on the skip list is dropped), :meth:`Forensics.replay`
after deciding and before recovery (the weights are still the ones the incident's gradients came from), and
:meth:`Forensics.record` once the step's outcome is final. On a step without an incident it costs two float
comparisons and a few deque appends; no device work, no collective.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_gradguard.decide.engine import Engine, StepOutcome
from lightning_gradguard.events import GuardEvent
from lightning_gradguard.forensics.incidents import INCIDENTS_FILE, Incident, IncidentRecorder, plain_id
from lightning_gradguard.forensics.replay import ReplayResult, replay
from lightning_gradguard.forensics.skiplist import SkipEntry, SkipList
from lightning_gradguard.measure.distributed import reduce_stats

__all__ = ["SKIP_LIST_FILE", "BatchContext", "Forensics"]

#: The skip list written beside the logs.
SKIP_LIST_FILE = "skip_list.json"

# incident kinds a replay can classify: the gradients of this batch from these weights
_REPLAYABLE = ("skipped", "nonfinite", "norm_spike", "loss_spike", "stopped")


@dataclass(frozen=True)
class BatchContext:
    """What the front-end knows about the batch of this optimizer step.

    Attributes:
        epoch: the epoch, if known.
        batch_idx: the batch's index within the epoch, if known.
        batch: the batch itself (read by ``batch_ids`` at an incident only).
        closure: forward and backward of this batch from the current weights, returning the loss (a replay);
            ``None`` where the front-end cannot re-run the step.
        params: every parameter the closure writes gradients to (they are put back after a replay).
        module: the model, watched during a replay for the first module whose output goes non-finite.
        why_no_replay: why ``closure`` is ``None``, for the incident record.
    """

    epoch: int | None = None
    batch_idx: int | None = None
    batch: Any = None
    closure: Callable[[], Any] | None = None
    params: Sequence[Tensor] = ()
    module: torch.nn.Module | None = None
    why_no_replay: str = ""


class Forensics:
    """Incident records, replays and the skip list of one front-end.

    Args:
        replay: replay incident batches (costs one forward and backward pass per incident).
        batch_ids: ``batch -> sequence`` of sample identifiers, read at incidents.
        log_dir: where ``incidents.jsonl`` and ``skip_list.json`` are written (``None``: nothing written; on
            ranks other than zero the front-end passes ``None``).
        skip_entries: the skip list to honour (from a resumed run's state).
    """

    def __init__(
        self,
        replay: bool = False,
        batch_ids: Callable[[Any], Sequence[Any]] | None = None,
        log_dir: str | Path | None = None,
        skip_entries: Sequence[SkipEntry] = (),
    ) -> None:
        self.replay_enabled = replay
        self.batch_ids = batch_ids
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.skip_list = SkipList(None)
        self.skip_list.entries = list(skip_entries)
        self._recorders: dict[int, IncidentRecorder] = {}
        self._replays: dict[int, tuple[str, ReplayResult | None]] = {}  # engine index -> (kind, result)

    def set_log_dir(self, log_dir: str | Path | None) -> None:
        """Write from now on into ``log_dir`` (the run's log directory; ``None`` on ranks other than zero)."""
        self.log_dir = Path(log_dir) if log_dir is not None else None
        for recorder in self._recorders.values():
            recorder.path = self.log_dir / INCIDENTS_FILE if self.log_dir is not None else None
        self.skip_list.path = self.log_dir / SKIP_LIST_FILE if self.log_dir is not None else None

    @property
    def incidents(self) -> list[Incident]:
        """Every incident recorded so far, all optimizers, in order."""
        return sorted((i for r in self._recorders.values() for i in r.incidents), key=lambda i: i.global_step)

    def recorder(self, index: int) -> IncidentRecorder:
        found = self._recorders.get(index)
        if found is None:
            path = self.log_dir / INCIDENTS_FILE if self.log_dir is not None else None
            found = self._recorders[index] = IncidentRecorder(path=path, batch_ids=self.batch_ids)
        return found

    # ------------------------------------------------------------------ before deciding
    def listed(self, context: BatchContext | None) -> SkipEntry | None:
        """The skip-list entry of this batch, if it is listed: by its samples when ``batch_ids`` is given and the
        list names samples (robust to reordered or resumed data; ``batch_ids`` is then called every step), else
        by epoch and batch index."""
        entries = self.skip_list.entries
        if context is None or not entries:
            return None
        if self.batch_ids is not None and context.batch is not None and any(e.sample_ids for e in entries):
            ids = {plain_id(i) for i in self.batch_ids(context.batch)}
            for entry in entries:
                hit = ids.intersection(entry.sample_ids)
                if hit:
                    return replace(entry, reason=f"it holds {_ids_text(hit)} of the list; {entry.reason}")
            return None
        return self.skip_list.entry_for(context.epoch, context.batch_idx)

    # ------------------------------------------------------------------ after deciding, before recovery
    def replay(self, engine: Engine, outcome: StepOutcome, context: BatchContext | None) -> None:
        """Spot this step's spike, and replay its batch when it is an incident a replay can classify.

        Called on every rank (the outcome is decided from reduced statistics, so every rank replays together:
        the replay's backward and its one reduction are collectives).
        """
        recorder = self.recorder(engine.index)
        kind = None
        if not outcome.stats.finite:
            kind = "skipped" if outcome.skipped else "nonfinite"
        else:
            kind = recorder.spike(outcome.global_norm, outcome.loss)
        if kind is None:
            self._replays.pop(engine.index, None)
            return
        result = None
        if self.replay_enabled and context is not None and context.closure is not None and kind in _REPLAYABLE:
            params = list(context.params) or list(engine.stats.params)
            result = replay(
                params,
                context.closure,
                lambda: _global_norm(engine),
                norm=outcome.global_norm,
                loss=outcome.loss,
                kind=kind,
                module=context.module if not outcome.stats.finite else None,
            )
        self._replays[engine.index] = (kind, result)

    # ------------------------------------------------------------------ once the outcome is final
    def record(
        self,
        engine: Engine,
        outcome: StepOutcome,
        optimizer: torch.optim.Optimizer,
        *,
        global_step: int,
        stopped: bool,
        context: BatchContext | None,
        amp_scale: float | None,
    ) -> GuardEvent | None:
        """Record this step's incident, if it is one, and keep the step in the window; returns the event."""
        recorder = self.recorder(engine.index)
        stats = outcome.stats
        lrs = [float(group["lr"]) for group in optimizer.param_groups]
        spotted, result = self._replays.pop(engine.index, (None, None))
        kinds = {e.kind for e in outcome.events}
        kind = (
            "stopped"
            if stopped
            else "rollback"
            if "rollback" in kinds
            else "skipped"
            if outcome.skipped
            else "lr_reduction"
            if "lr_reduction" in kinds
            else spotted
        )
        event = None
        if kind is not None:
            message = "; ".join(e.message for e in outcome.events if e.kind in ("skipped", "rollback", "lr_reduction"))
            incident = recorder.record(
                kind,
                step=outcome.step,
                global_step=global_step,
                optimizer=engine.index,
                layers=stats.layers,
                sq_norms=stats.sq_norms,
                global_norm=outcome.global_norm,
                loss=outcome.loss,
                lrs=lrs,
                amp_scale=amp_scale,
                epoch=context.epoch if context is not None else None,
                batch_idx=context.batch_idx if context is not None else None,
                batch=context.batch if context is not None else None,
                message=message,
                replay=None if result is None else result.verdict,
                replay_evidence={} if result is None else result.evidence(),
                origin=_layer_of(result.first_nonfinite, stats.layers) if result is not None else None,
            )
            event = _event(incident, context)
            if incident.replay == "reproducible" and incident.batch_idx is not None:
                self.skip_list.add(
                    SkipEntry(
                        epoch=incident.epoch,
                        batch_idx=incident.batch_idx,
                        sample_ids=incident.sample_ids or (),
                        reason=f"{incident.kind} at step {incident.step}, reproducible",
                        step=incident.step,
                    )
                )
        recorder.observe(outcome.step, stats.layers, stats.sq_norms, outcome.global_norm, outcome.loss, lrs)
        return event

    def record_update(self, engine: Engine, events: Sequence[GuardEvent], global_step: int) -> GuardEvent | None:
        """An LR cut decided after ``optimizer.step()`` (the stall channel): its incident, from the last step."""
        cut = [e for e in events if e.kind == "lr_reduction"]
        last = engine.last
        if not cut or last is None:
            return None
        recorder = self.recorder(engine.index)
        incident = recorder.record(
            "lr_reduction",
            step=last.step,
            global_step=global_step,
            optimizer=engine.index,
            layers=last.stats.layers,
            sq_norms=last.stats.sq_norms,
            global_norm=last.global_norm,
            loss=last.loss,
            lrs=[],
            message="; ".join(e.message for e in cut),
        )
        return _event(incident, None)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"skip_list": [e.to_dict() for e in self.skip_list.entries]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # the saved list joins the one given (`skip_list=`): a checkpoint from before the incident holds none
        self.skip_list.merge(SkipEntry.from_dict(e) for e in state.get("skip_list") or [])


def skip_listed(engine: Engine, outcome: StepOutcome, entry: SkipEntry, context: BatchContext) -> StepOutcome:
    """``outcome`` turned into a skipped step: its batch is on the skip list (the gradients are dropped)."""
    text = (
        f"skipped optimizer step {outcome.step}: batch {context.batch_idx} of epoch {context.epoch} is on the skip "
        f"list ({entry.reason or 'listed'})"
    )
    event = GuardEvent("skipped", outcome.step, text, evidence={"skip_list": 1})
    if not outcome.skipped:
        engine.counters.skipped_total += 1
        engine.interval.skipped += 1
    return replace(outcome, skipped=True, clipped=False, coefficient=None, events=(*outcome.events, event))


def _event(incident: Incident, context: BatchContext | None) -> GuardEvent:
    evidence: dict[str, float | int | str] = {
        "incident": incident.kind,
        "record": json.dumps(incident.to_json(), sort_keys=True),
    }
    if incident.batch_idx is not None:
        evidence["batch_idx"] = incident.batch_idx
    if incident.epoch is not None:
        evidence["epoch"] = incident.epoch
    if incident.replay is not None:
        evidence["replay"] = incident.replay
    elif context is not None and context.why_no_replay:
        evidence["replay"] = f"not replayed: {context.why_no_replay}"
    layers = tuple(x.name for x in incident.leading_layers)
    return GuardEvent("incident", incident.step, f"incident: {incident.summary()}", layers, evidence)


def _ids_text(ids: set[Any]) -> str:
    """``sample 7`` or ``32 samples (288, 289, 290, ..., 319)``."""
    ordered = sorted(ids, key=lambda i: (str(type(i)), i))
    if len(ordered) == 1:
        return f"sample {ordered[0]}"
    shown = ", ".join(map(str, ordered[:3])) + (f", ..., {ordered[-1]}" if len(ordered) > 3 else "")
    return f"{len(ordered)} samples ({shown})"


def _layer_of(module: str | None, layers: Sequence[str]) -> str | None:
    """The first layer that is ``module`` or lies inside it (the root module ``""`` holds them all); the module's
    own name when it holds no layer (a parameter-free module such as an activation)."""
    if module is None:
        return None
    inside = f"{module}." if module else ""
    return next((layer for layer in layers if layer == module or layer.startswith(inside)), module or None)


def _global_norm(engine: Engine) -> float:
    """The global norm of the gradients now (one pass, one collective where distributed). Not ``Engine.measure``:
    that would overwrite the step's own module-buffer check, which recovery reads next."""
    vector = reduce_stats(engine.stats.squared_norms(extras=[]), engine.stats.sharded_layers)
    return engine.stats.read(vector, num_extras=0).global_norm

"""The read-only views the front-ends share: what was decided so far, from their engines and their recovery."""

from __future__ import annotations

from lightning_gradguard.decide.diagnostics import Verdict
from lightning_gradguard.decide.engine import Engine, StepOutcome
from lightning_gradguard.forensics.incidents import Incident
from lightning_gradguard.forensics.skiplist import SkipList
from lightning_gradguard.forensics.tracker import Forensics
from lightning_gradguard.recovery.rollback import Recovery


class GuardViews:
    """Views on a front-end's engines (one per optimizer) and recovery; the front-end says where they are."""

    def _engine_list(self) -> list[Engine]:
        """The engines, one per optimizer seen so far, in optimizer order."""
        raise NotImplementedError

    def _recovery_in_use(self) -> Recovery | None:
        """The recovery in use, or ``None`` when it is off."""
        raise NotImplementedError

    _forensics: Forensics | None = None

    def _first_engine(self) -> Engine | None:
        return next(iter(self._engine_list()), None)

    @property
    def threshold(self) -> float | None:
        """Clip threshold in force at the last step of the first optimizer (``None`` if not clipping)."""
        engine = self._first_engine()
        return engine.last.threshold if engine and engine.last else None

    @property
    def last_outcome(self) -> StepOutcome | None:
        """What was decided at the last step of the first optimizer (``None`` before the first step)."""
        engine = self._first_engine()
        return engine.last if engine else None

    @property
    def clipped_steps(self) -> int:
        """Steps clipped so far (all optimizers)."""
        return sum(engine.counters.clipped_total for engine in self._engine_list())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients so far (all optimizers)."""
        return sum(engine.counters.skipped_total for engine in self._engine_list())

    @property
    def verdicts(self) -> list[Verdict]:
        """Diagnostic verdicts reported so far (vanishing, exploding, dead, non-finite layers), in order."""
        pairs = [(v.step, e.index, v) for e in self._engine_list() for v in e.verdicts]  # each engine's order kept
        return [v for _, _, v in sorted(pairs, key=lambda p: (p[0], p[1]))]

    @property
    def lr_scale(self) -> float:
        """Factor the LR guard applies to the first optimizer's learning rates (1.0 when it never acted)."""
        engine = self._first_engine()
        return engine.lr_guard.lr_scale if engine and engine.lr_guard else 1.0

    @property
    def rollbacks_total(self) -> int:
        """Rollbacks to the last good snapshot so far (0 when recovery is off)."""
        recovery = self._recovery_in_use()
        return recovery.trigger.rollbacks_total if recovery is not None else 0

    @property
    def steps_lost(self) -> int:
        """Optimizer steps whose work the rollbacks discarded so far."""
        recovery = self._recovery_in_use()
        return recovery.trigger.steps_lost if recovery is not None else 0

    @property
    def incidents(self) -> list[Incident]:
        """The incidents recorded so far, all optimizers, in order (``docs/forensics.md``; empty with
        ``incidents=False``)."""
        return self._forensics.incidents if self._forensics is not None else []

    @property
    def skip_list(self) -> SkipList | None:
        """The batches to skip: the ``skip_list=`` given, a checkpoint's, and this run's reproducible incidents."""
        return self._forensics.skip_list if self._forensics is not None else None

"""What GradGuard has to say: one immutable record per event, whatever the front-end or the output.

Every text GradGuard emits (a skipped step, non-finite gradients stepped through, an LR reduction, a
diagnostic verdict, a setup notice, a mismatch in the saved state, the diagnostics summary) is a
:class:`GuardEvent`. The engine produces them; the
front-ends route them to ``rank_zero_warn`` / ``rank_zero_info``, TensorBoard text and any alerting.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["EVENT_KINDS", "GuardEvent", "OnEvent"]

#: Kinds of event and whether each is a warning (``True``) or information (``False``).
EVENT_KINDS: Mapping[str, bool] = MappingProxyType(
    {
        "skipped": False,  # a step skipped for non-finite gradients
        "nonfinite": True,  # non-finite gradients, stepped through (on_nonfinite="warn" or monitor-only)
        "lr_reduction": True,  # the LR guard lowered the learning rate
        "verdict": True,  # a diagnostic verdict (vanishing, exploding, dead, non-finite layer)
        "notice": False,  # a one-off setup notice (no TensorBoard logger, DeepSpeed, heatmap unavailable)
        "state": True,  # saved state that does not fully match (another version, configuration or model)
        "summary": False,  # the end-of-training diagnostics summary
        "rollback": True,  # recovery restored the last good snapshot and lowered the LR
        "incident": False,  # the story of an incident: which layer led, on which batch, whether it repeats
    }
)


@dataclass(frozen=True)
class GuardEvent:
    """One thing that happened, with the evidence behind it.

    Attributes:
        kind: one of :data:`EVENT_KINDS`.
        step: the optimizer step (of this optimizer) the event belongs to.
        message: plain-language text, without the ``"GradGuard: "`` prefix.
        layers: the layers concerned, if any.
        evidence: the numbers behind the event (norms, thresholds, scales), as primitives.
    """

    kind: str
    step: int
    message: str
    layers: tuple[str, ...] = ()
    evidence: Mapping[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"`kind` must be one of {', '.join(EVENT_KINDS)}, got {self.kind!r}")

    @property
    def is_warning(self) -> bool:
        """Whether the event is reported as a warning (else as information)."""
        return EVENT_KINDS[self.kind]

    @property
    def text(self) -> str:
        """The message as printed: ``"GradGuard: "`` + :attr:`message` (a summary: ``"GradGuard "`` + it)."""
        return f"GradGuard {self.message}" if self.kind == "summary" else f"GradGuard: {self.message}"


#: The ``on_event`` hook of every front-end: called with each :class:`GuardEvent`.
OnEvent = Callable[[GuardEvent], None]

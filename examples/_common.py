"""Helpers shared by the examples: quiet Lightning output and capture of GradGuard's messages."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

__all__ = ["GuardMessages", "capture_gradguard_messages", "quiet_lightning"]


def quiet_lightning() -> None:
    """Hide Lightning's banner lines and the data-loader worker hints; keep warnings that matter."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Checkpoint directory.*exists and is not empty.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


@dataclass
class GuardMessages:
    """What GradGuard said during a run: its warnings (verdicts, skips, LR reductions) and info lines."""

    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)

    @property
    def verdicts(self) -> list[str]:
        """Diagnostic verdicts (each ends with a remedy)."""
        return [m for m in self.warnings if "Remedy:" in m]

    @property
    def summary(self) -> str:
        """The end-of-fit diagnostics summary ("" if there was none)."""
        return next((m for m in self.infos if m.startswith("GradGuard diagnostics summary")), "")


class _Collect(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("GradGuard"):
            self.sink.append(message)


@contextmanager
def capture_gradguard_messages() -> Iterator[GuardMessages]:
    """Record GradGuard's rank-zero warnings and info messages (the public channels it reports on).

    Both are recorded instead of printed (the caller prints what it wants); Lightning's own
    rank-zero messages are not shown while capturing.
    """
    messages = GuardMessages()
    handler = _Collect(messages.infos)
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.warnings.extend(str(w.message) for w in caught if str(w.message).startswith("GradGuard"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate

"""Helpers shared by the examples: quiet Lightning output, capture of GradGuard's messages, and the
follow-up commands they print (which must run as printed, from the directory the user is in)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "GuardMessages",
    "capture_gradguard_messages",
    "one_thread_unless_set",
    "quiet_lightning",
    "report_command",
    "tensorboard_command",
]


def one_thread_unless_set() -> None:
    """Run torch's CPU ops on one thread unless ``OMP_NUM_THREADS`` says otherwise.

    The examples' models are tiny: a second intra-op thread does not speed them up, and on a machine
    busy with other work the threads wait for each other. Measured on a 2-core machine at load ~6-9:
    ``vanishing.py`` took 18 s wall (8 s CPU) on one thread and 237 s wall (104 s CPU) on two.
    Set in the environment too, so that spawned DDP ranks inherit it.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def _user_dir() -> Path:
    """The directory the user typed the command in (``dev.py`` runs the examples from the repository root,
    but the shell's ``PWD`` is inherited unchanged)."""
    pwd = os.environ.get("PWD")
    return Path(pwd) if pwd and Path(pwd).is_dir() else Path.cwd()


def _shown(path: Path) -> str:
    """``path`` as the user can type it: relative to their directory when inside it, else absolute."""
    path = Path(os.path.abspath(path))
    base = Path(os.path.abspath(_user_dir()))
    try:
        rel = path.relative_to(base)
    except ValueError:
        return shlex.quote(str(path))
    text = str(rel)
    if text == ".":
        return "."
    # a bare name would be looked up on PATH when it is a program: keep the ./ in front
    return shlex.quote(text if os.sep in text else f".{os.sep}{text}")


def _script(name: str) -> Path | None:
    """The console script ``name`` installed beside this interpreter (``.venv/bin/name``), if any."""
    candidate = Path(sys.executable).with_name(name)  # not resolved: the venv's bin, not the base Python's
    return candidate if candidate.exists() else None


def tensorboard_command(logdir: str | os.PathLike[str]) -> str:
    """A ``tensorboard --logdir`` command line that runs as printed (``.venv/bin/tensorboard``, not a bare name)."""
    script = _script("tensorboard")
    program = _shown(script) if script else f"{_shown(Path(sys.executable))} -m tensorboard.main"
    return f"{program} --logdir {_shown(Path(logdir))}"


def report_command(run_dir: str | os.PathLike[str], *options: str) -> str:
    """A ``gradguard report`` command line that runs as printed (the venv's script, or ``python -m``)."""
    script = _script("gradguard")
    program = _shown(script) if script else f"{_shown(Path(sys.executable))} -m lightning_gradguard"
    return " ".join([program, "report", _shown(Path(run_dir)), *map(shlex.quote, options)])


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

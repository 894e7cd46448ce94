"""Saved state: checkpoints written in the version-2 format load and continue with the decisions of the run
that never stopped; the state is plain data keyed by the callback's identity."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_gradguard import GradGuard, Guard
from tests.test_frontends import _model, _options, _plain_steps
from tests.test_resume import Model, N, _assert_same_run, _fit

DATA = Path(__file__).parent / "data"

#: The GradGuards of ``tests/data/v2_state_<name>_step6.ckpt``.
GUARDS: dict[str, Callable[[], GradGuard]] = {
    "default": lambda: GradGuard(),
    "rollback": lambda: GradGuard(rollback=True, snapshot_every_n_steps=2, log_every_n_steps=4),
    "percentile": lambda: GradGuard(clip="percentile", rollback=False, log_every_n_steps=4, histogram_every_n_steps=0),
}


def _lightning_model() -> L.LightningModule:
    L.seed_everything(0, verbose=False)
    return Model(spikes=(8, 10), scheduler=True)


def _plain_loop(steps: int) -> tuple[Guard, list[Any]]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    guard = Guard(model, optimizer, **_options())
    return guard, _plain_steps(model, optimizer, guard, range(steps))


@pytest.mark.parametrize("name", list(GUARDS))
def test_a_version_2_lightning_checkpoint_continues_with_the_uninterrupted_runs_decisions(
    tmp_path: Path, name: str
) -> None:
    fixture = DATA / f"v2_state_{name}_step6.ckpt"
    saved = torch.load(fixture, weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("GradGuard")]
    assert state["version"] == 2 and state["guards"]["0"]["counters"]["steps"] == 6
    straight = _fit(tmp_path / "straight", _lightning_model(), GUARDS[name](), N)
    resumed = _fit(tmp_path / "resumed", _lightning_model(), GUARDS[name](), N, ckpt_path=fixture)
    _assert_same_run(straight, resumed, 6)


def test_a_version_2_plain_guard_state_continues_with_the_uninterrupted_runs_decisions() -> None:
    saved = torch.load(DATA / "v2_state_loop_step8.pt", weights_only=True)
    assert saved["version"] == 2 and saved["guards"]["0"]["counters"]["steps"] == 8
    _, full = _plain_loop(16)
    first, _ = _plain_loop(8)
    guard = Guard(first._module, first.optimizer, **_options())
    first.close()
    guard.load_state_dict(copy.deepcopy(saved))
    rest = _plain_steps(guard._module, guard.optimizer, guard, range(8, 16))
    assert rest == full[8:]
    assert any(r[4] for r in full) and len({r[6] for r in full}) > 1  # clipping and an LR cut happen in the run

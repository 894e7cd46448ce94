"""Saved state: checkpoints written in the version-2 format load and continue with the decisions of the run
that never stopped; the state is plain data keyed by the callback's identity."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lightning_gradguard import GradGuard, GradMonitor, Guard, LRGuard
from lightning_gradguard.decide.lr_guard import LRGuardState
from lightning_gradguard.recovery.trigger import RollbackTrigger, TriggerState
from tests.test_frontends import _model, _options, _plain_steps
from tests.test_resume import Model, N, _assert_same_run, _fit

DATA = Path(__file__).parent / "data"

#: The GradGuards of ``tests/data/v2_state_<name>_step6.ckpt``.
GUARDS: dict[str, Callable[[], GradGuard]] = {
    # version 2 ran the diagnostics at log steps: the same cadence is given here as diagnose_every_n_steps
    "default": lambda: GradGuard(),
    "rollback": lambda: GradGuard(
        rollback=True, snapshot_every_n_steps=2, log_every_n_steps=4, diagnose_every_n_steps=4
    ),
    "percentile": lambda: GradGuard(
        clip="percentile", rollback=False, log_every_n_steps=4, histogram_every_n_steps=0, diagnose_every_n_steps=4
    ),
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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit(tmp_path / "resumed", _lightning_model(), GUARDS[name](), N, ckpt_path=fixture)
    # the state saved under the version-2 key (built from the configuration) is this GradGuard's, silently
    assert not [w for w in caught if "GradGuard state" in str(w.message)]
    _assert_same_run(straight, resumed, 6)
    guard = resumed[0].callbacks[0]
    assert isinstance(guard, GradGuard) and guard.state_dict()["version"] == 3


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


def test_the_state_key_is_the_callbacks_identity_not_its_configuration() -> None:
    assert GradGuard().state_key == GradGuard(clip="percentile", max_norm=2.0, group_by="param").state_key
    assert GradGuard().state_key == "GradGuard" and GradMonitor().state_key == "GradMonitor"
    named = GradGuard()
    named.name = "fold-b"
    assert named.state_key == "GradGuard[fold-b]"


def test_the_lr_guard_state_is_its_dataclass_as_plain_values_and_loads_back() -> None:
    guard = LRGuard(patience=3, cooldown=2)
    for step in range(40):
        guard.update(step=step, norm=1.0 + 0.1 * (step % 5), threshold=1.2, loss=2.0 - 0.01 * step)
    state = guard.state_dict()
    assert list(state) == [f.name for f in fields(LRGuardState)]
    assert all(isinstance(v, bool | int | float | list) or v is None for v in state.values())
    assert state["best_loss"] is not None and state["streak"] == [list(pair) for pair in guard._s.streak]
    again = LRGuard(patience=3, cooldown=2)
    again.load_state_dict({**state, "added_later": 1})  # a key LRGuardState does not declare is ignored
    assert again.state_dict() == state
    partial = LRGuard(patience=3)
    partial.load_state_dict({"lr_scale": 0.25})  # keys it lacks keep a fresh guard's values
    assert partial.lr_scale == 0.25 and partial.state_dict()["best_loss"] is None
    assert partial._s.best_loss == math.inf and partial._s.streak.maxlen == 3


def test_the_lr_guard_configuration_is_saved_as_a_dict() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, optimizer, **_options())
    config = guard.state_dict()["guards"]["0"]["lr_guard_config"]
    assert config == LRGuard(patience=3, cooldown=10).config() and config["patience"] == 3


def test_the_rollback_trigger_state_is_its_dataclass_as_plain_values_and_loads_back() -> None:
    trigger = RollbackTrigger(runaway_steps=3)
    for step in range(12):
        decision = trigger.update(step, loss=1.0 if step < 8 else 50.0, nonfinite=step == 5)
        if decision.rollback:
            trigger.record_rollback(decision, restored_to=4)
    state = trigger.state_dict()
    assert state["rollbacks_total"] == len(trigger.history) > 0
    again = RollbackTrigger(runaway_steps=3)
    again.load_state_dict({**state, "added_later": 1})
    assert again.state_dict() == state and again.level() == trigger.level()
    assert again._s.losses.maxlen == 200 and again._s.recent.maxlen == 3
    assert isinstance(again._s, TriggerState) and "runaway_min_margin=0.001" in repr(again)

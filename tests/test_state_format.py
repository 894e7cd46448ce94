"""The saved state format: version-2 checkpoints (the fixtures in ``tests/data``) load and resume.

The fixtures were computed on another machine: what they hold is checked exactly, the runs resumed from
them against runs computed here with the same decisions exactly and the same values within ``REL``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_gradguard import AutoPolicy, GradGuard, Guard, LRGuard
from tests.test_frontends import _model, _options, _plain_steps
from tests.test_resume import Model, N, StateAtStart, _fit, _logged, _same

DATA = Path(__file__).parent / "data"
#: Tolerance of values compared with a run computed on this machine: the fixtures were computed on another CPU,
#: and float results differ between CPUs (vectorised paths) from about the 7th significant digit.
REL, ABS = 1e-5, 1e-9


def gradguard_for_fixture() -> GradGuard:
    """The GradGuard of ``tests/data/v2_gradguard_step6.ckpt`` (every part of the state present), with the clip
    configuration it was saved with (an absolute 1.0 ceiling, which the default ``auto`` leaves off)."""
    return GradGuard(
        clip=AutoPolicy(warmup_steps=6, prior_norm=1.0, prior_ratio=None),
        log_every_n_steps=3,
        diagnose_every_n_steps=3,
        histogram_every_n_steps=0,
        rollback=True,
        snapshot_every_n_steps=2,
    )


def _fixture_options() -> dict[str, Any]:
    """``tests/test_frontends.py``'s options with the clip configuration ``v2_guard_step8.pt`` was saved with
    (``auto`` with an absolute 1.0 ceiling, which the default leaves off)."""
    options = {k: v for k, v in _options().items() if k != "max_norm"}
    return {**options, "clip": AutoPolicy(max_norm=1.0, prior_norm=1.0, prior_ratio=None)}


def _plain_loop(steps: int, guard_state: Any = None) -> tuple[Guard, list[Any]]:
    """The plain loop of ``tests/data/v2_guard_step8.pt``: ``steps`` steps, optionally from a saved state."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    guard = Guard(model, optimizer, **_fixture_options())
    return guard, _plain_steps(model, optimizer, guard, range(steps))


def _keys(tree: Any) -> list[str]:
    return [k for k, v in tree.items() for k in (k, *_keys(v))] if isinstance(tree, dict) else []


def _without(tree: Any, drop: set[str]) -> Any:
    return {k: _without(v, drop) for k, v in tree.items() if k not in drop} if isinstance(tree, dict) else tree


def _without_messages(tree: Any) -> Any:
    """Verdict messages quote the ratio to the first norm, which a version-2 checkpoint lacks."""
    if isinstance(tree, dict):
        return {k: _without_messages(v) for k, v in tree.items() if k != "message"}
    return tree


def _restored(saved: Any, now: Any) -> bool:
    """``now`` holds every key of ``saved`` with an equal value (dicts may hold more keys)."""
    if isinstance(saved, dict):
        return isinstance(now, dict) and all(k in now and _restored(v, now[k]) for k, v in saved.items())
    return _same(saved, now)


def _first_difference(saved: Any, now: Any, path: str = "") -> str | None:
    """Where ``now`` does not hold ``saved`` (for assertion messages)."""
    if isinstance(saved, dict):
        if not isinstance(now, dict):
            return path
        for k, v in saved.items():
            if k not in now:
                return f"{path}/{k} (missing)"
            found = _first_difference(v, now[k], f"{path}/{k}")
            if found:
                return found
        return None
    return None if _same(saved, now) else f"{path}: {saved!r} != {now!r}"


class TrainingStateAtStart(Callback):
    """The weights and optimizer state as the resumed run starts (after Lightning restored the checkpoint)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.optimizer: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights = copy.deepcopy(pl_module.state_dict())
        self.optimizer = copy.deepcopy(trainer.optimizers[0].state_dict())


def _close(a: Any, b: Any, rel: float = REL) -> bool:
    """Deep equality where floats and float tensors agree within ``rel`` (NaN equals NaN); ``rel=0``: exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if rel == 0:
            return a.dtype == b.dtype and torch.equal(a, b)
        return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=rel, atol=ABS, equal_nan=True)
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b if rel == 0 else a == pytest.approx(b, rel=rel, abs=ABS)
    return type(a) is type(b) and a == b


def _logged_numbers(trainer: L.Trainer, from_step: int) -> dict[int, dict[str, float]]:
    """The CSV file read back as numbers, from ``from_step`` on."""
    return {s: {k: float(v) for k, v in row.items()} for s, row in _logged(trainer).items() if s >= from_step}


def _decision_keys(logged: dict[int, dict[str, float]]) -> set[str]:
    """The logged keys that count or scale decisions: clipped and skipped steps, rollbacks, LR cuts, the LR."""
    names = {"clipped", "clipped_total", "skipped", "skipped_total", "rollbacks_total", "steps_lost", "lr_scale", "lr"}
    return {k for row in logged.values() for k in row if k.rsplit("/", 1)[-1] in names}


def test_a_version_2_checkpoint_restores_what_it_holds_and_resumes_with_the_uninterrupted_runs_decisions(
    tmp_path: Path,
) -> None:
    fixture = DATA / "v2_gradguard_step6.ckpt"
    saved = torch.load(fixture, weights_only=True)  # a version-2 checkpoint, no pickled classes
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("GradGuard")]
    assert state["version"] == 2 and state["guards"]["0"]["counters"]["steps"] == 6 and "recovery" in state
    L.seed_everything(0, verbose=False)
    init = Model(spikes=(10, 12), scheduler=True)
    straight = _fit(tmp_path / "straight", copy.deepcopy(init), gradguard_for_fixture(), N)
    at_start, training_at_start = StateAtStart(), TrainingStateAtStart()
    resumed = _fit(
        tmp_path / "resumed",
        copy.deepcopy(init),
        gradguard_for_fixture(),
        N,
        ckpt_path=fixture,
        extra=(at_start, training_at_start),
    )

    # What the file holds is restored bit for bit: the weights, the optimizer and every value the file holds
    # for GradGuard; keys it does not hold may be extra. The LR guard's configuration string is the current one
    # (it holds `stall_update_ratio`, which the version-2 string lacks; at its default the resume does not
    # report it as a difference: see the last test of this file).
    weights = training_at_start.weights
    assert _close(dict(weights), dict(saved["state_dict"]), rel=0)
    assert _close(training_at_start.optimizer["state"], saved["optimizer_states"][0]["state"], rel=0)
    assert training_at_start.optimizer["state"]  # (momentum buffers: SGD with momentum)
    (start,) = at_start.states.values()
    old_guard = _without(state["guards"]["0"], {"lr_guard_config"})
    assert _restored(old_guard, start["guards"]["0"]), _first_difference(old_guard, start["guards"]["0"])
    assert _restored(state["recovery"], start["recovery"]), _first_difference(state["recovery"], start["recovery"])
    assert start["guards"]["0"]["lr_guard_config"] == LRGuard().config()

    # Against the uninterrupted run computed here, whose first six steps may differ from the fixture's in the
    # last bits (float results depend on the CPU): the same decisions at every step, the same values within REL.
    (t_a, p_a), (t_b, p_b) = straight, resumed
    assert t_a.global_step == t_b.global_step == N and sorted(p_b.rows) == list(range(6, N))
    guard_a, guard_b = (next(cb for cb in t.callbacks if isinstance(cb, GradGuard)) for t in (t_a, t_b))  # type: ignore[attr-defined]
    assert guard_a.clipped_steps > 6  # the spikes after the resume point were clipped
    for step in range(6, N):  # (threshold, clipped steps so far, LR guard scale, scheduler LR)
        threshold_a, *decisions_a = p_a.rows[step]
        threshold_b, *decisions_b = p_b.rows[step]
        assert decisions_b == decisions_a, step
        assert _close(threshold_b, threshold_a), step
    logged_a, logged_b = _logged_numbers(t_a, 6), _logged_numbers(t_b, 6)
    assert logged_b.keys() == logged_a.keys() and any(s > 6 for s in logged_b)
    decisions = _decision_keys(logged_a)
    assert {"gradguard/clipped", "gradguard/lr_scale"} <= decisions
    for step in logged_a:
        assert logged_b[step].keys() == logged_a[step].keys(), step
        assert {k: v for k, v in logged_b[step].items() if k in decisions} == {
            k: v for k, v in logged_a[step].items() if k in decisions
        }, step
        assert _close(logged_b[step], logged_a[step]), step
    assert (guard_b.skipped_steps, guard_b.rollbacks_total, guard_b.lr_scale) == (
        guard_a.skipped_steps,
        guard_a.rollbacks_total,
        guard_a.lr_scale,
    )
    assert [g["lr"] for g in t_b.optimizers[0].param_groups] == [g["lr"] for g in t_a.optimizers[0].param_groups]
    w_a, w_b = t_a.lightning_module.state_dict(), t_b.lightning_module.state_dict()
    assert _close(dict(w_b), dict(w_a))
    # The whole state agrees too, except the keys a version-2 checkpoint does not hold: the run's first loss
    # and first per-layer norms, which the resumed run takes from its first step after the resume; the LR
    # guard's record of which recent steps were clipped and of their post-clip norms (its stall channel), which
    # refill within 25 steps; and the update-ratio references of layers that start at zero and the peak LR
    # each layer has had.
    later = {"first_loss", "first", "recent_clipped", "recent_applied_norms", "update_references", "update_lr_peaks"}
    assert not later & set(_keys(state["guards"]["0"]))
    final_a, final_b = (_without(guard.state_dict(), later) for guard in (guard_a, guard_b))
    assert _close(_without_messages(final_b), _without_messages(final_a)), _first_difference(
        _without_messages(final_b), _without_messages(final_a)
    )


def test_a_version_2_plain_guard_state_restores_what_it_holds_and_resumes_with_the_same_decisions() -> None:
    saved = torch.load(DATA / "v2_guard_step8.pt", weights_only=True)
    assert saved["version"] == 2 and saved["guards"]["0"]["counters"]["steps"] == 8
    _, full = _plain_loop(16)
    first, _ = _plain_loop(8)  # the same model and optimizer state as the fixture's run after 8 steps
    guard = Guard(first._module, first.optimizer, **_fixture_options())
    first.close()
    guard.load_state_dict(saved)
    restored = guard.state_dict()
    assert _restored(_without(saved["guards"]["0"], {"lr_guard_config"}), restored["guards"]["0"])
    assert guard.engine.counters.steps == 8 and guard.lr_scale == saved["guards"]["0"]["lr_guard"]["lr_scale"] < 1.0
    rest = _plain_steps(guard._module, guard.optimizer, guard, range(8, 16))
    # (step, global norm, threshold, clip coefficient, clipped, skipped, LR scale): the norms are computed here
    # in both runs, the threshold from a history the fixture's CPU computed, so it agrees within REL
    for record_full, record_rest in zip(full[8:], rest, strict=True):
        step, norm, threshold, coefficient, clipped, skipped, lr_scale = record_rest
        assert (step, norm, clipped, skipped, lr_scale) == (*record_full[:2], *record_full[4:])
        assert _close([threshold, coefficient], list(record_full[2:4])), step
    assert any(r[4] for r in rest) and len({r[6] for r in full}) > 1  # clipping and an LR cut happen in the run


def test_an_option_missing_from_the_checkpoint_is_no_configuration_difference_at_its_default() -> None:
    """A version-2 checkpoint's LR-guard configuration lacks ``stall_update_ratio``: resuming it with the
    default must not report a difference, resuming it with another value must."""
    from lightning_gradguard._state import config_differs, version_2_config

    old = version_2_config(
        "LRGuard(approach_ratio=0.9, patience=10, factor=0.5, cooldown=100, min_lr=0.0, max_reductions=None,"
        " rise_ratio=2.0, require_stalled_loss=True)"
    )
    assert old is not None and "stall_update_ratio" not in old
    default = LRGuard().config()
    assert default["stall_update_ratio"] == 0.005
    assert not config_differs(old, default, default)
    assert config_differs(old, LRGuard(stall_update_ratio=0.01).config(), default)
    assert config_differs(old, LRGuard(patience=5).config(), default)
    assert version_2_config("something else") is None

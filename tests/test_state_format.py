"""The saved state format: version-2 checkpoints written by the previous release load and resume exactly."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch

from lightning_gradguard import AutoPolicy, GradGuard, Guard, LRGuard
from tests.test_frontends import _model, _options, _plain_steps
from tests.test_resume import Model, N, StateAtStart, _assert_same_run, _fit, _same

DATA = Path(__file__).parent / "data"


def gradguard_for_fixture() -> GradGuard:
    """The GradGuard of ``tests/data/v2_gradguard_step6.ckpt`` (every part of the state present)."""
    return GradGuard(
        clip=AutoPolicy(warmup_steps=6),
        log_every_n_steps=3,
        histogram_every_n_steps=0,
        rollback=True,
        snapshot_every_n_steps=2,
    )


def _plain_loop(steps: int, guard_state: Any = None) -> tuple[Guard, list[Any]]:
    """The plain loop of ``tests/data/v2_guard_step8.pt``: ``steps`` steps, optionally from a saved state."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    guard = Guard(model, optimizer, **_options())
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
    """``now`` holds every key of ``saved`` with an equal value (dicts may have gained keys since)."""
    if isinstance(saved, dict):
        return isinstance(now, dict) and all(k in now and _restored(v, now[k]) for k, v in saved.items())
    return _same(saved, now)


def test_a_version_2_checkpoint_resumes_exactly_as_the_uninterrupted_run(tmp_path: Path) -> None:
    fixture = DATA / "v2_gradguard_step6.ckpt"
    saved = torch.load(fixture, weights_only=True)  # written by the previous release, no pickled classes
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("GradGuard")]
    assert state["version"] == 2 and state["guards"]["0"]["counters"]["steps"] == 6 and "recovery" in state
    L.seed_everything(0, verbose=False)
    init = Model(spikes=(10, 12), scheduler=True)
    straight = _fit(tmp_path / "straight", copy.deepcopy(init), gradguard_for_fixture(), N)
    at_start = StateAtStart()
    resumed = _fit(
        tmp_path / "resumed", copy.deepcopy(init), gradguard_for_fixture(), N, ckpt_path=fixture, extra=(at_start,)
    )
    (start,) = at_start.states.values()
    # Every value the old release saved is restored as saved; keys added since (later fields) may be extra. The
    # LR guard's configuration string is the current one (it has gained `stall_update_ratio` since, at its
    # default, which the resume does not report as a difference: see the last test of this file).
    old_guard = _without(state["guards"]["0"], {"lr_guard_config"})
    assert _restored(old_guard, start["guards"]["0"]) and _same(start["recovery"], state["recovery"])
    assert start["guards"]["0"]["lr_guard_config"] == repr(LRGuard())
    straight_guard = next(cb for cb in straight[0].callbacks if isinstance(cb, GradGuard))  # type: ignore[attr-defined]
    assert straight_guard.clipped_steps > 6  # the spikes after the resume point were clipped
    _assert_same_run(straight, resumed, 6, compare_state=False)
    # The whole state agrees too, except the run's first loss and first per-layer norms, references added
    # after version 2 (the blow-up rules of issue 11): a version-2 checkpoint does not hold them, so the
    # resumed run takes them from its first step after the resume; likewise the LR guard's record of which
    # recent steps were clipped and of their post-clip norms (its stall channel, added later still), which
    # refill within 25 steps. Decisions, logs and weights agree above.
    later = {"first_loss", "first", "recent_clipped", "recent_applied_norms"}
    assert not later & set(_keys(state["guards"]["0"]))
    final_a, final_b = (
        _without(next(cb for cb in t.callbacks if isinstance(cb, GradGuard)).state_dict(), later)  # type: ignore[attr-defined]
        for t in (straight[0], resumed[0])
    )
    assert _same(_without_messages(final_a), _without_messages(final_b))


def test_a_version_2_plain_guard_state_resumes_exactly() -> None:
    saved = torch.load(DATA / "v2_guard_step8.pt", weights_only=True)
    assert saved["version"] == 2 and saved["guards"]["0"]["counters"]["steps"] == 8
    _, full = _plain_loop(16)
    first, _ = _plain_loop(8)  # the same model and optimizer state as the fixture's run after 8 steps
    guard = Guard(first._module, first.optimizer, **_options())
    first.close()
    guard.load_state_dict(saved)
    assert guard.engine.counters.steps == 8 and guard.lr_scale == saved["guards"]["0"]["lr_guard"]["lr_scale"] < 1.0
    rest = _plain_steps(guard._module, guard.optimizer, guard, range(8, 16))
    assert repr(full[8:]) == repr(rest)


def test_an_option_added_since_the_checkpoint_is_no_configuration_difference_at_its_default() -> None:
    """A version-2 checkpoint's LR-guard configuration predates ``stall_update_ratio``: resuming it with the
    default must not report a difference, resuming it with another value must."""
    from lightning_gradguard.engine import _configs_differ

    old = (
        "LRGuard(approach_ratio=0.9, patience=10, factor=0.5, cooldown=100, min_lr=0.0, max_reductions=None,"
        " rise_ratio=2.0, require_stalled_loss=True)"
    )
    default = repr(LRGuard())
    assert "stall_update_ratio=0.005" in default
    assert not _configs_differ(old, default, default)
    assert _configs_differ(old, repr(LRGuard(stall_update_ratio=0.01)), default)
    assert _configs_differ(old, repr(LRGuard(patience=5)), default)
    assert _configs_differ(old, "something else", default)  # not of the Name(k=v) form: compared as text

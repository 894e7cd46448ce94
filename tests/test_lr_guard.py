"""LR guard core, without a Trainer: detection on synthetic norm streams, the action under every scheduler."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.decide.lr_guard import LRGuard, LRReduction
from lightning_gradguard.decide.policies import AutoPolicy, make_policy

POLICIES = ["auto", "fixed", "percentile", "zscore"]
SIGMAS = [0.1, 0.5, 1.0]

# Documented bounds (docs/lr-guard.md, "Measured detection latency", which gives the measured values): steps
# from the onset of the change to the first reduction, per noise level sigma of the log-norm.
STEP_CHANGE_BOUND = {0.1: 20, 0.5: 40, 1.0: 80}
RISE_BOUND = {0.1: 150, 0.5: 160, 1.0: 250}


# --------------------------------------------------------------------------- synthetic streams


def _lognormal(sigma: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def _fixed_max_norm(sigma: float) -> float:
    """A well-chosen fixed `max_norm` for a lognormal(0, sigma) stream: its 99th percentile (1% clipped)."""
    return math.exp(2.326 * sigma)


def _run(policy_name: str, sigma: float, norms: list[float], guard: LRGuard | None = None) -> list[LRReduction]:
    """Feed `norms` through a real clip policy and the guard, as GradGuard does; return the reductions.

    ``auto`` runs without its ceiling (``prior_ratio=None``): these streams carry no loss, and the ceiling's
    absolute prior (1.0, held for the first 80 steps) sits right at the level of a unit-scale stream, so every
    held step would approach it. In GradGuard the training loss gates the guard during that hold (0 LR
    reductions on every sane-LR cell of the outcomes benchmark); the properties here are those of the
    adaptive threshold.
    """
    if policy_name == "auto":
        policy: Any = AutoPolicy(prior_ratio=None)
    else:
        policy = make_policy(policy_name, _fixed_max_norm(sigma) if policy_name == "fixed" else None)
    guard = LRGuard() if guard is None else guard
    out = []
    for step, norm in enumerate(norms):
        threshold = policy.threshold()
        policy.observe(norm)
        r = guard.update(step=step, norm=norm, threshold=threshold, center=policy.center())
        if r is not None:
            out.append(r)
    return out


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"approach_ratio": 0.0}, ValueError, "`approach_ratio` must be in (0, 1], got 0.0"),
        ({"approach_ratio": 1.5}, ValueError, "`approach_ratio` must be in (0, 1], got 1.5"),
        ({"approach_ratio": math.nan}, ValueError, "`approach_ratio` must be in (0, 1], got nan"),
        ({"approach_ratio": "0.9"}, TypeError, "`approach_ratio` must be a float, got '0.9'"),
        ({"patience": 1}, ValueError, "`patience` must be an int >= 2, got 1"),
        ({"patience": 2.0}, TypeError, "`patience` must be an int >= 2, got 2.0"),
        ({"patience": True}, TypeError, "`patience` must be an int >= 2, got True"),
        ({"factor": 1.0}, ValueError, "`factor` must be in (0, 1), got 1.0"),
        ({"factor": 0}, ValueError, "`factor` must be in (0, 1), got 0"),
        ({"cooldown": -1}, ValueError, "`cooldown` must be an int >= 0, got -1"),
        ({"min_lr": -1e-3}, ValueError, "`min_lr` must be in [0, inf), got -0.001"),
        ({"min_lr": math.inf}, ValueError, "`min_lr` must be in [0, inf), got inf"),
        ({"max_reductions": 0}, ValueError, "`max_reductions` must be an int >= 1, got 0"),
        ({"rise_ratio": 1.0}, ValueError, "`rise_ratio` must be in (1, inf), got 1.0"),
        ({"rise_ratio": None, "max_reductions": None}, None, ""),
    ],
)
def test_validation(kwargs: dict[str, Any], exc: type[Exception] | None, fragment: str) -> None:
    if exc is None:
        LRGuard(**kwargs)
        return
    with pytest.raises(exc) as info:
        LRGuard(**kwargs)
    assert fragment in str(info.value)


def test_attach_checks() -> None:
    guard = LRGuard()
    with pytest.raises(TypeError, match=r"`optimizer` must be a torch\.optim\.Optimizer"):
        guard.attach("sgd")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="attach"):
        guard.effective_lrs()
    a = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    b = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert guard.attach(a) is guard and guard.attach(a) is guard
    with pytest.raises(RuntimeError, match="already attached"):
        guard.attach(b)
    guard.detach()
    guard.attach(b)
    assert guard.optimizer is b


# --------------------------------------------------------------------------- false positives


@pytest.mark.parametrize("policy", POLICIES)
def test_no_reduction_on_stationary_streams(policy: str) -> None:
    for i, sigma in enumerate(SIGMAS):
        reductions = _run(policy, sigma, _lognormal(sigma, 100_000, seed=100 + i))
        assert reductions == [], f"{policy} sigma={sigma}: {reductions[0].message()}"


@pytest.mark.parametrize("policy", POLICIES)
def test_no_reduction_on_spike_train(policy: str) -> None:
    for i, sigma in enumerate(SIGMAS):
        norms = _lognormal(sigma, 100_000, seed=200 + i)
        norms = [n * 100.0 if k % 50 == 49 else n for k, n in enumerate(norms)]
        reductions = _run(policy, sigma, norms)
        assert reductions == [], f"{policy} sigma={sigma}: {reductions[0].message()}"


# --------------------------------------------------------------------------- detection


def _latency(policy: str, sigma: float, change: Callable[[int], float], seed: int) -> int:
    onset = 3000
    norms = [n * change(k - onset) for k, n in enumerate(_lognormal(sigma, onset + 1000, seed))]
    reductions = _run(policy, sigma, norms, LRGuard(cooldown=10_000))
    assert reductions, f"{policy} sigma={sigma}: no reduction"
    assert reductions[0].step >= onset, f"fired before the change: {reductions[0].message()}"
    return reductions[0].step - onset


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_step_change_x5_is_detected(policy: str, sigma: float) -> None:
    for seed in range(3):
        latency = _latency(policy, sigma, lambda k: 5.0 if k >= 0 else 1.0, seed)
        assert latency <= STEP_CHANGE_BOUND[sigma]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_sustained_rise_is_detected(policy: str, sigma: float) -> None:
    for seed in range(3):
        latency = _latency(policy, sigma, lambda k: 1.01 ** max(k, 0), seed)
        assert latency <= RISE_BOUND[sigma]


def test_reduction_record_carries_the_evidence() -> None:
    guard = LRGuard(patience=3, rise_ratio=None)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    guard.attach(opt)
    assert guard.update(step=7, norm=0.5, threshold=1.0, center=0.2) is None  # 0.5 < 0.2 + 0.9 * 0.8
    for step in (8, 9):
        assert guard.update(step=step, norm=0.93, threshold=1.0, center=0.2) is None  # 0.93 >= 0.92
    r = guard.update(step=10, norm=2.0, threshold=1.0, center=0.2)
    assert r is not None
    assert (r.step, r.reason, r.lr_scale_before, r.lr_scale, r.num_reductions) == (
        10,
        "approach",
        1.0,
        0.5,
        1,
    )
    assert (r.approaching_steps, r.risen_steps, r.patience) == (3, 0, 3)
    assert r.recent_norms == (0.5, 0.93, 0.93, 2.0)
    assert r.old_lrs == (0.2,) and r.new_lrs == (0.1,)
    assert r.threshold == 1.0 and r.center == 0.2 and r.norm == 2.0
    text = str(r)
    assert text == r.message()
    for piece in ("step 10", "1 -> 0.5", "3 of the last 3 steps approached", "threshold 1", "0.2 -> 0.1"):
        assert piece in text


def test_approach_is_measured_on_the_headroom() -> None:
    # center 0.8, threshold 1.0: "within 0.9" means norm >= 0.98, not 0.9.
    guard = LRGuard(patience=2, rise_ratio=None)
    for step in range(5):
        assert guard.update(step=step, norm=0.95, threshold=1.0, center=0.8) is None
    assert guard.update(step=5, norm=0.985, threshold=1.0, center=0.8) is None
    assert guard.update(step=6, norm=0.99, threshold=1.0, center=0.8) is not None
    # no center (fixed policy): norm >= 0.9 * threshold
    guard = LRGuard(patience=2, rise_ratio=None)
    assert guard.update(step=0, norm=0.9, threshold=1.0) is None
    assert guard.update(step=1, norm=0.9, threshold=1.0) is not None
    # no threshold (policy warming up without a cap): never approaching
    guard = LRGuard(patience=2, rise_ratio=None)
    assert all(guard.update(step=s, norm=1e9, threshold=None) is None for s in range(20))


def test_rise_channel_can_be_disabled() -> None:
    norms = [1.0] * 100 + [3.0] * 100
    with_rise = LRGuard()
    without = LRGuard(rise_ratio=None)
    fired = [s for s, n in enumerate(norms) if with_rise.update(step=s, norm=n, threshold=None)]
    assert all(without.update(step=s, norm=n, threshold=None) is None for s, n in enumerate(norms))
    # level = median of 31: exceeds 2x the reference once 16 of the 31 are 3.0 (step 115); 10 in a row -> 124
    assert fired == [124]


# --------------------------------------------------------------------------- cooldown, min_lr, max_reductions


def _press(guard: LRGuard, steps: range) -> list[int]:
    return [s for s in steps if guard.update(step=s, norm=1.0, threshold=1.0) is not None]


def test_cooldown_by_hand() -> None:
    guard = LRGuard(patience=2, cooldown=3, rise_ratio=None)
    # reduce at 1; steps 2, 3, 4 cool down; 5, 6 press again -> reduce at 6; 7-9 cool; 10, 11 -> 11
    assert _press(guard, range(12)) == [1, 6, 11]
    assert guard.lr_scale == 0.125 and guard.num_reductions == 3
    # a calm step breaks the streak
    guard = LRGuard(patience=3, cooldown=0, rise_ratio=None)
    assert guard.update(step=0, norm=1.0, threshold=1.0) is None
    assert guard.update(step=1, norm=1.0, threshold=1.0) is None
    assert guard.update(step=2, norm=0.1, threshold=1.0) is None
    assert _press(guard, range(3, 9)) == [5, 8]


def test_max_reductions_by_hand() -> None:
    guard = LRGuard(patience=2, cooldown=0, max_reductions=2, factor=0.1, rise_ratio=None)
    assert _press(guard, range(20)) == [1, 3]
    assert guard.lr_scale == pytest.approx(0.01) and guard.num_reductions == 2


def test_min_lr_by_hand() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.1}], lr=1.0)
    guard = LRGuard(patience=2, cooldown=0, min_lr=0.3, rise_ratio=None).attach(opt)
    seen: list[list[float]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]) or None)
    r = [guard.update(step=s, norm=1.0, threshold=1.0) for s in range(2)][-1]
    assert r is not None and r.old_lrs == (1.0, 0.1) and r.new_lrs == (0.5, 0.1)
    opt.step()
    # group 1's own LR (0.1) is below min_lr: it keeps it
    assert seen[-1] == [0.5, 0.1]
    r = [guard.update(step=s, norm=1.0, threshold=1.0) for s in range(2, 4)][-1]
    assert r is not None and r.new_lrs == (0.3, 0.1) and guard.lr_scale == 0.25
    opt.step()
    assert seen[-1] == [0.3, 0.1]
    # every group sits at its floor: nothing left to reduce, no reduction counted
    assert [guard.update(step=s, norm=1.0, threshold=1.0) for s in range(4, 10)] == [None] * 6
    assert guard.num_reductions == 2 and guard.lr_scale == 0.25
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.1]


# --------------------------------------------------------------------------- state


def test_state_dict_round_trip_resumes_identically() -> None:
    norms = _lognormal(0.3, 3000, seed=7)
    norms = [n * (1.02 ** max(0, k - 1000) if k < 1400 else 1.02**400) for k, n in enumerate(norms)]
    policy_a = make_policy("zscore", None)
    guard_a = LRGuard(cooldown=50)
    events_a: list[tuple[int, float]] = []
    events_b: list[tuple[int, float]] = []

    def feed(policy: Any, guard: LRGuard, ks: range, events: list[tuple[int, float]]) -> None:
        for k in ks:
            thr = policy.threshold()
            policy.observe(norms[k])
            r = guard.update(step=k, norm=norms[k], threshold=thr, center=policy.center())
            if r is not None:
                events.append((k, r.lr_scale))

    feed(policy_a, guard_a, range(1100), events_a)
    state = json.loads(json.dumps(guard_a.state_dict()))  # primitives only
    policy_b = make_policy("zscore", None)
    policy_b.load_state_dict(policy_a.state_dict())
    guard_b = LRGuard(cooldown=50)
    guard_b.load_state_dict(state)
    assert guard_b.state_dict() == guard_a.state_dict()
    events_b[:] = events_a
    feed(policy_a, guard_a, range(1100, 3000), events_a)
    feed(policy_b, guard_b, range(1100, 3000), events_b)
    assert len(events_a) >= 2
    assert events_a == events_b
    assert guard_b.state_dict() == guard_a.state_dict()
    # missing keys fall back to a fresh guard's values
    fresh = LRGuard()
    fresh.load_state_dict({"lr_scale": 0.25})
    assert fresh.lr_scale == 0.25 and fresh.num_reductions == 0


@settings(max_examples=40, deadline=None)
@given(
    norms=st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=200),
    thr=st.floats(min_value=1e-3, max_value=1e3),
    split=st.integers(min_value=0, max_value=200),
)
def test_state_dict_round_trip_any_stream(norms: list[float], thr: float, split: int) -> None:
    a = LRGuard(patience=2, cooldown=3)
    out_a = [a.update(step=k, norm=n, threshold=thr) is not None for k, n in enumerate(norms)]
    b = LRGuard(patience=2, cooldown=3)
    c = LRGuard(patience=2, cooldown=3)
    out_b = [b.update(step=k, norm=n, threshold=thr) is not None for k, n in enumerate(norms[:split])]
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    out_b += [c.update(step=k, norm=n, threshold=thr) is not None for k, n in enumerate(norms[split:])]
    assert out_a == out_b
    assert a.state_dict() == c.state_dict()
    assert 0.0 < a.lr_scale <= 1.0 and a.lr_scale == 0.5**a.num_reductions


# --------------------------------------------------------------------------- schedulers


def _step_lr(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5)


def _multistep(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.MultiStepLR(o, milestones=[10, 25, 40], gamma=0.3)


def _cosine(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30, eta_min=1e-4)


def _warmup(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 12) * 0.97**s)


def _onecycle(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=[0.2, 0.02], total_steps=61)


def _plateau(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=2)


SCHEDULERS = {
    "StepLR": _step_lr,
    "MultiStepLR": _multistep,
    "CosineAnnealingLR": _cosine,
    "LambdaLR-warmup": _warmup,
    "OneCycleLR": _onecycle,
    "ReduceLROnPlateau": _plateau,
}

PRESS_AT = {9, 10, 31, 32}  # patience 2, cooldown 0: reductions at steps 10 and 32
SKIPPED = {20, 45}  # steps where a GradScaler would skip optimizer.step


def _train(
    make_sched: Callable[[torch.optim.Optimizer], Any], every: int, guarded: bool
) -> Iterator[tuple[int, float, list[float], list[float]]]:
    """Plain loop; yields (step, lr_scale, LRs seen inside optimizer.step, group LRs after the scheduler)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[1].parameters(), "lr": 0.01}],
        lr=0.1,
        momentum=0.9,
    )
    guard = LRGuard(patience=2, cooldown=0, rise_ratio=None)
    if guarded:
        guard.attach(opt)
    seen: list[list[float]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([float(g["lr"]) for g in o.param_groups]) or None)
    sched = make_sched(opt)
    x = torch.randn(8, 4)
    for step in range(60):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        guard.update(step=step, norm=1.0 if step in PRESS_AT else 0.1, threshold=1.0)
        seen.clear()
        if step not in SKIPPED:
            opt.step()
        if (step + 1) % every == 0:
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(1.0)  # a metric that never improves: the scheduler halves the LR every 3 calls
            else:
                sched.step()
        yield step, guard.lr_scale, (seen[0] if seen else []), [float(g["lr"]) for g in opt.param_groups]


@pytest.mark.parametrize("every", [1, 5], ids=["interval-step", "interval-epoch"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_effective_lr_is_scale_times_scheduler_lr(name: str, every: int) -> None:
    ref = list(_train(SCHEDULERS[name], every, guarded=False))
    run = list(_train(SCHEDULERS[name], every, guarded=True))
    scales = {1.0}
    for (step, scale, seen, after), (_, _, ref_seen, ref_after) in zip(run, ref, strict=True):
        # outside step, the groups hold the scheduler's own LRs, identical to the unguarded run
        assert after == ref_after, f"step {step}"
        if step in SKIPPED:
            assert seen == [] and ref_seen == []
            continue
        expected_scale = 1.0 if step < 10 else 0.5 if step < 32 else 0.25
        assert scale == expected_scale
        scales.add(scale)
        assert seen == pytest.approx([scale * lr for lr in ref_seen], rel=1e-12), f"step {step}"
        # group ratio kept
        assert seen[0] / seen[1] == pytest.approx(ref_seen[0] / ref_seen[1], rel=1e-12)
    assert scales == {1.0, 0.5, 0.25}
    # the schedule itself moved (otherwise the test would prove little)
    assert len({tuple(r[3]) for r in ref}) >= 2


def test_tensor_lr() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    lr_obj = opt.param_groups[0]["lr"]
    guard = LRGuard(patience=2, cooldown=0, min_lr=0.0004, rise_ratio=None).attach(opt)
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(float(o.param_groups[0]["lr"])) or None)
    own: list[float] = []
    for step in range(6):
        guard.update(step=step, norm=1.0, threshold=1.0)
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
        own.append(float(opt.param_groups[0]["lr"]))
    assert opt.param_groups[0]["lr"] is lr_obj
    assert guard.lr_scale == 0.25 and guard.num_reductions == 2
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    # own LR in step: 0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4; scale 1, 0.5, 0.5, 0.25, 0.25, 0.25 (reductions
    # at 1 and 3; the one due at 5 is skipped: the group already sits below the floor)
    # floor 4e-4 applies to 0.001 * 0.25; 1e-4 is below the floor already and is kept
    assert own == pytest.approx([0.01, 0.001, 0.001, 1e-4, 1e-4, 1e-5])
    assert seen == pytest.approx([0.01, 0.005, 0.0005, 0.0004, 1e-4, 1e-4])


def test_reduction_inside_step_applies_to_that_step() -> None:
    """Lightning runs the closure (and so `GradGuard.update`) inside `optimizer.step`."""

    used: list[float] = []

    class Recording(torch.optim.Optimizer):
        """Plain SGD that records the LR it actually applies, after running the closure."""

        def __init__(self, params: Any, lr: float) -> None:
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            with torch.enable_grad():
                loss = closure() if closure is not None else None
            for group in self.param_groups:
                used.append(group["lr"])
                for q in group["params"]:
                    q.add_(q.grad, alpha=-group["lr"])
            return loss

    p = torch.nn.Parameter(torch.ones(1))
    opt = Recording([p], lr=0.4)
    guard = LRGuard(patience=2, cooldown=0, rise_ratio=None).attach(opt)
    for step in range(3):

        def closure(step: int = step) -> torch.Tensor:
            opt.zero_grad()
            loss = (p * 2).sum()
            loss.backward()
            guard.update(step=step, norm=1.0 if step >= 1 else 0.0, threshold=1.0)
            return loss

        opt.step(closure)
        assert opt.param_groups[0]["lr"] == 0.4
    # the reduction decided at step 2 (two pressing steps: 1, 2) already applies to step 2
    assert used == [0.4, 0.4, 0.2]
    assert p.item() == pytest.approx(1 - 0.4 * 2 - 0.4 * 2 - 0.2 * 2)


def test_failed_step_and_detach_leave_no_scaled_lr() -> None:
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.4)
    guard = LRGuard(patience=2, cooldown=0, rise_ratio=None).attach(opt)
    _press(guard, range(2))
    assert guard.lr_scale == 0.5

    def boom() -> float:
        assert opt.param_groups[0]["lr"] == 0.2
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(boom)
    # the post-hook never ran; the next step restores the scheduler value before scaling again
    seen: list[float] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]) or None)
    p.grad = torch.ones(1)
    opt.step()
    assert seen == [0.2] and opt.param_groups[0]["lr"] == 0.4
    guard.detach()
    opt.step()
    assert seen == [0.2, 0.4] and guard.optimizer is None


# ------------------------------------------------------------------------- a prior threshold (auto's ceiling)
def test_pressing_a_prior_threshold_needs_a_diverging_loss_once_the_run_learned() -> None:
    """Norms above ``auto``'s ceiling press it on every step of a healthy run whose norms grow (the ReLU IRNN of
    the outcomes benchmark at a sane LR, whose loss falls from 1.1 to 0.17 in 10 steps and stays there): with a
    flat loss that is no reason to cut the LR; with a loss that climbs back to 3.5x its best it is. A run whose
    loss never fell is no exception: a threshold not learnt from the run is no evidence on its own, whether the
    run has learned or not (its stall, if any, is the stall channel's to judge)."""

    def irnn_like(step: int) -> float:
        return max(1.1 - 0.093 * step, 0.17)  # 1.1 -> 0.17 over the first 10 steps, then flat

    flat, rising, never = LRGuard(patience=10), LRGuard(patience=10), LRGuard(patience=10)
    events_flat, events_rising, events_never = [], [], []
    for step in range(150):
        events_flat.append(flat.update(step=step, norm=5.0, threshold=3.0, loss=irnn_like(step), prior=True))
        loss = irnn_like(step) if step < 100 else 0.6
        events_rising.append(rising.update(step=step, norm=5.0, threshold=3.0, loss=loss, prior=True))
        events_never.append(never.update(step=step, norm=5.0, threshold=3.0, loss=0.7, prior=True))
    assert flat.num_reductions == 0 and not any(events_flat)
    assert rising.num_reductions >= 1
    first = next(e for e in events_rising if e is not None)
    assert first.step >= 100 and first.reason == "approach" and first.loss_recent == 0.6
    assert never.num_reductions == 0 and not any(events_never)
    # a loss that climbs back from its best level (0.5) to 1.2, still below where it started (2.3): the
    # digits MLP at 10x its LR, which needs its reduction before the diverging-loss test sees anything
    climbing = LRGuard(patience=10)
    losses = [2.3 - 0.018 * t for t in range(100)] + [0.5 + 0.02 * t for t in range(60)]
    steps = [climbing.update(step=t, norm=5.0, threshold=3.0, loss=x, prior=True) for t, x in enumerate(losses)]
    reduced = [e for e in steps if e is not None]
    # one reduction once the running level (median of 25 steps, 1.44) is above twice its best (0.62)
    assert [e.step for e in reduced] == [159] and reduced[0].loss_recent == pytest.approx(1.44)
    assert climbing.state_dict()["best_loss"] == pytest.approx(0.62)
    restored = LRGuard(patience=10)
    restored.load_state_dict(climbing.state_dict())
    assert restored.state_dict() == climbing.state_dict()
    # the same flat stream against a learnt threshold (prior=False) is the classic saturation: reduced
    learnt = LRGuard(patience=10)
    for step in range(150):
        learnt.update(step=step, norm=5.0, threshold=3.0, loss=0.17)
    assert learnt.num_reductions >= 1


def test_auto_reports_its_ceiling_as_a_prior_while_it_binds() -> None:
    p = AutoPolicy()
    assert p.threshold() is None and not p.threshold_is_prior()  # nothing anchors the ceiling yet
    for _ in range(3):
        p.observe(1.0)
    assert p.threshold() == 2.0 and p.threshold_is_prior()  # 2x the first norms, not learnt from a history
    for _ in range(400):
        p.observe(0.1)  # the norm level fell 10x: the ceiling follows it down and still binds
    thr = p.threshold()
    assert thr is not None and 0.1 / 0.7 < thr <= 0.1 / 0.35 * 1.0001 and p.threshold_is_prior()
    assert not AutoPolicy(prior_ratio=None).threshold_is_prior()
    capped = AutoPolicy(max_norm=0.5)
    capped.observe(1.0)
    assert capped.threshold() == 0.5 and not capped.threshold_is_prior()  # the user's cap binds, not the prior
    equal = AutoPolicy(max_norm=2.0)
    equal.observe(1.0)
    assert equal.threshold() == 2.0 and not equal.threshold_is_prior()  # equal to the ceiling: the user's choice
    assert not make_policy("fixed", max_norm=1.0).threshold_is_prior()

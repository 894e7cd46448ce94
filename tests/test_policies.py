"""Tests of the clip-threshold policies (pure: no Trainer, no torch ops except the checkpoint round-trip)."""

from __future__ import annotations

import io
import math
import random
import statistics
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gradguard.decide.policies import (
    POLICY_NAMES,
    AutoPolicy,
    FixedPolicy,
    PercentilePolicy,
    ThresholdPolicy,
    ZScorePolicy,
    make_policy,
)


def adaptive_auto(**kwargs: Any) -> AutoPolicy:
    """``AutoPolicy`` without its ceiling (``prior_ratio=None``): the adaptive statistics alone.

    The synthetic-stream properties below (stationary clip rate, spikes, trends) are properties of the adaptive
    statistics; the default ceiling (relative to the run's first norms) clips more while it binds, so these
    tests switch it off and the ceiling has tests of its own. Scale equivariance holds for both.
    """
    kwargs.setdefault("prior_ratio", None)
    return AutoPolicy(**kwargs)


ADAPTIVE: dict[str, Callable[..., ThresholdPolicy]] = {
    "auto": adaptive_auto,
    "percentile": PercentilePolicy,
    "zscore": ZScorePolicy,
}
FAST = settings(max_examples=12, deadline=None, derandomize=True)


def lognormal(n: int, sigma: float, seed: int, scale: float = 1.0) -> list[float]:
    rng = random.Random(seed)
    return [scale * math.exp(rng.gauss(0.0, sigma)) for _ in range(n)]


def drive(policy: ThresholdPolicy, norms: list[float]) -> list[float | None]:
    """The callback's protocol: threshold from history, then observe. Returns the threshold of each step."""
    out = []
    for x in norms:
        out.append(policy.threshold())
        policy.observe(x)
    return out


def normal_tail(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# ------------------------------------------------------------------------------------------ hand-computed
def test_fixed_returns_max_norm_and_has_no_center() -> None:
    p = FixedPolicy(2.5)
    assert p.name == "fixed"
    for x in [0.1, 100.0, float("nan")]:
        assert p.threshold() == 2.5
        p.observe(x)
    assert p.center() is None
    assert p.state_dict() == {"name": "fixed", "version": 1, "config": {"max_norm": 2.5}}


def test_percentile_of_known_window() -> None:
    p = PercentilePolicy(percentile=50, window=5, warmup_steps=1)
    drive(p, [5.0, 1.0, 4.0, 2.0, 3.0])
    assert p.threshold() == 3.0  # median of 1..5
    assert p.center() == 3.0
    q = PercentilePolicy(percentile=90, window=5, warmup_steps=1)
    drive(q, [5.0, 1.0, 4.0, 2.0, 3.0])
    # position 0.9 * (5 - 1) = 3.6 between the sorted values 4 and 5
    assert q.threshold() == pytest.approx(4.6)
    # the window rolls: 5.0 (the oldest) leaves, 6.0 enters -> [1, 4, 2, 3, 6], median 3
    p.observe(6.0)
    assert p.threshold() == 3.0
    p.observe(7.0)  # [4, 2, 3, 6, 7] -> median 4
    assert p.threshold() == 4.0


def test_percentile_current_norm_does_not_lift_its_own_threshold() -> None:
    p = PercentilePolicy(percentile=100, window=10, warmup_steps=1)
    drive(p, [1.0, 2.0, 3.0])
    assert p.threshold() == 3.0  # decided before the 1000.0 is seen
    p.observe(1000.0)
    assert p.threshold() == 1000.0


def test_zscore_ema_by_hand() -> None:
    p = ZScorePolicy(alpha=0.9, z_thresh=2.0, warmup_steps=3)
    drive(p, [1.0, 2.0, 3.0])
    # warmup: mean 2, population variance ((1)^2 + 0 + (1)^2) / 3 = 2/3
    assert p.center() == pytest.approx(2.0)
    thr1 = 2.0 + 2.0 * math.sqrt(2.0 / 3.0)  # 3.632993
    assert p.threshold() == pytest.approx(thr1)
    # an ordinary norm enters unclipped: mean 0.9*2 + 0.1*2.5 = 2.05; var 0.9*2/3 + 0.1*(2.5-2.05)^2
    p.observe(2.5)
    mean2, var2 = 2.05, 0.6 + 0.1 * 0.45**2
    assert p.center() == pytest.approx(mean2)
    assert p.threshold() == pytest.approx(mean2 + 2.0 * math.sqrt(var2))
    # a spike enters as the threshold itself (ZClip feeds the clipped value back)
    thr2 = mean2 + 2.0 * math.sqrt(var2)
    p.observe(50.0)
    mean3 = 0.9 * mean2 + 0.1 * thr2
    var3 = 0.9 * var2 + 0.1 * (thr2 - mean3) ** 2
    assert p.center() == pytest.approx(mean3)
    assert p.threshold() == pytest.approx(mean3 + 2.0 * math.sqrt(var3))


def test_auto_by_hand() -> None:
    # log-norms 0, 1, 2: median 1, MAD 1 -> sigma 1.4826; 2.4 sigma > log 7 so the ratio cap rules
    p = adaptive_auto(warmup_steps=3)
    drive(p, [1.0, math.e, math.e**2])
    assert p.center() == pytest.approx(math.e)
    assert p.threshold() == pytest.approx(7.0 * math.e)

    # constant warmup: MAD 0, sigma floored at 0.05; exp(2.4 * 0.05) is below the 4x floor
    q = adaptive_auto(warmup_steps=3)
    drive(q, [1.0, 1.0, 1.0])
    assert q.center() == pytest.approx(1.0)
    assert q.threshold() == pytest.approx(4.0)
    assert adaptive_auto(warmup_steps=3, min_ratio=1.0).threshold() is None
    r = adaptive_auto(warmup_steps=3, min_ratio=1.0)
    drive(r, [1.0, 1.0, 1.0])
    assert r.threshold() == pytest.approx(math.exp(0.12))  # without the floor: 2.4 sigma
    # a 100x spike: residual log(100) winsorized to 1.5 * 0.05 = 0.075
    q.observe(100.0)
    level = 0.02 * 0.075  # alpha 0.98
    slope = 0.01 * level  # slope / variance decay (1 + 0.98) / 2 = 0.99
    assert q.center() == pytest.approx(math.exp(level + 49.0 * slope))  # lag 0.98 / 0.02 = 49
    # E[clamp(Z, -1.5, 1.5)^2] = P(|Z|<1.5) - 3 phi(1.5) + 2.25 P(|Z|>1.5) = 0.86639 - 0.38856 + 0.30062
    kappa = 0.778465
    state = q.state_dict()
    assert state["level"] == pytest.approx(level)
    assert state["slope"] == pytest.approx(slope)
    assert state["var"] == pytest.approx(0.99 * 0.05**2 * kappa + 0.01 * 0.075**2, rel=1e-5)


def test_auto_ignores_zero_norms() -> None:
    p = AutoPolicy(warmup_steps=2)
    p.observe(0.0)
    p.observe(0.0)
    assert p.threshold() is None and p.state_dict()["steps"] == 0  # nothing anchors the ceiling yet
    assert p.state_dict()["recent"] == [] and p.state_dict()["anchor"] == []


# ---------------------------------------------------------------------------------------------- warmup
@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_warmup_returns_none_or_cap(name: str) -> None:
    free = ADAPTIVE[name](warmup_steps=5)
    capped = ADAPTIVE[name](warmup_steps=5, max_norm=0.5)
    for x in [1.0, 1.1, 0.9, 1.2, 1.0]:
        assert free.threshold() is None
        assert capped.threshold() == 0.5
        assert free.center() is None or name == "percentile"
        free.observe(x)
        capped.observe(x)
    thr = free.threshold()
    assert thr is not None and thr > 1.0
    assert capped.threshold() == 0.5  # the cap applies after warmup too
    # the cap does not change the statistics
    assert free.center() == capped.center()


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_non_finite_and_negative_norms_are_ignored(name: str) -> None:
    p = ADAPTIVE[name](warmup_steps=3)
    drive(p, [1.0, 2.0, 1.5, 1.2])
    before = p.state_dict()
    for bad in [float("nan"), float("inf"), float("-inf"), -1.0]:
        p.observe(bad)
    assert p.state_dict() == before


# ---------------------------------------------------------------------------------------------- state
def _round_trip(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded: dict[str, Any] = torch.load(buf, weights_only=True)
    return loaded


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
@pytest.mark.parametrize("split", [3, 400])  # mid-warmup and well after
def test_state_dict_round_trip_continues_identically(name: str, split: int) -> None:
    norms = lognormal(700, 0.4, seed=3)
    norms[450] = 500.0
    reference = ADAPTIVE[name](warmup_steps=10, max_norm=5.0)
    expected = drive(reference, norms)

    first = ADAPTIVE[name](warmup_steps=10, max_norm=5.0)
    got = drive(first, norms[:split])
    resumed = ADAPTIVE[name](warmup_steps=10, max_norm=5.0)
    resumed.load_state_dict(_round_trip(first.state_dict()))
    got += drive(resumed, norms[split:])
    assert got == expected  # bit-identical
    assert resumed.state_dict() == reference.state_dict()


def test_fixed_state_round_trip() -> None:
    p = FixedPolicy(1.0)
    q = FixedPolicy(1.0)
    q.load_state_dict(_round_trip(p.state_dict()))
    assert q.threshold() == 1.0


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_load_tolerates_missing_keys(name: str) -> None:
    p = ADAPTIVE[name](warmup_steps=3)
    p.load_state_dict({})
    assert p.threshold() is None
    p.load_state_dict({"name": name})
    drive(p, [1.0, 1.0, 1.0])
    assert p.threshold() is not None


# ------------------------------------------------------------------------------------- the auto ceiling
def test_auto_ceiling_is_relative_to_the_first_norms() -> None:
    p = AutoPolicy()  # prior_ratio 2, anchor_steps 8
    assert p.threshold() is None  # step 0: nothing says what a large norm is for this run
    thrs = drive(p, [3.0, 5.0, 4.0])
    assert thrs == [None, 6.0, 8.0]  # 2 x the median of the norms seen so far
    drive(p, [4.0] * 5 + [400.0] * 20)  # anchored on the first 8 (median 4), held: an explosion is clipped to 8
    assert p.state_dict()["anchor"] == [3.0, 5.0, 4.0] + [4.0] * 5
    assert p.threshold() == 8.0


def test_auto_ceiling_clips_an_early_explosion_for_the_hold() -> None:
    p = AutoPolicy()
    thrs = drive(p, [2.0] * 8 + [2.6e3] * (p.hold_steps - 8))
    assert thrs[8:] == [4.0] * (p.hold_steps - 8)  # the adaptive part warmed up on the explosion; the ceiling holds
    adaptive = adaptive_auto()
    drive(adaptive, [2.0] * 8 + [2.6e3] * (p.hold_steps - 8))
    assert adaptive.threshold() is not None and adaptive.threshold() > 1e3  # type: ignore[operator]


def test_auto_ceiling_opens_while_pressed_and_closes_far_above_by_hand() -> None:
    p = AutoPolicy(hold_steps=10, open_steps=4, warmup_steps=5)
    drive(p, [1.0] * 10)
    assert p.state_dict()["ceiling"] == 2.0  # anchored at 2 x 1, held
    drive(p, [8.0] * 32)  # the median of the last 32 norms is 8 > 0.7 x ceiling: doubles every 4 steps
    opened = p.state_dict()["ceiling"]
    assert 8.0 / 0.7 < opened <= 8.0 / 0.7 * 2 ** (1 / 4) * 1.0001  # stops once above the press level
    drive(p, [8.0] * 40)  # pressed no more, not far above: the ceiling stays (no drift with the run's length)
    assert p.state_dict()["ceiling"] == opened
    drive(p, [0.1] * 40)  # the norm level fell 80x: the ceiling follows it down at the same rate
    assert p.state_dict()["ceiling"] <= 0.1 / AutoPolicy._CLOSE * 1.0001
    assert p.state_dict()["ceiling"] >= 0.1 / AutoPolicy._CLOSE * 2 ** (-1 / 4) * 0.9999


def test_auto_ceiling_does_not_follow_a_jump() -> None:
    p = AutoPolicy()
    drive(p, lognormal(400, 0.2, seed=1, scale=10.0))
    settled = p.state_dict()["ceiling"]
    assert 10.0 < settled < 40.0
    drive(p, [200.0] * 8)  # a 20x blow-up: the ceiling moves by at most 2 ** (8 / 32)
    assert p.state_dict()["ceiling"] <= settled * 2 ** (8 / 32) * 1.0001
    assert p.threshold() is not None and p.threshold() < 40.0  # type: ignore[operator]


def test_auto_threshold_does_not_drift_with_the_run_length() -> None:
    """A stationary stream: the threshold after 8,000 steps is where it was after 1,000."""
    norms = lognormal(8000, 0.5, seed=11, scale=3.0)
    thrs = drive(AutoPolicy(), norms)
    early = statistics.median(t for t in thrs[800:1200] if t is not None)
    late = statistics.median(t for t in thrs[7600:8000] if t is not None)
    assert 0.8 < late / early < 1.25


@FAST
@given(seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3))
def test_auto_default_is_scale_equivariant_from_the_first_step(seed: int, scale: float) -> None:
    norms = lognormal(400, 0.4, seed)
    norms[5] *= 300.0  # an early explosion while the ceiling anchors
    norms[200] *= 50.0
    base = drive(AutoPolicy(), norms)
    scaled = drive(AutoPolicy(), [scale * x for x in norms])
    assert base[0] is None and scaled[0] is None
    for a, b in zip(base[1:], scaled[1:], strict=True):
        assert a is not None and b is not None
        assert b == pytest.approx(scale * a, rel=1e-9)
    clipped = [x > t for x, t in zip(norms[1:], base[1:], strict=True) if t is not None]
    clipped_scaled = [scale * x > t for x, t in zip(norms[1:], scaled[1:], strict=True) if t is not None]
    assert clipped == clipped_scaled


@pytest.mark.parametrize("split", [4, 20, 120])
def test_auto_ceiling_state_round_trip(split: int) -> None:
    norms = lognormal(300, 0.4, seed=5, scale=6.0)
    expected = drive(AutoPolicy(), norms)
    first = AutoPolicy()
    got = drive(first, norms[:split])
    resumed = AutoPolicy()
    resumed.load_state_dict(_round_trip(first.state_dict()))
    got += drive(resumed, norms[split:])
    assert got == expected
    old = first.state_dict()
    del old["ceiling"], old["recent"], old["anchor"]  # a saved state without the ceiling's keys
    legacy = AutoPolicy()
    legacy.load_state_dict(old)
    assert legacy.state_dict()["ceiling"] is None  # no ceiling until new norms anchor it
    drive(legacy, [6.0] * 8)
    assert legacy.state_dict()["ceiling"] == 12.0


def test_auto_absolute_prior_is_opt_in() -> None:
    p = AutoPolicy(prior_norm=1.0, prior_ratio=None)
    assert p.threshold() == 1.0  # protection from step 0, in the units the user chose
    with pytest.raises(ValueError, match=r"`prior_norm` .* and `prior_ratio` .* both set the starting ceiling"):
        AutoPolicy(prior_norm=1.0)


def test_auto_load_without_slope_defaults_to_zero() -> None:
    p = AutoPolicy(warmup_steps=3)
    drive(p, [1.0, 2.0, 3.0, 4.0, 5.0])
    state = p.state_dict()
    del state["slope"], state["steps"]
    q = AutoPolicy(warmup_steps=3)
    q.load_state_dict(state)
    assert q.state_dict()["slope"] == 0.0
    assert q.state_dict()["level"] == state["level"]


def test_load_rejects_other_policy_and_warns_on_config_change() -> None:
    z = ZScorePolicy()
    with pytest.raises(ValueError, match="`zscore` policy state into a `auto` policy"):
        AutoPolicy().load_state_dict(z.state_dict())
    p = PercentilePolicy(window=10, warmup_steps=1)
    drive(p, [float(i) for i in range(1, 11)])
    q = PercentilePolicy(window=4, warmup_steps=1)
    with pytest.warns(UserWarning, match="window: saved 10, now 4"):
        q.load_state_dict(p.state_dict())
    assert q.state_dict()["history"] == [7.0, 8.0, 9.0, 10.0]  # the most recent `window` norms
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PercentilePolicy(window=10, warmup_steps=1).load_state_dict(p.state_dict())  # same config: silent


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("factory", "kwargs", "exc", "message"),
    [
        (FixedPolicy, {"max_norm": 0.0}, ValueError, "`max_norm` must be > 0, got 0.0"),
        (FixedPolicy, {"max_norm": float("inf")}, ValueError, "`max_norm` must be finite, got inf"),
        (FixedPolicy, {"max_norm": "1"}, TypeError, "`max_norm` must be a real number, got '1'"),
        (FixedPolicy, {"max_norm": True}, TypeError, "`max_norm` must be a real number, got True"),
        (PercentilePolicy, {"percentile": 0}, ValueError, r"`percentile` must be in \(0, 100\], got 0"),
        (PercentilePolicy, {"percentile": 101}, ValueError, r"`percentile` must be in \(0, 100\], got 101"),
        (PercentilePolicy, {"window": 0}, ValueError, "`window` must be an int >= 1, got 0"),
        (PercentilePolicy, {"window": 10.0}, TypeError, "`window` must be an int >= 1, got 10.0"),
        (PercentilePolicy, {"warmup_steps": 0}, ValueError, "`warmup_steps` must be an int >= 1, got 0"),
        (PercentilePolicy, {"max_norm": -1}, ValueError, "`max_norm` must be > 0, got -1"),
        (ZScorePolicy, {"alpha": 1.5}, ValueError, r"`alpha` must be in \(0, 1\), got 1.5"),
        (ZScorePolicy, {"alpha": 0.0}, ValueError, r"`alpha` must be in \(0, 1\), got 0.0"),
        (ZScorePolicy, {"z_thresh": -2}, ValueError, "`z_thresh` must be > 0, got -2"),
        (ZScorePolicy, {"warmup_steps": 0}, ValueError, "`warmup_steps` must be an int >= 1, got 0"),
        (AutoPolicy, {"max_ratio": 1.0}, ValueError, "`max_ratio` must be > 1, got 1.0"),
        (AutoPolicy, {"alpha": 1}, ValueError, r"`alpha` must be in \(0, 1\), got 1"),
        (AutoPolicy, {"z_thresh": 0}, ValueError, "`z_thresh` must be > 0, got 0"),
        (AutoPolicy, {"warmup_steps": -3}, ValueError, "`warmup_steps` must be an int >= 1, got -3"),
        (AutoPolicy, {"prior_norm": 0.0, "prior_ratio": None}, ValueError, "`prior_norm` must be > 0, got 0.0"),
        (AutoPolicy, {"prior_ratio": -2.0}, ValueError, "`prior_ratio` must be > 0, got -2.0"),
        (AutoPolicy, {"anchor_steps": 0}, ValueError, "`anchor_steps` must be an int >= 1, got 0"),
        (AutoPolicy, {"hold_steps": -1}, ValueError, "`hold_steps` must be an int >= 0, got -1"),
        (AutoPolicy, {"open_steps": 0}, ValueError, "`open_steps` must be an int >= 1, got 0"),
    ],
)
def test_constructor_validation(factory: Any, kwargs: dict[str, Any], exc: type[Exception], message: str) -> None:
    with pytest.raises(exc, match=message):
        factory(**kwargs)


def test_make_policy() -> None:
    assert make_policy(None) is None
    assert isinstance(make_policy("auto"), AutoPolicy)
    fixed = make_policy("fixed", max_norm=1.0)
    assert isinstance(fixed, FixedPolicy) and fixed.threshold() == 1.0
    capped = make_policy("zscore", max_norm=3.0)
    assert isinstance(capped, ZScorePolicy) and capped.threshold() == 3.0
    perc = make_policy("percentile", max_norm=2.0)
    assert isinstance(perc, PercentilePolicy) and perc.max_norm == 2.0
    own = PercentilePolicy(percentile=90)
    assert make_policy(own) is own
    assert {make_policy(n, max_norm=1.0).name for n in POLICY_NAMES} == set(POLICY_NAMES)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("clip", "max_norm", "exc", "message"),
    [
        ("fixed", None, ValueError, "`clip='fixed'` requires `max_norm`"),
        ("adaptive", None, ValueError, "`clip` must be one of auto, fixed, percentile, zscore or None, got 'adaptive'"),
        ("Auto", None, ValueError, "got 'Auto'"),
        (3, None, TypeError, "`clip` must be one of auto, fixed, percentile, zscore, a ThresholdPolicy or None"),
        (None, 1.0, ValueError, r"`max_norm` \(1.0\) has no effect with `clip=None`"),
        (ZScorePolicy(), 1.0, ValueError, "cannot be combined with a policy instance"),
        ("auto", 0.0, ValueError, "`max_norm` must be > 0, got 0.0"),
        ("fixed", float("nan"), ValueError, "`max_norm` must be finite, got nan"),
    ],
)
def test_make_policy_errors(clip: Any, max_norm: Any, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc, match=message):
        make_policy(clip, max_norm)


# --------------------------------------------------------------------------------- property-based
# Stated clip-rate targets on stationary lognormal streams (log-sd sigma):
#   auto:       P(Z > clamp(2.4, log(4) / sigma, log(7) / sigma)) -- ~0 below sigma 0.35 (4x floor), 0.82 %
#               where z rules, the 7x-typical cap beyond
#   zscore:     1 - 3.5 % for near-Gaussian streams (sigma <= 0.3); nominal P(Z > 2.5) = 0.6 % is not reached
#               because clipped values shrink the EMA variance
#   percentile: 1 - percentile / 100 = 5 %
def _clip_rate_bounds(name: str, sigma: float) -> tuple[float, float]:
    if name == "auto":
        target = normal_tail(min(max(2.4, math.log(4.0) / sigma), math.log(7.0) / sigma))
        return (0.4 * target if target > 1e-3 else 0.0), 1.6 * target + 0.003
    if name == "zscore":
        return 0.005, 0.04
    return 0.04, 0.06


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
@FAST
@given(
    seed=st.integers(0, 2**31),
    sigma=st.floats(0.05, 1.5),
    scale=st.floats(1e-4, 1e4),
)
def test_stationary_clip_rate_and_stable_threshold(name: str, seed: int, sigma: float, scale: float) -> None:
    if name == "zscore":
        sigma = min(sigma, 0.3)  # the z-score model assumes roughly Gaussian norms
    norms = lognormal(4000, sigma, seed, scale)
    thrs = drive(ADAPTIVE[name](), norms)
    steady = [(x, t) for x, t in zip(norms[500:], thrs[500:], strict=True) if t is not None]
    assert len(steady) == 3500
    rate = sum(x > t for x, t in steady) / len(steady)
    lo, hi = _clip_rate_bounds(name, sigma)
    assert lo <= rate <= hi, f"{name} clip rate {rate:.4f} outside [{lo:.4f}, {hi:.4f}] at sigma={sigma:.3f}"
    if sigma <= 1.0:
        ts = [t for _, t in steady]
        mid = statistics.median(ts)
        assert 0.5 * mid <= min(ts) and max(ts) <= 2.0 * mid, "threshold not stable"
        assert mid > scale  # above the typical norm


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
@FAST
@given(
    seed=st.integers(0, 2**31),
    sigma=st.floats(0.05, 0.5),
    factor=st.floats(10.0, 1000.0),
    scale=st.floats(1e-3, 1e3),
)
def test_isolated_spike_is_clipped_and_does_not_drag(
    name: str, seed: int, sigma: float, factor: float, scale: float
) -> None:
    norms = lognormal(1600, sigma, seed, scale)
    at = 1000
    norms[at] = factor * scale
    policy = ADAPTIVE[name]()
    thrs = drive(policy, norms)
    before, at_spike, after = thrs[at - 1], thrs[at], thrs[at + 1]
    assert before is not None and at_spike is not None and after is not None
    assert norms[at] > at_spike, "spike not clipped"
    assert after <= 1.3 * at_spike, f"spike dragged the threshold up {after / at_spike:.3f}x"
    later = [t for t in thrs[at + 1 : at + 200] if t is not None]
    assert max(later) <= 1.3 * before


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
@FAST
@given(seed=st.integers(0, 2**31), sigma=st.floats(0.05, 0.5), direction=st.sampled_from([-1, 1]))
def test_slow_100x_trend_is_followed(name: str, seed: int, sigma: float, direction: int) -> None:
    n = 8000
    rng = random.Random(seed)
    levels = [100.0 ** (direction * i / (n - 1)) for i in range(n)]  # 100x decay or rise over the run
    norms = [lv * math.exp(rng.gauss(0.0, sigma)) for lv in levels]
    thrs = drive(ADAPTIVE[name](), norms)
    end = thrs[-1]
    assert end is not None
    ratio = end / levels[-1]
    tail = list(zip(norms[-1000:], thrs[-1000:], strict=True))
    rate = sum(x > t for x, t in tail if t is not None) / len(tail)
    if name == "percentile" and direction == 1:
        # a percentile of a 1000-step window lags a rise (measured: 65 % clip rate at sigma 0.05, threshold
        # 0.98x the level; documented in docs/policies.md): only "same order of magnitude" holds
        assert 0.5 < ratio < 4.0
        return
    assert 1.0 < ratio < 8.0, f"threshold {ratio:.2f}x the local level at the end"
    assert rate < 0.1, f"clip rate {rate:.3f} at the end of the trend"


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_memory_is_bounded(name: str) -> None:
    policy = ADAPTIVE[name](warmup_steps=25)
    window = getattr(policy, "window", 1000)
    sizes = []
    for chunk in range(10):
        drive(policy, lognormal(window, 0.3, seed=chunk))
        state = policy.state_dict()
        sizes.append(sum(len(v) if isinstance(v, list) else 1 for v in state.values()))
    assert len(set(sizes)) == 1  # constant after the first window
    if isinstance(policy, PercentilePolicy):
        assert len(policy._history) == len(policy._sorted) == policy.window
    else:
        assert policy.state_dict()["warmup"] == []


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
@FAST
@given(seed=st.integers(0, 2**31), scale=st.floats(1e-3, 1e3))
def test_scale_equivariance(name: str, seed: int, scale: float) -> None:
    norms = lognormal(300, 0.3, seed)
    base = drive(ADAPTIVE[name](warmup_steps=10), norms)
    scaled = drive(ADAPTIVE[name](warmup_steps=10), [scale * x for x in norms])
    for a, b in zip(base[10:], scaled[10:], strict=True):
        assert a is not None and b is not None
        assert b == pytest.approx(scale * a, rel=1e-9)


# -------------------------------------------------------------------------------- auto versus ZClip
class ZClipReference:
    """ZClip (Kumar et al., 2025) as its paper describes it, written independently of ZScorePolicy.

    Warmup: mean and variance of the first 25 norms. Then z = (g - mu) / sd; if z > 2.5 the norm is clipped
    to mu + 2.5 sd, and the clipped value g* updates mu_t = a mu + (1 - a) g*, var_t = a var + (1 - a)(g* - mu_t)^2
    with a = 0.97.
    """

    def __init__(self) -> None:
        self.seen: list[float] = []
        self.mu = 0.0
        self.var = 0.0
        self.ready = False

    def threshold(self) -> float | None:
        return self.mu + 2.5 * math.sqrt(self.var) if self.ready else None

    def observe(self, g: float) -> None:
        if not self.ready:
            self.seen.append(g)
            if len(self.seen) == 25:
                self.mu = statistics.fmean(self.seen)
                self.var = statistics.pvariance(self.seen, self.mu)
                self.ready = True
            return
        sd = math.sqrt(self.var)
        if sd > 0 and (g - self.mu) / sd > 2.5:
            g = self.mu + 2.5 * sd
        self.mu = 0.97 * self.mu + 0.03 * g
        self.var = 0.97 * self.var + 0.03 * (g - self.mu) ** 2


SCENARIOS = [
    # (label, level shape, log-sd)
    ("stationary, sigma 0.1", "flat", 0.1),
    ("stationary, sigma 0.25", "flat", 0.25),
    ("100x decay over 5000 steps, sigma 0.25", "decay", 0.25),
    ("100x decay in the first 1000 steps, sigma 0.25", "fast", 0.25),
    ("heavy-tailed stationary, sigma 1", "flat", 1.0),
    ("heavy-tailed 100x decay, sigma 1", "decay", 1.0),
    ("early-training 5x rise over 100 steps, sigma 0.1", "rise", 0.1),
    ("early-training 5x rise over 100 steps, sigma 0.25", "rise", 0.25),
]
N_STEPS, N_SPIKES, SEEDS = 5000, 50, range(8)


def _level(shape: str, i: int) -> float:
    if shape == "decay":
        return math.pow(100.0, 1.0 - i / (N_STEPS - 1))
    if shape == "fast":
        return math.pow(100.0, 1.0 - min(i / 1000, 1.0))
    if shape == "rise":  # flat through warmup, then the norm level grows 5x, as early in real training
        return math.pow(5.0, min(max(i - 100, 0) / 100, 1.0))
    return 1.0


def _score(policy: Any, shape: str, sigma: float, seed: int) -> tuple[int, int, int, int]:
    """(spikes caught, spikes, ordinary steps clipped, ordinary steps) on one stream.

    Spikes: 50 steps, 10-1000x (log-uniform) the local typical norm. A spike counts as caught when it is
    clipped to no more than 5x the local typical norm or the clean stream's local 99.9th percentile
    (typical * exp(3.09 sigma)), whichever is larger: its update is cut from 10-1000x to within half an
    order of magnitude of an ordinary one. (ZClip cuts spikes closer, to about mean + 2.5 sd; auto's 4x
    floor is the price of not clipping ordinary steps while the level moves.) Ordinary steps are counted
    from step 100 on.
    """
    rng = random.Random(seed)
    levels = [_level(shape, i) for i in range(N_STEPS)]
    norms = [lv * math.exp(rng.gauss(0.0, sigma)) for lv in levels]
    spikes = set(rng.sample(range(200, N_STEPS), N_SPIKES))
    for i in spikes:
        norms[i] = levels[i] * 10.0 ** rng.uniform(1.0, 3.0)
    near = max(math.exp(3.09 * sigma), 5.0)
    caught = clipped = ordinary = 0
    for i, g in enumerate(norms):
        thr = policy.threshold()
        if i in spikes:
            caught += thr is not None and g > thr and thr <= near * levels[i]
        elif i >= 100:
            ordinary += 1
            clipped += thr is not None and g > thr
        policy.observe(g)
    return caught, N_SPIKES, clipped, ordinary


def test_zclip_reference_matches_zscore_policy() -> None:
    norms = lognormal(2000, 0.3, seed=11)
    norms[700] = 300.0
    ours, ref = drive(ZScorePolicy(), norms), drive(ZClipReference(), norms)  # type: ignore[arg-type]
    assert ours[:25] == ref[:25] == [None] * 25
    assert ours[25:] == pytest.approx(ref[25:], rel=1e-12)


def test_auto_beats_zclip_on_spiky_streams() -> None:
    rows = []
    total_auto = total_zclip = 0
    for label, shape, sigma in SCENARIOS:
        res: dict[str, list[int]] = {}
        for key, factory in (("auto", adaptive_auto), ("zclip", ZClipReference)):
            acc = [0, 0, 0, 0]
            for seed in SEEDS:
                acc = [a + b for a, b in zip(acc, _score(factory(), shape, sigma, seed), strict=True)]
            res[key] = acc
        a, z = res["auto"], res["zclip"]
        rows.append(
            f"| {label} | {z[0]}/{z[1]} | {a[0]}/{a[1]} | {100 * z[2] / z[3]:.2f} % | {100 * a[2] / a[3]:.2f} % |"
        )
        total_auto += a[0]
        total_zclip += z[0]
        # per stream: as many spikes caught up to one borderline spike, strictly fewer ordinary clips
        assert a[0] >= z[0] - 1, f"{label}: auto caught {a[0]}, ZClip {z[0]}"
        assert a[2] < z[2], f"{label}: auto clipped {a[2]} ordinary steps, ZClip {z[2]}"
    print("\n| stream | ZClip spikes caught | auto spikes caught | ZClip ordinary clipped | auto ordinary clipped |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    assert total_auto >= total_zclip - 1  # at most one borderline spike in total

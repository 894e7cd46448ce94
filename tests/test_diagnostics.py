"""GradientDiagnostics: verdict rules on hand-made norm streams, episodes, state, validation, and the
textbook nets (deep Sigmoid, deep Tanh, BatchNorm+ReLU+Kaiming) at initialisation."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gradguard.decide.diagnostics import KINDS, REMEDIES, GradientDiagnostics, Verdict


def kinds(verdicts: list[Verdict]) -> list[tuple[str, str]]:
    return [(v.layer, v.kind) for v in verdicts]


# ----------------------------------------------------------------------------------------- vanishing
def test_vanishing_by_ratio_on_per_element_rms() -> None:
    diag = GradientDiagnostics()
    # a: rms 1e-6 (l2 1e-5 over 100 elements); b: rms 0.1 (l2 1.0 over 100) -> 1e5x apart > 1e4
    verdicts = diag.observe(7, {"a": 1e-5, "b": 1.0}, {"a": 100, "b": 100})
    assert kinds(verdicts) == [("a", "vanishing")]
    v = verdicts[0]
    assert v.step == 7
    assert v.value == pytest.approx(1e-6)
    assert "'a'" in v.message and "'b'" in v.message
    assert v.message == (
        "Layer 'a' has a vanishing gradient at step 7: its per-element RMS gradient (L2 norm / sqrt(numel)) "
        "is 1e-06 (median over 1 log step), 1e+05x smaller than that of layer 'b' (0.1), "
        "beyond vanishing_ratio=1e+04."
    )
    assert v.remedy == REMEDIES["vanishing"]
    assert "activation" in v.remedy and "residual" in v.remedy and "initialise" in v.remedy


def test_vanishing_ratio_just_inside_the_limit_is_healthy() -> None:
    diag = GradientDiagnostics()
    # rms 2e-5 vs 0.1: 5000x apart, below 1e4
    assert diag.observe(0, {"a": 2e-4, "b": 1.0}, {"a": 100, "b": 100}) == []


def test_vanishing_by_floor() -> None:
    diag = GradientDiagnostics(vanishing_floor=1e-8)
    # a single layer: no ratio possible; rms = 1e-8 / sqrt(4) = 5e-9 < 1e-8
    verdicts = diag.observe(3, {"only": 1e-8}, {"only": 4})
    assert kinds(verdicts) == [("only", "vanishing")]
    assert verdicts[0].value == pytest.approx(5e-9)
    assert "below vanishing_floor=1e-08" in verdicts[0].message


def test_a_converged_model_with_tiny_gradients_in_every_layer_is_not_vanishing() -> None:
    # A classifier that fits its training set: every layer's RMS falls to 1e-10..1e-9, the proportions between
    # the layers stay as they were early in training.
    numels = {"in": 30 * 64, "mid": 64 * 64, "out": 64 * 2}
    diag = GradientDiagnostics()
    for step, scale in enumerate([1.0, 1e-2, 1e-4, 1e-6, 1e-7, 1e-7, 1e-7]):
        rms = {"in": 4e-3 * scale, "mid": 5e-4 * scale, "out": 3e-3 * scale}
        norms = {name: r * math.sqrt(numels[name]) for name, r in rms.items()}
        assert diag.observe(step * 50, norms, numels) == [], f"at RMS {rms}"


@pytest.mark.parametrize("k", [1e-8, 1e-2, 1e2, 1e6])
def test_vanishing_verdicts_do_not_depend_on_the_units_of_the_loss(k: float) -> None:
    # One vanishing layer (1e6x below the others) and one healthy pair: the loss x k multiplies every norm by k.
    numels = {"early": 100, "middle": 100, "late": 100}
    stream = [{"early": 1e-6 * j, "middle": 0.5 * j, "late": 1.0 * j} for j in (1.0, 0.8, 1.2, 0.9)]
    plain, scaled = GradientDiagnostics(), GradientDiagnostics()
    found_plain, found_scaled = [], []
    for step, norms in enumerate(stream):
        found_plain += [v for v in kinds(plain.observe(step, norms, numels)) if v[1] == "vanishing"]
        scaled_norms = {n: v * k for n, v in norms.items()}
        found_scaled += [v for v in kinds(scaled.observe(step, scaled_norms, numels)) if v[1] == "vanishing"]
    assert found_plain == [("early", "vanishing")]
    assert found_scaled == found_plain


def test_rms_is_not_fooled_by_layer_size() -> None:
    # Same per-element RMS 1e-3, sizes 1 and 1e9: the L2 norms are 1e-3 and 31.6 (31623x apart).
    norms = {"bias": 1e-3, "embedding": 1e-3 * math.sqrt(1e9)}
    assert GradientDiagnostics().observe(0, norms, {"bias": 1, "embedding": 10**9}) == []
    # Without element counts only the L2 norm is left, and the message says so.
    verdicts = GradientDiagnostics().observe(0, norms, {})
    assert kinds(verdicts) == [("bias", "vanishing")]
    assert "element count unknown" in verdicts[0].message


def test_one_noisy_observation_neither_raises_nor_ends_a_vanishing_verdict() -> None:
    diag = GradientDiagnostics(window=5)
    healthy = {"a": 1.0, "b": 1.0}
    numels = {"a": 1, "b": 1}
    for step in range(4):
        assert diag.observe(step, healthy, numels) == []
    # one tiny value: the median of a's window is still 1.0
    assert diag.observe(4, {"a": 1e-9, "b": 1.0}, numels) == []


# ----------------------------------------------------------------------------------------- exploding
def test_exploding_by_ceiling_uses_the_l2_norm() -> None:
    assert GradientDiagnostics().observe(12, {"a": 1e4}, {"a": 10}) == []  # no absolute rule by default
    diag = GradientDiagnostics(exploding_ceiling=100.0)
    verdicts = diag.observe(12, {"a": 150.0, "b": 90.0}, {"a": 10**6, "b": 10})
    assert kinds(verdicts) == [("a", "exploding")]
    assert verdicts[0].value == 150.0
    assert "L2 norm 150 at step 12" in verdicts[0].message
    assert "exploding_ceiling=100" in verdicts[0].message
    assert "clip" in verdicts[0].remedy and "learning rate" in verdicts[0].remedy


def test_exploding_by_jump_over_own_recent_median() -> None:
    diag = GradientDiagnostics()
    numels = {"a": 10}
    assert diag.observe(0, {"a": 1e-3}, numels) == []
    assert diag.observe(1, {"a": 2e-3}, numels) == []
    assert diag.observe(2, {"a": 1e-3}, numels) == []
    # 0.2 / median(1e-3, 2e-3, 1e-3) = 200 < 1000: the kind of take-off healthy training shows
    assert diag.observe(3, {"a": 0.2}, numels) == []
    # 2.0 / median(1e-3, 2e-3, 1e-3, 0.2) = 2.0 / 1.5e-3 = 1333 > 1000
    verdicts = diag.observe(4, {"a": 2.0}, numels)
    assert kinds(verdicts) == [("a", "exploding")]
    assert "1.33e+03x the median 0.0015" in verdicts[0].message
    assert "exploding_ratio=1000" in verdicts[0].message


def test_a_converged_layer_whose_norm_jumps_far_below_its_first_is_not_exploding() -> None:
    """A converged model's norms fall by decades; one batch it still gets wrong lifts a layer's norm by more than
    ``exploding_ratio`` over its recent median while it stays far below where training started."""
    diag = GradientDiagnostics()
    numels = {"a": 10}
    for step, value in enumerate([1.0, 1e-2, 1e-6, 1e-10, 1e-10, 1e-10]):
        assert diag.observe(step, {"a": value}, numels) == []
    assert diag.observe(6, {"a": 1e-4}, numels) == []  # 1e6x its recent median, 1e-4x its first norm
    verdicts = diag.observe(7, {"a": 3.0}, numels)  # above its first norm too: exploding
    assert kinds(verdicts) == [("a", "exploding")]


def test_a_jump_while_the_loss_is_far_below_its_first_value_is_a_hard_batch_not_an_explosion() -> None:
    """A classifier that fits its training set (loss 0.69 -> 1e-4, norms 1e-5) meets a batch it gets wrong: the
    layer's norm jumps past its first norm while the loss (0.03) stays far below where it started. With the loss
    at its first level the same jump is exploding."""
    numels = {"a": 10}

    def fed(last_loss: float) -> list[Verdict]:
        diag = GradientDiagnostics()
        for step, (value, loss) in enumerate([(0.2, 0.69), (1e-3, 0.05), (1e-5, 1e-4), (1e-5, 1e-4), (1e-5, 1e-4)]):
            assert diag.observe(step, {"a": value}, numels, loss=loss) == []
        return diag.observe(5, {"a": 1.0}, numels, loss=last_loss)

    assert fed(0.03) == []  # below a tenth of the first loss: settled
    assert kinds(fed(0.069)) == [("a", "exploding")]  # at a tenth of it: the jump counts
    assert kinds(fed(0.7)) == [("a", "exploding")]


def test_jump_rule_needs_three_previous_observations_and_a_nonzero_baseline() -> None:
    diag = GradientDiagnostics()
    assert diag.observe(0, {"a": 1e-3}, {"a": 1}) == []
    assert diag.observe(1, {"a": 1.0}, {"a": 1}) == []  # 1000x, but one previous observation only
    dead_then_alive = GradientDiagnostics()
    for step in range(3):
        dead_then_alive.observe(step, {"a": 0.0}, {"a": 1})
    assert kinds(dead_then_alive.observe(3, {"a": 1.0}, {"a": 1})) == []


# ----------------------------------------------------------------------------------------- dead, nonfinite
def test_dead_layer_is_named_and_not_called_vanishing() -> None:
    """``dead`` needs two observations, because at step 0 the layers below a zero-initialised output layer have
    exactly-zero gradients too (see the next test)."""
    diag = GradientDiagnostics()
    norms, numels = {"head": 0.5, "frozen_by_mistake": 0.0}, {"head": 10, "frozen_by_mistake": 10}
    assert diag.observe(4, norms, numels) == []
    verdicts = diag.observe(5, norms, numels)
    assert kinds(verdicts) == [("frozen_by_mistake", "dead")]
    assert verdicts[0].value == 0.0
    assert "exactly zero" in verdicts[0].message and "requires_grad" in verdicts[0].remedy


def test_layers_below_a_zero_initialised_head_are_not_dead_at_step_0() -> None:
    """A zero-init output layer (a common recipe) zeroes every other layer's gradient at the first step only."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    torch.nn.init.zeros_(model[2].weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diag, verdicts = GradientDiagnostics(), []
    for step in range(5):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().add(-1.0).abs().backward()
        norms = {"0": float(model[0].weight.grad.norm()), "2": float(model[2].weight.grad.norm())}
        if step == 0:
            assert norms["0"] == 0.0 and norms["2"] > 0.0  # exactly zero below the zero head, at step 0 only
        verdicts += diag.observe(step, norms, {"0": 32, "2": 8})
        opt.step()
    assert [v for v in verdicts if v.kind == "dead"] == []


def test_nonfinite_layers_are_named_and_kept_out_of_the_history() -> None:
    diag = GradientDiagnostics()
    numels = {"a": 1, "b": 1}
    verdicts = diag.observe(0, {"a": math.nan, "b": math.inf}, numels)
    assert kinds(verdicts) == [("a", "nonfinite"), ("b", "nonfinite")]
    assert math.isnan(verdicts[0].value) and verdicts[1].value == math.inf
    assert "non-finite" in verdicts[0].message and "set_detect_anomaly" in verdicts[0].remedy
    for step in range(1, 4):
        assert diag.observe(step, {"a": 1.0, "b": 1.0}, numels) == []
    assert diag.state_dict()["layers"]["a"]["history"] == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------------------- episodes
def test_each_verdict_once_per_episode_and_again_after_recovery() -> None:
    diag = GradientDiagnostics(window=3)
    numels = {"a": 1}
    stream = [math.nan, math.nan, 1.0, 1.0, math.nan, 1.0, 1.0, 1.0, math.nan, math.nan]
    new = {step: kinds(diag.observe(step, {"a": v}, numels)) for step, v in enumerate(stream)}
    # steps 0-4: one episode (only 2 healthy observations before the NaN at step 4);
    # steps 5-7: 3 healthy observations end it; step 8 starts a new episode.
    assert [step for step, found in new.items() if found] == [0, 8]
    rec = diag.records()["a"]["nonfinite"]
    assert rec["episodes"] == 2 and rec["first_step"] == 0 and rec["last_step"] == 9


def test_persisting_vanishing_layer_is_reported_once() -> None:
    diag = GradientDiagnostics()
    found = []
    for step in range(0, 500, 50):
        found += kinds(diag.observe(step, {"early": 1e-9, "late": 1e-2}, {"early": 1, "late": 1}))
    assert found == [("early", "vanishing")]


# ----------------------------------------------------------------------------------------- summary, state
def test_summary_names_layers_counts_and_remedies() -> None:
    diag = GradientDiagnostics()
    assert diag.summary() == ""
    diag.observe(0, {"a": 1e-9, "b": 1.0, "c": 0.0}, {"a": 1, "b": 1, "c": 1})
    diag.observe(1, {"a": 1e-9, "b": 1.0, "c": 0.0}, {"a": 1, "b": 1, "c": 1})
    text = diag.summary()
    assert "3 layers over 2 log steps (steps 0-1): 2 with verdicts" in text
    assert "a: vanishing (1 episode, steps 0-1)" in text
    assert "c: dead (1 episode, step 1)" in text  # dead needs two observations (see above)
    assert REMEDIES["vanishing"] in text and REMEDIES["dead"] in text
    assert REMEDIES["exploding"] not in text

    healthy = GradientDiagnostics()
    healthy.observe(0, {"a": 1.0}, {"a": 1})
    assert "0 with verdicts; no vanishing, exploding, dead or non-finite" in healthy.summary()


def _stream(step: int) -> dict[str, float]:
    return {
        "a": [1e-3, 2e-3, 1e-3, 0.5, 1e-3, math.nan, 1e-3, 1e-9, 1e-9, 1e-9][step % 10],
        "b": 1.0 + 0.01 * step,
        "c": 0.0 if step < 6 else 0.3,
    }


def test_state_round_trip_through_torch_load_continues_exactly() -> None:
    numels = {"a": 4, "b": 4, "c": 4}
    whole = GradientDiagnostics(window=4)
    first = GradientDiagnostics(window=4)
    expected, got = [], []
    for step in range(20):
        expected += whole.observe(step, _stream(step), numels)
    for step in range(9):
        got += first.observe(step, _stream(step), numels)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = GradientDiagnostics(window=4)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(9, 20):
        got += resumed.observe(step, _stream(step), numels)
    assert got == expected
    assert {v.kind for v in expected} == {"exploding", "nonfinite", "dead", "vanishing"}
    assert resumed.summary() == whole.summary()
    assert repr(resumed.state_dict()) == repr(whole.state_dict())  # repr: NaN == NaN


def test_load_state_dict_tolerates_missing_keys() -> None:
    diag = GradientDiagnostics()
    diag.load_state_dict({"layers": {"a": {"history": [1.0]}}})
    assert diag.observe(0, {"a": 1.0}, {"a": 1}) == []


# ----------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"vanishing_floor": -1e-9}, ValueError, "`vanishing_floor` must be a finite number >= 0, got -1e-09"),
        ({"vanishing_floor": math.inf}, ValueError, "`vanishing_floor`"),
        ({"vanishing_floor": "1e-5"}, TypeError, "`vanishing_floor`"),
        ({"vanishing_ratio": 1.0}, ValueError, "`vanishing_ratio` must be > 1, got 1.0"),
        ({"vanishing_ratio": math.nan}, ValueError, "`vanishing_ratio`"),
        ({"exploding_ceiling": 0}, ValueError, "`exploding_ceiling` must be > 0, got 0"),  # the value as received
        ({"exploding_ratio": 0.5}, ValueError, "`exploding_ratio` must be > 1, got 0.5"),
        ({"exploding_ratio": True}, TypeError, "`exploding_ratio`"),
        ({"window": 0}, ValueError, "`window` must be an int >= 1, got 0"),
        ({"window": 2.0}, TypeError, "`window` must be an int >= 1, got 2.0"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, object], error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        GradientDiagnostics(**kwargs)  # type: ignore[arg-type]


def test_infinite_ratios_and_zero_floor_switch_rules_off() -> None:
    diag = GradientDiagnostics(vanishing_floor=0.0, vanishing_ratio=math.inf, exploding_ratio=math.inf)
    assert diag.observe(0, {"a": 1e-30, "b": 1.0}, {"a": 1, "b": 1}) == []
    assert set(KINDS) == {"vanishing", "exploding", "dead", "nonfinite"}


@settings(max_examples=60, deadline=None)
@given(
    levels=st.lists(st.floats(-6, 1), min_size=2, max_size=6),
    noise=st.lists(st.floats(-1, 1), min_size=30, max_size=30),
)
def test_stationary_streams_within_three_decades_get_no_verdict(levels: list[float], noise: list[float]) -> None:
    # log10 levels within 3 decades of each other, +-0.4 decades of noise: never 4 decades apart,
    # never 100x above a layer's own median, never above 10^1.4 or below 10^-6.4
    base = min(levels)
    levels = [min(level, base + 3.0) for level in levels]
    diag = GradientDiagnostics()
    names = [f"l{i}" for i in range(len(levels))]
    for step, n in enumerate(noise):
        norms = {
            name: 10 ** (level + 0.4 * n * (1 if i % 2 else -1))
            for i, (name, level) in enumerate(zip(names, levels, strict=True))
        }
        assert diag.observe(step, norms, dict.fromkeys(names, 1)) == []


# ----------------------------------------------------------------------------------------- textbook nets
def _deep_net(kind: str, depth: int = 10, width: int = 100) -> nn.Sequential:
    layers: list[nn.Module] = []
    d_in = 784
    for _ in range(depth - 1):
        linear = nn.Linear(d_in, width)
        layers.append(linear)
        if kind == "sigmoid":
            layers.append(nn.Sigmoid())
        elif kind == "tanh":
            layers.append(nn.Tanh())
        else:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
            layers += [nn.BatchNorm1d(width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, 10))
    return nn.Sequential(*layers)


def _layer_norms(model: nn.Sequential, seed: int) -> tuple[dict[str, float], dict[str, int]]:
    torch.manual_seed(seed)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    norms, numels = {}, {}
    for name, module in model.named_children():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads:
            norms[name] = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
            numels[name] = sum(g.numel() for g in grads)
    return norms, numels


@pytest.mark.parametrize("seed", [0, 1])
def test_deep_sigmoid_net_early_layers_are_vanishing(seed: int) -> None:
    torch.manual_seed(seed)
    model = _deep_net("sigmoid")
    norms, numels = _layer_norms(model, seed)
    verdicts = GradientDiagnostics().observe(0, norms, numels)
    flagged = [v.layer for v in verdicts if v.kind == "vanishing"]
    assert [v.kind for v in verdicts] == ["vanishing"] * len(verdicts)
    # the first five Linear layers (indices 0, 2, 4, 6, 8) and no later one
    assert flagged == ["0", "2", "4", "6", "8"]
    assert norms["0"] < 1e-6 < 0.1 < norms["18"]


@pytest.mark.parametrize("seed", [0, 1])
def test_deep_tanh_net_is_attenuated_but_not_vanishing(seed: int) -> None:
    torch.manual_seed(seed)
    model = _deep_net("tanh")
    norms, numels = _layer_norms(model, seed)
    rms = {k: norms[k] / math.sqrt(numels[k]) for k in norms}
    # L2 makes the first layer look close to the last one; per element it is 10-300x smaller
    assert 0.01 < norms["0"] / norms["18"] < 0.5
    assert 10 < rms["18"] / rms["0"] < 300
    assert GradientDiagnostics().observe(0, norms, numels) == []


def test_batchnorm_relu_kaiming_net_gets_no_verdict() -> None:
    torch.manual_seed(0)
    model = _deep_net("relu-bn")
    norms, numels = _layer_norms(model, 0)
    assert GradientDiagnostics().observe(0, norms, numels) == []


# ------------------------------------------------------------------------------- the blow-up rule (loss-keyed)
def test_blowup_names_the_layers_that_grew_while_the_loss_blew_up() -> None:
    """Log steps of the outcomes benchmark's tanh char-RNN at SGD lr 3 without clipping (seed 1): norms of
    2-5 never reach the ceiling of 100, but the loss went from 4.6 to 25 nats and the layers' norms grew
    2.5-44x over their first values. A layer that did not grow is not named."""
    d = GradientDiagnostics()
    numels = {"embed": 3200, "rnn": 20608, "head": 12900, "steady": 100}
    assert d.observe(0, {"embed": 0.0366, "rnn": 0.778, "head": 0.722, "steady": 1.0}, numels, loss=4.6) == []
    verdicts = d.observe(50, {"embed": 1.61, "rnn": 1.94, "head": 2.29, "steady": 1.1}, numels, loss=25.1)
    assert [(v.layer, v.kind) for v in verdicts] == [
        ("embed", "exploding"),
        ("rnn", "exploding"),
        ("head", "exploding"),
    ]
    assert "first observed norm 0.0366" in verdicts[0].message and "blowing up" in verdicts[0].message
    assert verdicts[2].value == pytest.approx(2.29)


def test_blowup_rule_needs_both_the_loss_and_the_growth() -> None:
    """Norms that grow while the loss falls (a healthy transformer leaving its init) and a loss that rises
    while no norm grew stay silent; without a loss the rule is off (the report's replay)."""
    numels = {"a": 10}
    growing = GradientDiagnostics()
    growing.observe(0, {"a": 0.5}, numels, loss=4.6)
    assert growing.observe(50, {"a": 5.0}, numels, loss=2.5) == []
    flat = GradientDiagnostics()
    flat.observe(0, {"a": 0.5}, numels, loss=2.3)
    assert flat.observe(50, {"a": 0.6}, numels, loss=80.0) == []
    no_loss = GradientDiagnostics()
    no_loss.observe(0, {"a": 0.5}, numels)
    assert no_loss.observe(50, {"a": 5.0}, numels) == []
    with pytest.raises(ValueError):
        GradientDiagnostics(blowup_loss_ratio=1.0)


def test_blowup_state_round_trips() -> None:
    """The first loss and each layer's first norm are part of the state: a resumed run names the same layers."""
    numels = {"a": 10}
    a = GradientDiagnostics()
    a.observe(0, {"a": 0.5}, numels, loss=2.3)
    b = GradientDiagnostics()
    b.load_state_dict(a.state_dict())
    assert [v.layer for v in b.observe(50, {"a": 2.0}, numels, loss=9.0)] == ["a"]
    assert a.observe(50, {"a": 2.0}, numels, loss=9.0)[0].message == b.records()["a"]["exploding"]["message"]

"""The loss-climb rollback: a run that has not learned yet and whose loss climbed to several times where it started
is rolled back, its LR cut by the LR guard's factor squared.

Unit tests drive :class:`RollbackTrigger` with chosen loss streams; the plain-loop test trains the outcomes
benchmark's 10-layer tanh MLP at 10x its SGD LR under ``Guard()`` and reads the rollback event, the LR scale and
the final loss back.
"""

from __future__ import annotations

import io
import math
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_gradguard import RollbackTrigger
from lightning_gradguard.recovery.trigger import CLIMB_HORIZON, RollbackDecision

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _feed(trigger: RollbackTrigger, losses: list[float], start: int = 0) -> list[RollbackDecision]:
    return [trigger.update(start + i, loss=v) for i, v in enumerate(losses)]


#: A too-high LR from the first step: the loss climbs from 2.9 and keeps climbing (the digits MLP at 10x its LR).
CLIMBING = [2.88, 3.99, 3.92, 5.46, 4.98, 10.85, 12.31, 7.29, 16.6, 16.41, 12.12, 12.0, 17.86, 21.85, 17.17]


def test_a_loss_that_triples_from_where_the_run_started_fires_with_its_evidence() -> None:
    trigger = RollbackTrigger(runaway_steps=0)  # the climb check alone
    decisions = _feed(trigger, CLIMBING)
    fired = [d for d in decisions if d.rollback]
    assert fired and fired[0].trigger == "loss_climb" and fired[0].step == 12
    d = fired[0]
    # the median of steps 3-12 (12.06; that of steps 8-12 is higher) over the median of the first three losses
    assert d.evidence["start"] == 3.92 and d.evidence["climb"] == pytest.approx(12.06 / 3.92)
    assert "climbed from where the run started" in d.message and "has not learned yet" in d.message
    assert d.first_bad == 3  # the first loss of the window above the start
    # above halfway (2x: steps 1-10 at 2.3x) no snapshot is taken: a climbing state is never saved as a good one
    assert decisions[9].snapshot_ok and not decisions[10].snapshot_ok


@pytest.mark.parametrize(
    ("case", "losses"),
    [
        ("a plateau at the first loss", [0.5 + 0.05 * math.sin(i) for i in range(300)]),
        (
            "an early spike the run came back from (RMSprop at a high LR)",
            [0.673, 26.5, 144.6, 26.6, 11.0, 5.04, 1.035, 1.23, 0.0, 3.08, 0.18, 5.7, 0.35, 0.0, 0.9, 0.02, 0.85],
        ),
        ("a run that learned, then rose far above its start", [2.3] * 5 + [0.5] * 20 + [9.0] * 40),
        ("a negative loss (a log-likelihood)", [-1.0 - 0.1 * i for i in range(50)]),
        ("a climb after the first 100 losses", [2.3] * CLIMB_HORIZON + [9.0] * 30),
    ],
)
def test_no_climb(case: str, losses: list[float]) -> None:
    trigger = RollbackTrigger(runaway_steps=0)
    assert not any(d.rollback for d in _feed(trigger, losses)), case


def test_noisy_stationary_losses_do_not_climb() -> None:
    """Noisy batch losses around a fixed level (a small batch of a regression): the start is the median of the first
    three losses, so one lucky low batch among them does not make the ordinary level look like a climb."""
    rng = random.Random(3)
    for draw in (lambda: rng.lognormvariate(0.0, 0.3), lambda: rng.gauss(2.3, 0.3)):
        for _ in range(50):
            trigger = RollbackTrigger()
            assert not any(trigger.update(i, loss=draw()).rollback for i in range(150))


def test_off_and_validated() -> None:
    assert not any(d.rollback for d in _feed(RollbackTrigger(climb_steps=0, runaway_steps=0), CLIMBING))
    with pytest.raises(ValueError, match=r"`climb_ratio` must be a float > 1, got 1\.0"):
        RollbackTrigger(climb_ratio=1.0)
    with pytest.raises(ValueError, match="`climb_steps` must be an int >= 0, got -1"):
        RollbackTrigger(climb_steps=-1)


def test_a_rollback_restarts_the_watch_and_keeps_the_start() -> None:
    trigger = RollbackTrigger(runaway_steps=0)
    decisions = _feed(trigger, CLIMBING)
    d = next(x for x in decisions if x.rollback)
    trigger.record_rollback(d, restored_to=0)
    state = trigger.state_dict()
    assert state["start"] == [2.88, 3.99, 3.92] and state["climb"] == [] and state["climb_seen"] == 0
    # the next attempt is watched again from its own first losses, against the same start
    again = _feed(trigger, [4.0, 6.0, 9.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0], start=20)
    assert again[-1].rollback and again[-1].trigger == "loss_climb"


def test_state_round_trip_and_a_state_saved_before_the_check() -> None:
    full = RollbackTrigger(runaway_steps=0)
    a = [d.rollback for d in _feed(full, CLIMBING)]
    first = RollbackTrigger(runaway_steps=0)
    b = [d.rollback for d in _feed(first, CLIMBING[:8])]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = RollbackTrigger(runaway_steps=0)
    resumed.load_state_dict(saved)
    b += [d.rollback for d in _feed(resumed, CLIMBING[8:], start=8)]
    assert a == b and resumed.state_dict() == full.state_dict()
    # an older state has no climb fields: they are rebuilt from its loss window (the losses that were not above
    # the runaway threshold)
    older = {k: v for k, v in saved.items() if k not in ("start", "climb", "learned", "climb_seen")}
    rebuilt = RollbackTrigger(runaway_steps=0)
    rebuilt.load_state_dict(older)
    assert rebuilt.state_dict()["start"] == saved["start"] == [2.88, 3.99, 3.92]
    assert rebuilt.state_dict()["climb"] == saved["losses"] and rebuilt.state_dict()["climb_seen"] == len(
        saved["losses"]
    )


def test_the_digits_mlp_at_ten_times_its_lr_is_rolled_back_to_its_start_and_then_learns() -> None:
    """The outcomes benchmark's 10-layer tanh MLP at SGD lr 1 (10x): the loss climbs from 2.9 to 12 within a dozen
    steps, which saturates the tanh units for good (no later LR cut brings the run below chance). The climb rolls it
    back to step 0 and quarters the LR; the run then learns."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_outcomes as bo
    finally:
        sys.path.pop(0)
    from lightning_gradguard import Guard
    from lightning_gradguard.events import GuardEvent

    torch.set_num_threads(1)
    w = bo.WORKLOADS["mlp"]
    steps = 150
    train, val, _ = bo._batches(w, 0, steps, w.batch)
    model, loss_fn = bo._build(w, 0)
    opt = bo._optimizer(w, model.parameters(), 1.0)
    events: list[GuardEvent] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guard = Guard(model, opt, on_event=events.append, incidents=False)
        for batch in train:
            loss = loss_fn(model, batch)
            opt.zero_grad()
            loss.backward()
            guard.before_optimizer_step(loss)
            opt.step()
    rollbacks = [e for e in events if e.kind == "rollback"]
    assert rollbacks and rollbacks[0].evidence["trigger"] == "loss_climb"
    assert rollbacks[0].evidence["restored_to"] == 0 and rollbacks[0].evidence["counted"] == 0
    assert rollbacks[0].evidence["lr_scale_before"] == 1.0 and rollbacks[0].evidence["lr_scale"] == 0.25
    # the LR guard keeps the climb as evidence that the run's loss overshot (the restored detector had not seen it)
    assert guard.engine.lr_guard is not None
    assert guard.engine.lr_guard.state_dict()["peak_loss_ratio"] >= rollbacks[0].evidence["climb"] > 3.0
    with torch.no_grad():
        final = sum(float(loss_fn(model, b)) for b in val) / len(val)
    assert final < 1.0  # chance is 2.30: the run learned

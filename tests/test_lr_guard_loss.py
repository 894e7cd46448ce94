"""The LR guard's loss gate: growing norms with a falling loss are healthy training, not a step size too large."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_gradguard import GradGuard, LRGuard


def _drive(guard: LRGuard, losses: list[float | None]) -> list[int]:
    """Every step presses (norm at the fixed threshold); returns the steps with a reduction."""
    fired = []
    for step, loss in enumerate(losses):
        if guard.update(step=step, norm=1.0, threshold=1.0, loss=loss) is not None:
            fired.append(step)
    return fired


def test_a_falling_loss_holds_the_guard_back() -> None:
    falling = [2.0 * 0.98**i for i in range(200)]
    assert _drive(LRGuard(patience=10, cooldown=0), falling) == []  # type: ignore[arg-type]


def test_a_stalled_or_rising_loss_lets_it_act_with_the_evidence_in_the_message() -> None:
    flat = [1.0 + 0.01 * (i % 3) for i in range(60)]
    guard = LRGuard(patience=10, cooldown=100)
    fired = _drive(guard, flat)  # type: ignore[arg-type]
    assert fired == [19]  # as soon as 2 x patience losses exist to compare
    rising = [1.0 + 0.01 * i for i in range(60)]
    guard = LRGuard(patience=10, cooldown=100)
    reduction = None
    for step, loss in enumerate(rising):
        reduction = reduction or guard.update(step=step, norm=1.0, threshold=1.0, loss=loss)
    assert reduction is not None and "loss is not improving" in str(reduction)
    assert reduction.loss_before is not None and reduction.loss_recent is not None
    assert reduction.loss_recent > reduction.loss_before


def test_a_diverging_loss_acts_on_half_the_evidence_and_through_the_cooldown() -> None:
    # 20 steps at loss 1, then a blow-up to 3 (> 1.5x the median at the start of the horizon).
    losses = [1.0] * 20 + [3.0] * 60
    guard = LRGuard(patience=10, cooldown=100)
    fired = _drive(guard, losses)  # type: ignore[arg-type]
    # 19: flat loss, full patience. The cooldown then holds until the median of the last 10 losses exceeds
    # 1.5x the median of the first 10 (step 24: five losses at 3, median 2); from there every 5 pressing steps
    # (patience // 2) cut the LR again, cooldown or not, while the loss stays diverged: 28, 33, 38, ...
    assert fired[0] == 19
    assert fired[1:4] == [28, 33, 38]
    assert guard.num_reductions == len(fired)
    # a loss that only stalls gets no such fast path: one reduction per cooldown
    assert _drive(LRGuard(patience=10, cooldown=100), [1.0] * 80) == [19]  # type: ignore[arg-type]


def test_without_losses_or_with_the_gate_off_the_norms_alone_decide() -> None:
    assert _drive(LRGuard(patience=10, cooldown=100), [None] * 30) == [9]
    falling = [2.0 * 0.98**i for i in range(30)]
    assert _drive(LRGuard(patience=10, cooldown=100, require_stalled_loss=False), falling) == [9]  # type: ignore[arg-type]


def test_loss_history_survives_state_dict() -> None:
    a = LRGuard(patience=5, cooldown=100)
    _drive(a, [1.0 - 0.01 * i for i in range(7)])  # type: ignore[arg-type]
    b = LRGuard(patience=5, cooldown=100)
    b.load_state_dict(a.state_dict())
    rest: list[float | None] = [1.0] * 20
    assert _drive(a, rest) == _drive(b, rest)


def test_validation() -> None:
    with pytest.raises(TypeError, match="`require_stalled_loss` must be True or False, got 1"):
        LRGuard(require_stalled_loss=1)  # type: ignore[arg-type]


def test_healthy_digits_run_gets_no_lr_reduction_and_few_clips(tmp_path: Path) -> None:
    """The quickstart's healthy run: its gradient norm grows ~5x while the loss falls. Found in review:
    before the loss gate and the auto policy's 4x floor, GradGuard() halved the LR there and clipped 23 %
    of the steps, ending with a worse loss than no guard at all. The auto ceiling (2x the run's first norms)
    holds for its first 80 steps while the norms grow, so most clips fall there; after them, few clips."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        from quickstart import DigitsClassifier, digits_loader
    finally:
        sys.path.pop(0)

    class Losses(Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args) -> None:  # type: ignore[no-untyped-def]
            self.values.append(float(outputs["loss"]))

    def run(callbacks: list[Callback]) -> float:
        L.seed_everything(0, verbose=False)
        losses = Losses()
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=2,
            logger=False,
            callbacks=[losses, *callbacks],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(DigitsClassifier(), digits_loader())
        last_epoch = losses.values[-57:]
        return sum(last_epoch) / len(last_epoch)

    guard = GradGuard(histogram_every_n_steps=0, diagnostics=False)
    guarded, plain = run([guard]), run([])
    assert guard.lr_scale == 1.0
    assert guard.clipped_steps <= 80 + 0.08 * (114 - 80)  # nearly all in the 80 held steps
    assert guarded <= plain * 1.1

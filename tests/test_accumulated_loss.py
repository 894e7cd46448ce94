"""With gradient accumulation, ``gradguard/loss`` (and what the LR guard and recovery read) is the mean
training loss of the optimizer step's micro-batches, as ``training_step`` returned them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gradguard import GradGuard
from lightning_gradguard.keys import tag
from tests._models import TinyRegressor, make_trainer, read_events, scalars


class RecordingRegressor(TinyRegressor):
    """Records the loss of every micro-batch with the optimizer step it belongs to."""

    def __init__(self, manual: bool = False, accumulate: int = 1) -> None:
        super().__init__(n=96, batch_size=8)
        self.losses: dict[int, list[float]] = {}
        self.automatic_optimization = not manual
        self.accumulate = accumulate

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        self.losses.setdefault(self.trainer.global_step, []).append(float(loss.detach()))
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        self.manual_backward(loss)  # the user's loss, not divided by Lightning
        if (batch_idx + 1) % self.accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
        return None


@pytest.mark.parametrize("accumulate", [1, 4])
def test_logged_loss_is_the_mean_of_the_micro_batch_losses(accumulate: int, tmp_path: Path) -> None:
    model, guard = RecordingRegressor(), GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0)
    trainer = make_trainer(tmp_path, [guard], max_steps=3, accumulate_grad_batches=accumulate)
    trainer.fit(model)
    logged = scalars(read_events(tmp_path / "run" / "version_0"), tag("loss"))
    assert sorted(model.losses) == [0, 1, 2] and all(len(v) == accumulate for v in model.losses.values())
    # the logged step is the global step after the optimizer step
    for step, micro in model.losses.items():
        assert logged[step] == pytest.approx(sum(micro) / len(micro), rel=1e-6)
    assert guard.last_outcome is not None
    assert guard.last_outcome.loss == pytest.approx(sum(model.losses[2]) / accumulate, rel=1e-6)


def test_manual_optimization_loss_is_not_rescaled(tmp_path: Path) -> None:
    model, guard = RecordingRegressor(manual=True, accumulate=2), GradGuard(heatmap_every_n_steps=0)
    trainer = make_trainer(tmp_path, [guard], max_steps=2, accumulate_grad_batches=1)
    trainer.fit(model)
    logged = scalars(read_events(tmp_path / "run" / "version_0"), tag("loss"))
    for step, micro in model.losses.items():
        assert len(micro) == 2 and logged[step] == pytest.approx(sum(micro) / 2, rel=1e-6)

"""Whole-state recovery in a real Trainer: module buffers, other callbacks' state, every optimizer, the cause.

Each test trains a small model the way a user would (a CNN with BatchNorm, Lightning's EMA weight
averaging, manual optimization with two optimizers, an Adam regression hit by a hardware-style fault, a
run whose loss spikes again and again in its first steps, a backbone unfrozen by BackboneFinetuning) and
reads back what it claims: the buffers, the averaged weights, the optimizer's param groups and state, the
rollback history, the LR scale and the loss.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, RollbackTrigger
from lightning_gradguard.events import GuardEvent

from ._models import make_trainer, regression_data, weights


def _fit(tmp: Path, model: L.LightningModule, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    trainer = make_trainer(tmp, callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return trainer


def _finite(tensors: Any) -> bool:
    return all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point())


# ------------------------------------------------------------------------------------------ BatchNorm buffers
class BatchNormCNN(L.LightningModule):
    """A small CNN with BatchNorm on 8x8 images; ``nan_sample_at`` puts NaN into one sample of that step's batch."""

    def __init__(self, nan_sample_at: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)
        )
        self.nan_sample_at = nan_sample_at
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(128, 1, 8, 8, generator=g), torch.randint(0, 3, (128,), generator=g)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.trainer.global_step in self.nan_sample_at:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


class BufferProbe(Callback):
    """Copies the BatchNorm statistics at the start and at the end of one optimizer step's batch."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def _buffers(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {name: b.detach().clone() for name, b in pl_module.named_buffers()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            self.before = self._buffers(pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step == self.step + 1:  # the step has been taken (or skipped)
            self.after = self._buffers(pl_module)


def test_a_step_skipped_for_a_nan_sample_leaves_batchnorm_statistics_as_they_were(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, probe, guard = BatchNormCNN(nan_sample_at=(5,)), BufferProbe(5), GradGuard(histogram_every_n_steps=0)
    _fit(tmp_path, model, [probe, guard], max_steps=12)
    assert guard.skipped_steps == 1 and guard.rollbacks_total == 0
    bn = model.net[1]
    assert probe.before and all(torch.equal(probe.before[k], probe.after[k]) for k in probe.before)
    assert _finite([bn.running_mean, bn.running_var]) and _finite(model.parameters())
    model.eval()
    with torch.no_grad():
        assert bool(model.net(model.x).isfinite().all())  # eval-mode predictions use the running statistics


class CorruptBuffer(Callback):
    """At the start of one optimizer step, BatchNorm's running variance turns into NaN (gradients stay finite)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            pl_module.net[1].running_var[0] = float("nan")


def test_non_finite_buffers_with_finite_gradients_are_detected_repaired_and_the_step_skipped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, guard = BatchNormCNN(), GradGuard(histogram_every_n_steps=0)
    events: list[str] = []
    guard.on_event = lambda event: events.append(event.message)
    _fit(tmp_path, model, [CorruptBuffer(6), guard], max_steps=12)
    bn = model.net[1]
    assert _finite([bn.running_mean, bn.running_var])
    assert guard.skipped_steps == 1 and guard.rollbacks_total == 0
    assert any("step 6: non-finite module buffers" in m for m in events), events


# ------------------------------------------------------------------------------------------ other callbacks
class CorruptWeight(Callback):
    def __init__(self, steps: tuple[int, ...], layer: str = "net.0.weight") -> None:
        self.steps, self.layer = steps, layer

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step in self.steps:
            with torch.no_grad():
                dict(pl_module.named_parameters())[self.layer].view(-1)[0] = float("nan")


class Regressor(L.LightningModule):
    """The regression MLP (three hidden layers of 32 ReLU units; targets with variance about 16)."""

    def __init__(self, lr: float = 3e-3, optimizer: str = "adam") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
        )
        self.lr, self.optimizer_name = lr, optimizer
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1024, 8, generator=g)
        w = torch.randn(8, 1, generator=g)
        y = x @ w + torch.sin(2 * x[:, :1]) * 2
        self.x, self.y = x, 4 * y / y.std()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "rmsprop":
            return torch.optim.RMSprop(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32, shuffle=True)

    def full_loss(self) -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(self.net(self.x), self.y))


def test_ema_weight_averaging_is_rolled_back_with_the_model(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    torch.manual_seed(0)
    model, ema = Regressor(), EMAWeightAveraging(decay=0.9)
    guard = GradGuard(snapshot_every_n_steps=10, histogram_every_n_steps=0)
    _fit(tmp_path, model, [CorruptWeight((11,)), ema, guard], max_steps=30)
    history = [(r.step, r.trigger, r.restored_to) for r in guard._recovery.trigger.history]  # type: ignore[union-attr]
    assert history == [(13, "nonfinite_grad", 10)]
    assert ema._average_model is not None and _finite(ema._average_model.parameters())
    assert _finite(model.parameters())  # after fit the model holds the averaged weights
    assert math.isfinite(model.full_loss())


# ------------------------------------------------------------------------------------------ every optimizer
class TwoOptimizers(L.LightningModule):
    """Manual optimization: two regressors, each with its own Adam, stepped one after the other."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.b = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(512, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        for net, opt in zip((self.a, self.b), self.optimizers(), strict=True):  # type: ignore[arg-type]
            loss = nn.functional.mse_loss(net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.a.parameters(), lr=1e-2), torch.optim.Adam(self.b.parameters(), lr=1e-2)]

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


def test_a_nan_weight_of_the_second_optimizer_rolls_back_every_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, guard = TwoOptimizers(), GradGuard(snapshot_every_n_steps=4, histogram_every_n_steps=0)
    # global_step counts both optimizers' steps under manual optimization: 2 per batch
    _fit(tmp_path, model, [CorruptWeight((20,), layer="b.0.weight"), guard], max_steps=60)
    history = guard._recovery.trigger.history  # type: ignore[union-attr]
    assert len(history) == 1 and history[0].trigger == "nonfinite_grad"
    assert history[0].restored_to < 10  # optimizer 0's step of the batch before the fault
    assert _finite(model.parameters())
    with torch.no_grad():
        assert float(nn.functional.mse_loss(model.b(model.x), model.y)) < float(model.y.var())


# ------------------------------------------------------------------------------------------ the cause decides
def test_a_nan_weight_after_a_healthy_history_is_restored_recently_without_an_lr_cut(tmp_path: Path) -> None:
    torch.manual_seed(0)
    clean, clean_guard = Regressor(), GradGuard(histogram_every_n_steps=0)
    _fit(tmp_path / "clean", clean, [clean_guard], max_steps=192)
    torch.manual_seed(0)
    model, guard = Regressor(), GradGuard(histogram_every_n_steps=0)
    _fit(tmp_path / "fault", model, [CorruptWeight((40,)), guard], max_steps=192)
    (record,) = guard._recovery.trigger.history  # type: ignore[union-attr]
    assert record.trigger == "nonfinite_grad" and record.step == 42 and record.restored_to == 32  # a recent slot
    assert guard.lr_scale == clean_guard.lr_scale  # no LR cut for a non-finite fault
    loss, clean_loss = model.full_loss(), clean.full_loss()
    assert math.isfinite(loss) and loss < 2 * clean_loss, (loss, clean_loss)


class Spiky(Regressor):
    """The loss is multiplied by 100 over chosen step ranges: the same early spike, met again after each restore."""

    def __init__(self, spikes: tuple[range, ...]) -> None:
        super().__init__(lr=1e-3, optimizer="rmsprop")
        self.spikes = spikes

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * 100 if any(self.trainer.global_step in r for r in self.spikes) else loss


def test_an_early_spike_met_again_after_each_restore_never_stops_the_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spikes = (range(6, 14), range(18, 26), range(30, 38), range(42, 50), range(54, 62))
    model, guard = Spiky(spikes), GradGuard(rollback=RollbackTrigger(max_rollbacks=1), histogram_every_n_steps=0)
    events: list[str] = []
    guard.on_event = lambda event: events.append(event.message)
    _fit(tmp_path, model, [guard], max_steps=150)  # finishes: no RecoveryError
    assert guard.rollbacks_total >= 1 and _finite(model.parameters())
    assert any(m.startswith("no rollback at step") for m in events), events
    assert math.isfinite(model.full_loss())


class _Finetune(L.LightningModule):
    """A backbone and a head; the optimizer starts with the head only (BackboneFinetuning's contract)."""

    def __init__(self, nan_at_steps: tuple[int, ...]) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.nan_at_steps = nan_at_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.trainer.global_step in self.nan_at_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(regression_data(64, 8), batch_size=8)  # 8 steps per epoch


@pytest.mark.parametrize(
    ("nan_at", "restored_to"),
    [
        # the unfreeze (epoch 1 = step 8) is followed at once by the blow-up: the newest snapshot (an early
        # capture at step 4) predates the backbone's param group, which the restore keeps
        ((8, 9, 10), 4),
        # a healthy step after the unfreeze: the new group makes it a snapshot step
        ((10, 11, 12), 8),
    ],
)
def test_rollback_after_backbone_unfreeze(tmp_path: Path, nan_at: tuple[int, ...], restored_to: int) -> None:
    torch.manual_seed(0)
    model = _Finetune(nan_at)
    seen: list[dict[str, Any]] = []
    at_step: dict[int, dict[str, torch.Tensor]] = {}

    class _Record(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            at_step.setdefault(trainer.global_step, weights(model))

    def on_event(event: GuardEvent) -> None:
        if event.kind == "rollback":
            opt = model.trainer.optimizers[0]
            backbone = [p for g in opt.param_groups[1:] for p in g["params"]]
            seen.append(
                {
                    "evidence": dict(event.evidence),
                    "weights": weights(model),
                    "groups": len(opt.param_groups),
                    "backbone_state": [bool(opt.state.get(p)) for p in backbone],
                }
            )

    guard = GradGuard(snapshot_every_n_steps=1000, on_event=on_event)
    trainer = make_trainer(
        tmp_path, [_Record(), BackboneFinetuning(unfreeze_backbone_at_epoch=1), guard], max_epochs=3, logger=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    assert guard.rollbacks_total == 1
    (rb,) = seen
    assert rb["evidence"]["restored_to"] == restored_to
    assert rb["groups"] == 2  # the backbone's group stays in the optimizer
    # the weights are those the snapshot step started from (the step's own update comes after the capture)
    for name, value in at_step[restored_to].items():
        torch.testing.assert_close(rb["weights"][name], value, rtol=0, atol=0)
    # the backbone group's optimizer state is as at the capture: none yet (AdamW creates it at the step)
    assert rb["backbone_state"] == [False, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())

"""LR guard inside a real Trainer: every scheduler keeps the reduced LR; a too-high LR is rescued."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard.decide.lr_guard import LRGuard
from lightning_gradguard.frontends.lightning import GradGuard

STEPS = 40
BATCHES_PER_EPOCH = 4


class _RecordingSGD(torch.optim.Optimizer):
    """Plain SGD that records the LR of each group it actually applies (after running the closure)."""

    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})
        self.used: list[list[float]] = []

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        self.used.append([float(g["lr"]) for g in self.param_groups])
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-float(group["lr"]))
        return loss


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5, 20], gamma=0.3),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=1e-5),
    "LambdaLR-warmup": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 6)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[0.02, 0.002], total_steps=STEPS + 5, cycle_momentum=False
    ),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
}


class _Model(LightningModule):
    def __init__(self, sched: str, interval: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 1)
        self.sched, self.interval = sched, interval

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.log("const", 1.0, on_step=True, on_epoch=False)  # a metric that never improves
        return torch.nn.functional.mse_loss(self.b(torch.tanh(self.a(x))), y)

    def configure_optimizers(self) -> Any:
        opt = _RecordingSGD(
            [{"params": self.a.parameters(), "lr": 0.01}, {"params": self.b.parameters(), "lr": 0.001}], lr=0.01
        )
        config = {"scheduler": SCHEDULERS[self.sched](opt), "interval": self.interval, "monitor": "const"}
        return {"optimizer": opt, "lr_scheduler": config}


class _Recorder(Callback):
    def __init__(self, gg: GradGuard) -> None:
        self.gg = gg
        self.scales: list[float] = []
        self.after: list[list[float]] = []

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.scales.append(self.gg.lr_scale)
        self.after.append([float(g["lr"]) for g in trainer.optimizers[0].param_groups])


def _fit(sched: str, interval: str, guarded: bool) -> tuple[list[list[float]], _Recorder]:
    # max_norm far below every norm: every step is clipped, so every step approaches the threshold.
    lr_guard: bool | LRGuard = (
        LRGuard(patience=3, cooldown=10, rise_ratio=None, require_stalled_loss=False) if guarded else False
    )
    gg = GradGuard(
        clip="fixed",
        max_norm=1e-3,
        lr_guard=lr_guard,
        diagnostics=False,
        histogram_every_n_steps=0,
        heatmap_every_n_steps=0,
    )
    rec = _Recorder(gg)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(8 * BATCHES_PER_EPOCH, 4, generator=g), torch.randn(8 * BATCHES_PER_EPOCH, 1))
    model = _Model(sched, interval)
    trainer = Trainer(
        max_steps=STEPS,
        callbacks=[gg, rec],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(data, batch_size=8))
    opt = trainer.optimizers[0]
    assert isinstance(opt, _RecordingSGD)
    return opt.used, rec


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_trainer_effective_lr_is_scale_times_scheduler_lr(sched: str, interval: str) -> None:
    ref_used, ref = _fit(sched, interval, guarded=False)
    used, rec = _fit(sched, interval, guarded=True)
    assert len(used) == len(ref_used) == STEPS
    # patience 3, cooldown 10, every step pressing: reductions at steps 2, 15 and 28
    expected = [1.0] * 2 + [0.5] * 13 + [0.25] * 13 + [0.125] * 12
    assert rec.scales == expected
    for step in range(STEPS):
        assert used[step] == pytest.approx([expected[step] * lr for lr in ref_used[step]], rel=1e-9), step
        assert used[step][0] / used[step][1] == pytest.approx(ref_used[step][0] / ref_used[step][1], rel=1e-9)
        # outside optimizer.step the groups hold the scheduler's own LRs
        assert rec.after[step] == pytest.approx(ref.after[step], rel=1e-12), step
    assert len({tuple(a) for a in ref.after}) >= 2, "the schedule never moved"


class _Regression(LightningModule):
    """Full-batch least squares; the Hessian's top eigenvalue is ~2.8, so SGD diverges above lr ~0.7."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Linear(10, 1)
        self.lr = lr
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.w(x), y)
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fit_regression(
    lr_guard: bool, rollback: bool = False, clip: Any = "auto"
) -> tuple[list[float], GradGuard, list[str]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 10, generator=g)
    y = x @ torch.randn(10, 1, generator=g) + 0.1 * torch.randn(256, 1, generator=g)
    # Recovery off: this is the LR guard's own rescue (with defaults a rollback acts first, see test_recovery_trainer).
    gg = GradGuard(
        clip=clip,
        lr_guard=lr_guard,
        diagnostics=False,
        histogram_every_n_steps=0,
        heatmap_every_n_steps=0,
        rollback=rollback,
    )
    model = _Regression(lr=0.9)
    trainer = Trainer(
        max_steps=300,
        callbacks=[gg],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=256))
    return model.losses, gg, [str(w.message) for w in caught]


def test_too_high_lr_is_rescued() -> None:
    losses, gg, messages = _fit_regression(lr_guard=True)
    base_losses, base, _ = _fit_regression(lr_guard=False)
    assert gg.lr_scale < 1.0 and base.lr_scale == 1.0
    reductions = [m for m in messages if "LR guard" in m]
    assert reductions, messages
    assert "approached the clip threshold" in reductions[0] and "LR 0.9 -> 0.45" in reductions[0]
    final, base_final = sum(losses[-20:]) / 20, sum(base_losses[-20:]) / 20
    assert final < 0.1 * base_final, (final, base_final)
    assert final < 0.05  # the noise floor is 0.01

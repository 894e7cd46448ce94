"""Diagnostics in real training runs: textbook nets, an injected exploding layer, layers frozen by mistake or
during training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard

from ._models import TinyRegressor, make_trainer


def _mlp(depth: int, width: int, kind: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    dims = [32] + [width] * (depth - 1)
    for i in range(depth - 1):
        linear = nn.Linear(dims[i], dims[i + 1])
        if kind == "sigmoid":
            layers += [linear, nn.Sigmoid()]
        else:  # BatchNorm + ReLU + Kaiming init
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            layers += [linear, nn.BatchNorm1d(dims[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 32, generator=g)
        y = (x[:, :10].argmax(dim=1)).long()
        return DataLoader(TensorDataset(x, y), batch_size=32)


def _train(
    tmp_path: Path, model: L.LightningModule, steps: int = 12, **guard_kwargs: Any
) -> tuple[GradGuard, L.Trainer]:
    L.seed_everything(0, verbose=False)
    guard = GradGuard(log_every_n_steps=2, histogram_every_n_steps=4, **guard_kwargs)
    trainer = make_trainer(tmp_path, [guard], max_steps=steps)
    trainer.fit(model)
    return guard, trainer


def _layers(guard: GradGuard, kind: str) -> set[str]:
    return {v.layer for v in guard.verdicts if v.kind == kind}


def test_deep_sigmoid_net_gets_its_early_layers_named_vanishing(sigmoid_run: tuple[GradGuard, L.Trainer]) -> None:
    guard, _ = sigmoid_run
    vanishing = _layers(guard, "vanishing")
    assert "net.0" in vanishing  # the first Linear
    assert "net.18" not in vanishing  # the last Linear (10th) is healthy
    verdict = next(v for v in guard.verdicts if v.layer == "net.0" and v.kind == "vanishing")
    assert "net.0" in verdict.message and verdict.remedy  # names the layer, suggests a remedy


def test_same_depth_with_batchnorm_relu_kaiming_gets_no_verdict(tmp_path: Path) -> None:
    guard, _ = _train(tmp_path, Classifier(_mlp(10, 64, "bn_relu")))
    assert guard.verdicts == []


def test_injected_exploding_layer_is_named(tmp_path: Path) -> None:
    model = Classifier(_mlp(3, 32, "bn_relu"))
    target = model.net[3]  # the second Linear

    class Blowup(L.Callback):
        def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.global_step == 8:
                target.weight.grad.mul_(1e5)  # type: ignore[union-attr]

    L.seed_everything(0, verbose=False)
    guard = GradGuard(log_every_n_steps=1, diagnose_every_n_steps=1, histogram_every_n_steps=0, clip=None)
    make_trainer(tmp_path, [Blowup(), guard], max_steps=10).fit(model)
    exploding = [v for v in guard.verdicts if v.kind == "exploding"]
    assert [v.layer for v in exploding] == ["net.3"] and exploding[0].step == 8


def test_layer_frozen_by_mistake_is_named_dead(tmp_path: Path) -> None:
    class Detached(Classifier):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            x, y = batch
            hidden = self.net[0](x).detach()  # the bug: the first layer never receives a gradient
            return nn.functional.cross_entropy(self.net[2](torch.relu(hidden)), y)

    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    guard, _ = _train(tmp_path, Detached(net), steps=6)
    assert _layers(guard, "dead") == {"net.0"}


class FreezeAt(Callback):
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 4:
            pl_module.net[0].requires_grad_(False)


def test_a_layer_frozen_during_training_is_not_called_dead(tmp_path: Path) -> None:
    guard = GradGuard(histogram_every_n_steps=0, log_every_n_steps=1)
    make_trainer(tmp_path, [FreezeAt(), guard], max_steps=12, logger=False).fit(TinyRegressor(n=256))
    assert [(v.kind, v.layer) for v in guard.verdicts if v.kind == "dead"] == []
    assert guard.last_outcome is not None and guard.last_outcome.stats.layer_norms()["net.0"] == 0.0

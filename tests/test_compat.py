"""The private internals GradGuard reads, and the fallbacks when they are missing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lightning_gradguard import _compat


def test_foreach_norm_and_mul_fall_back_without_the_fused_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)]
    fused = [t.item() for t in _compat.foreach_norm(tensors, torch.float32)]
    monkeypatch.delattr(torch, "_foreach_norm")
    monkeypatch.delattr(torch, "_foreach_mul_")
    assert [t.item() for t in _compat.foreach_norm(tensors, torch.float32)] == fused == [5.0, 1.0]
    _compat.foreach_mul_(tensors, 0.5)
    assert tensors[0].tolist() == [1.5, 2.0] and tensors[1][0, 0].item() == 0.5


def test_strategy_kind_by_isinstance_not_by_name() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    class MyFSDPStrategyLookalike(DDPStrategy):  # a name that a substring test would have misread
        pass

    assert _compat.strategy_kind(FSDPStrategy()) == "fsdp1"
    assert _compat.strategy_kind(MyFSDPStrategyLookalike()) == "other"
    assert _compat.strategy_kind(SimpleNamespace()) == "other"


def test_should_accumulate_reads_lightning_and_defaults_to_false() -> None:
    loop = SimpleNamespace(_should_accumulate=lambda: True)
    assert _compat.should_accumulate(SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop)))
    assert not _compat.should_accumulate(SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=object())))


def test_scaler_scale_and_stage() -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    assert _compat.scaler_scale(None) is None and not _compat.grads_still_scaled(None, optimizer)
    scaler.scale(model(torch.ones(1, 2)).sum()).backward()
    scale = _compat.scaler_scale(scaler)
    assert scale is not None and scale.item() == 8.0
    assert _compat.grads_still_scaled(scaler, optimizer)
    scaler.unscale_(optimizer)
    assert not _compat.grads_still_scaled(scaler, optimizer)
    assert not _compat.grads_still_scaled(torch.amp.GradScaler("cpu", enabled=False), optimizer)
    assert not _compat.steps_scaled_gradients(optimizer)
    assert _compat.steps_scaled_gradients(torch.optim.AdamW(model.parameters(), fused=True))


def test_unwrap_model_and_optimizer() -> None:
    model = torch.nn.Linear(2, 1)
    assert _compat.unwrap_model(torch.nn.DataParallel(model)) is model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _compat.unwrap_optimizer(optimizer) is optimizer

"""The private internals of torch and Lightning GradGuard uses, each behind one helper."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lightning_gradguard import _compat


def test_foreach_helpers_match_the_per_tensor_operations() -> None:
    tensors = [torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)]
    assert [t.item() for t in _compat.foreach_norm(tensors, torch.float32)] == [5.0, 1.0]
    copies = _compat.foreach_mul(tensors, 1.0)
    assert all(c is not t and torch.equal(c, t) for c, t in zip(copies, tensors, strict=True))
    _compat.foreach_mul_(tensors, 0.5)
    assert tensors[0].tolist() == [1.5, 2.0] and tensors[1][0, 0].item() == 0.5
    _compat.foreach_sub_(copies, tensors)
    assert copies[0].tolist() == [1.5, 2.0]
    _compat.foreach_copy_(copies, tensors)
    assert all(torch.equal(c, t) for c, t in zip(copies, tensors, strict=True))


def test_persistent_buffers_leave_out_non_persistent_and_children() -> None:
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    model.register_buffer("kept", torch.ones(1))
    model.register_buffer("scratch", torch.zeros(1), persistent=False)
    model.register_buffer("unset", None)
    assert _compat.persistent_buffers(model) == [model.kept]
    bn = model[0]
    assert _compat.persistent_buffers(bn) == [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def test_bound_log_methods_are_dropped() -> None:
    from lightning.pytorch.callbacks import Callback

    callback = Callback()
    callback.log = print  # type: ignore[attr-defined]
    _compat.drop_bound_log_methods(callback)
    _compat.drop_bound_log_methods(callback)  # nothing bound: nothing to drop
    assert "log" not in callback.__dict__ and "log_dict" not in callback.__dict__


def test_strategy_kind_by_isinstance_not_by_name() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    class MyFSDPStrategyLookalike(DDPStrategy):  # a name that a substring test would have misread
        pass

    assert _compat.strategy_kind(FSDPStrategy()) == "fsdp1"
    assert _compat.strategy_kind(MyFSDPStrategyLookalike()) == "other"
    assert _compat.strategy_kind(SimpleNamespace()) == "other"


def test_should_accumulate_reads_the_epoch_loop() -> None:
    for answer in (True, False):
        loop = SimpleNamespace(_should_accumulate=lambda answer=answer: answer)
        assert _compat.should_accumulate(SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=loop))) is answer


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

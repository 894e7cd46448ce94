"""The Lightning callback, Fabric and a plain PyTorch loop take bit-identical decisions on the same gradients.

Same initial weights, same batches, an LR too high for the model (clipping and the LR guard act) and
one poisoned batch (a non-finite step is skipped): every step's threshold, clip coefficient, clipped
and skipped flags, LR scale, and the final weights must match bit for bit.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric import Fabric
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import FabricGuard, GradGuard, Guard, LRGuard, StepOutcome

STEPS, LR, POISONED = 40, 2.0, 13
ROOT = Path(__file__).resolve().parents[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def _loader() -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    return DataLoader(TensorDataset(x, torch.sin(x @ torch.randn(16, 1, generator=g))), batch_size=32)


def _options() -> dict[str, Any]:
    return {"max_norm": 1.0, "lr_guard": LRGuard(patience=3, cooldown=10), "log_every_n_steps": 5}


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
    loss = nn.functional.mse_loss(model(x), y)
    return loss * math.inf if step == POISONED else loss


def _record(outcome: StepOutcome | None, lr_scale: float) -> tuple[Any, ...]:
    assert outcome is not None
    return (outcome.step, outcome.global_norm, outcome.threshold, outcome.coefficient, outcome.clipped,
            outcome.skipped, lr_scale)  # fmt: skip


def _batches(loader: Any) -> Any:
    step = 0
    while True:
        for batch in loader:
            yield step, batch
            step += 1


def run_plain() -> tuple[list[tuple[Any, ...]], list[torch.Tensor]]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    guard = Guard(model, optimizer, **_options())
    records = []
    for step, (x, y) in _batches(_loader()):
        if step == STEPS:
            break
        loss = _loss(model, x, y, step)
        loss.backward()
        outcome = guard.before_optimizer_step(loss)
        optimizer.step()
        optimizer.zero_grad()
        records.append(_record(outcome, guard.lr_scale))
    return records, [p.detach().clone() for p in model.parameters()]


def run_fabric() -> tuple[list[tuple[Any, ...]], list[torch.Tensor]]:
    fabric = Fabric(accelerator="cpu", devices=1)
    module = _model()
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=LR))
    guard = FabricGuard(fabric, model, optimizer, **_options())
    records = []
    for step, (x, y) in _batches(fabric.setup_dataloaders(_loader())):
        if step == STEPS:
            break
        loss = _loss(model, x, y, step)
        fabric.backward(loss)
        guard.before_optimizer_step(loss)
        optimizer.step()
        optimizer.zero_grad()
        records.append(_record(guard.last_outcome, guard.lr_scale))
    return records, [p.detach().clone() for p in module.parameters()]


class _Lit(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return _loss(self.net, *batch, step=self.trainer.global_step)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        return _loader()


class _Recorder(Callback):
    def __init__(self, guard: GradGuard) -> None:
        self.guard, self.records = guard, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.records.append(_record(self.guard.last_outcome, self.guard.lr_scale))


def run_callback() -> tuple[list[tuple[Any, ...]], list[torch.Tensor]]:
    lit = _Lit()
    guard = GradGuard(**_options())
    recorder = _Recorder(guard)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, recorder],
    )
    trainer.fit(lit)
    return recorder.records, [p.detach().clone() for p in lit.net.parameters()]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_callback_fabric_and_plain_loop_decide_bit_identically() -> None:
    plain, plain_weights = run_plain()
    fabric, fabric_weights = run_fabric()
    callback, callback_weights = run_callback()
    assert len(plain) == STEPS
    # The scenario exercises every decision: clipping, a skipped step, an LR reduction.
    assert sum(r[4] for r in plain) >= 10 and [r[0] for r in plain if r[5]] == [POISONED]
    assert plain[-1][6] < 1.0
    assert plain == fabric == callback  # floats compared with ==: bit for bit
    for a, b, c in zip(plain_weights, fabric_weights, callback_weights, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.isfinite(torch.cat([w.reshape(-1) for w in plain_weights])).all()


def test_fabric_example_clips_lowers_the_lr_and_logs_to_tensorboard(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import fabric_loop
    finally:
        sys.path.remove(str(ROOT / "examples"))
    with pytest.warns(UserWarning, match="GradGuard: LR guard"):
        guard = fabric_loop.main(["--steps", "30", "--logdir", str(tmp_path)])
    assert guard.clipped_steps >= 5 and guard.lr_scale == 0.5 and guard.skipped_steps == 0
    (event_file,) = (tmp_path / "fabric_loop").rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    norms = acc.Scalars("gradguard/global_norm")
    assert [e.step for e in norms] == [0, 10, 20, 29]  # log_every_n_steps=10, plus the end-of-training log
    assert [e.value for e in acc.Scalars("gradguard/lr_scale")][-1] == 0.5
    texts = [t.tensor_proto.string_val[0] for t in acc.Tensors("gradguard/events/text_summary")]
    assert any(b"LR guard" in t for t in texts)  # the LR reduction, as TensorBoard text


def _amp_run(unscale_first: bool, poison: int | None = None) -> tuple[list[StepOutcome], list[torch.Tensor]]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = Guard(model, optimizer, scaler=scaler, **_options())
    outcomes = []
    for step, (x, y) in _batches(_loader()):
        if step == 12:
            break
        loss = nn.functional.mse_loss(model(x), y) * (math.inf if step == poison else 1.0)
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(optimizer)
        outcomes.append(guard.before_optimizer_step(loss))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    return outcomes, [p.detach().clone() for p in model.parameters()]


def test_grad_scaler_with_or_without_unscale_gives_the_same_decisions() -> None:
    unscaled, weights_a = _amp_run(unscale_first=True)
    scaled, weights_b = _amp_run(unscale_first=False)
    assert sum(o.clipped for o in unscaled) >= 3
    for a, b in zip(unscaled, scaled, strict=True):
        assert math.isclose(a.global_norm, b.global_norm, rel_tol=1e-6)  # the guard divided by the scale
        assert (a.clipped, a.skipped, a.threshold) == (b.clipped, b.skipped, b.threshold)
    for a, b in zip(weights_a, weights_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _plain_steps(model: nn.Module, optimizer: torch.optim.Optimizer, guard: Guard, steps: range) -> list[Any]:
    records = []
    batches = dict(_batches_upto(_loader(), steps.stop))
    for step in steps:
        x, y = batches[step]
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        records.append(_record(guard.before_optimizer_step(loss), guard.lr_scale))
        optimizer.step()
        optimizer.zero_grad()
    return records


def _batches_upto(loader: Any, stop: int) -> Any:
    for step, batch in _batches(loader):
        if step == stop:
            return
        yield step, batch


def test_guard_state_resumes_exactly_and_reads_the_callback_format() -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    full = _plain_steps(model, optimizer, Guard(model, optimizer, **_options()), range(24))

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    guard = Guard(model, optimizer, **_options())
    first = _plain_steps(model, optimizer, guard, range(12))
    saved = torch.load(_roundtrip(guard.state_dict()), weights_only=True)
    assert saved["version"] == 3 and saved["guards"]["0"]["counters"]["steps"] == 12
    guard.close()
    resumed = Guard(model, optimizer, **_options())
    resumed.load_state_dict(saved)
    rest = _plain_steps(model, optimizer, resumed, range(12, 24))
    assert repr(first + rest) == repr(full) and full[-1][6] < 1.0  # LR reduced before the save


def test_guard_reads_the_callbacks_state() -> None:
    lit, callback = _Lit(), GradGuard(**_options())
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(lit)
    saved = callback.state_dict()
    assert saved["guards"]["0"]["counters"]["steps"] == 12 and callback.clipped_steps > 0
    guard = Guard(lit, torch.optim.SGD(lit.parameters(), lr=LR), **_options())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report: same layers, same configuration
        guard.load_state_dict(saved)
    assert guard.engine.state_dict() == saved["guards"]["0"]


def _roundtrip(state: dict[str, Any]) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer

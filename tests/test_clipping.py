"""Clipping inside a real Trainer: parity with ``clip_grad_norm_``, AMP, bf16, manual optimization, complex
parameters, parameters unfrozen during training (also in a plain loop), conflicts."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, GradGuardError
from lightning_gradguard.keys import tag

from ._models import GradRecorder, TinyRegressor, make_trainer, read_events, regression_data, scalars, weights


def _fit(tmp_path: Path, callbacks: list[Callback], model: L.LightningModule, **kwargs: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(model)
    return trainer


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fixed_policy_matches_gradient_clip_val_and_clip_grad_norm(tmp_path: Path, optimizer: str) -> None:
    max_norm, steps = 0.05, 8
    L.seed_everything(0, verbose=False)
    init = TinyRegressor(optimizer=optimizer)
    a, b, c = copy.deepcopy(init), copy.deepcopy(init), copy.deepcopy(init)
    guard = GradGuard(clip="fixed", max_norm=max_norm, lr_guard=False)
    _fit(tmp_path / "a", [guard], a, max_steps=steps)
    _fit(tmp_path / "b", [], b, max_steps=steps, gradient_clip_val=max_norm)
    # by hand, with torch only
    opt = c.configure_optimizers()
    batches = iter(c.train_dataloader())
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        nn.functional.mse_loss(c.net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(c.parameters(), max_norm)
        opt.step()
    assert guard.clipped_steps == steps  # the threshold is low enough to clip every step
    for key, value in weights(a).items():
        torch.testing.assert_close(value, weights(b)[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(value, weights(c)[key], rtol=1e-6, atol=1e-7)


def test_clipping_scales_only_when_above_threshold_and_logs_it(tmp_path: Path) -> None:
    dry = GradRecorder()
    _fit(tmp_path / "dry", [dry], TinyRegressor(lr=0.01), max_steps=6)
    max_norm = sorted(dry.global_norms)[3]  # a threshold that some steps exceed and some do not
    before, after = GradRecorder(), GradRecorder()
    guard = GradGuard(clip="fixed", max_norm=max_norm, lr_guard=False, log_every_n_steps=1, histogram_every_n_steps=0)
    trainer = _fit(tmp_path, [before, guard, after], TinyRegressor(lr=0.01), max_steps=6)
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    clipped, post = scalars(acc, tag("clipped")), scalars(acc, tag("post_clip_norm"))
    assert list(scalars(acc, tag("threshold")).values()) == [pytest.approx(max_norm, rel=1e-6)] * 6
    for step, (pre, post_norm) in enumerate(zip(before.global_norms, after.global_norms, strict=True)):
        if pre > max_norm:
            assert clipped[step] == 1.0 and post_norm == pytest.approx(max_norm, rel=1e-5)
        else:
            assert clipped[step] == 0.0 and post_norm == pre  # untouched, bit for bit
        assert post[step] == pytest.approx(post_norm, rel=1e-5)
    assert 0 < guard.clipped_steps < 6


def test_gradient_clip_val_together_with_clipping_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GradGuardError, match=r"Trainer\(gradient_clip_val=1.0\) and GradGuard\(clip='auto'\)"):
        _fit(tmp_path, [GradGuard()], TinyRegressor(), max_steps=1, gradient_clip_val=1.0)
    # monitoring only next to Lightning's own clipping is fine
    _fit(tmp_path, [GradGuard(clip=None)], TinyRegressor(), max_steps=1, gradient_clip_val=1.0)


def _scaler_plugin() -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("fused", [False, True])
def test_fused_amp_optimizer_sees_unscaled_norms(tmp_path: Path, fused: bool) -> None:
    """Fused optimizers skip ``unscale_``: the hook sees scaled gradients, GradGuard must not."""

    class Model(TinyRegressor):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=fused)

    raw = GradRecorder()
    guard = GradGuard(clip="fixed", max_norm=1e9, log_every_n_steps=1, histogram_every_n_steps=0)
    trainer = _fit(tmp_path, [raw, guard], Model(), max_steps=4, plugins=[_scaler_plugin()])
    logged = scalars(read_events(trainer.logger.log_dir), tag("global_norm"))  # type: ignore[union-attr]
    finite = [i for i, n in enumerate(raw.global_norms) if math.isfinite(n)]
    assert finite, "the GradScaler should settle on a finite scale within 4 steps"
    for i in finite:
        assert raw.scales[i] > 1000
        expected_ratio = raw.scales[i] if fused else 1.0  # what the hook saw / the true norm
        assert raw.global_norms[i] == pytest.approx(logged[i] * expected_ratio, rel=1e-3)
        assert logged[i] < 100  # about 1, not 65536x


def test_fused_amp_clipping_clips_the_true_norm(tmp_path: Path) -> None:
    class Model(TinyRegressor):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    after = GradRecorder()
    guard = GradGuard(clip="fixed", max_norm=0.01, lr_guard=False)
    _fit(tmp_path, [guard, after], Model(), max_steps=4, plugins=[_scaler_plugin()])
    finite = [i for i, n in enumerate(after.global_norms) if math.isfinite(n)]
    assert finite and guard.clipped_steps == len(finite)
    for i in finite:  # still scaled in the hook, but clipped to 0.01 in true (unscaled) units
        assert after.global_norms[i] == pytest.approx(0.01 * after.scales[i], rel=1e-3)


class TinyGAN(L.LightningModule):
    """Manual optimization with two optimizers (generator, discriminator)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.disc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        real = batch[0]
        fake = self.gen(torch.randn(real.shape[0], 4))
        d_loss = (
            nn.functional.softplus(self.disc(fake.detach())).mean() + nn.functional.softplus(-self.disc(real)).mean()
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = nn.functional.softplus(-self.disc(fake)).mean() * 100.0  # larger gradients than D
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)]

    def train_dataloader(self) -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
        return torch.utils.data.DataLoader(regression_data(64, 8), batch_size=8)


def test_manual_optimization_keeps_separate_state_per_optimizer(tmp_path: Path) -> None:
    guard = GradGuard(clip="percentile", log_every_n_steps=1, histogram_every_n_steps=0)
    trainer = _fit(tmp_path, [guard], TinyGAN(), max_epochs=4)
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    gen, disc = scalars(acc, tag("global_norm", 0)), scalars(acc, tag("global_norm", 1))
    assert len(gen) >= 30 and len(disc) >= 30
    assert "gradguard/layer_norm/gen.0" in acc.Tags()["scalars"]
    assert "gradguard_opt1/layer_norm/disc.0" in acc.Tags()["scalars"]
    assert "gradguard/layer_norm/disc.0" not in acc.Tags()["scalars"]
    thr_g, thr_d = scalars(acc, tag("threshold", 0)), scalars(acc, tag("threshold", 1))
    last_g, last_d = thr_g[max(thr_g)], thr_d[max(thr_d)]
    assert last_g > 3 * last_d  # each optimizer tuned its own threshold


def test_fsdp1_strategy_is_refused_with_a_pointer_to_fsdp2() -> None:
    """Lightning's FSDPStrategy cannot run on CPU, so the check is exercised on the strategy object itself."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), gradient_clip_val=None, precision_plugin=None)
    with pytest.raises(GradGuardError, match=r"FSDPStrategy \(FSDP1\).*ModelParallelStrategy with .*fully_shard"):
        GradGuard().setup(trainer, None, "fit")  # type: ignore[arg-type]


def test_bf16_mixed_statistics_clipping_and_skipping(tmp_path: Path) -> None:
    """bf16-mixed has no GradScaler: norms are read as they are, and a NaN step is GradGuard's to skip."""
    before, after = GradRecorder(), GradRecorder()
    guard = GradGuard(clip="fixed", max_norm=0.05, lr_guard=False, log_every_n_steps=1, histogram_every_n_steps=1)
    trainer = _fit(
        tmp_path, [before, guard, after], TinyRegressor(nan_at_steps=(2,)), max_steps=5, precision="bf16-mixed"
    )
    logged = scalars(read_events(trainer.logger.log_dir), tag("global_norm"))  # type: ignore[union-attr]
    for step in (0, 1, 3, 4):
        assert logged[step] == pytest.approx(before.global_norms[step], rel=1e-5)
        assert after.global_norms[step] == pytest.approx(0.05, rel=1e-4)
    assert guard.skipped_steps == 1 and guard.clipped_steps == 4


def test_gradclip_preset_clips_without_monitoring_extras(tmp_path: Path) -> None:
    from lightning_gradguard import GradClip

    with pytest.raises(ValueError, match="`clip` must be a policy for GradClip, got None"):
        GradClip(clip=None)  # type: ignore[arg-type]
    guard = GradClip(clip="fixed", max_norm=1e-3, log_every_n_steps=1)
    trainer = _fit(tmp_path, [guard], TinyRegressor(), max_steps=3)
    assert guard.clipped_steps == 3 and guard.lr_scale == 1.0  # no LR guard in the preset
    tags = read_events(trainer.logger.log_dir).Tags()  # type: ignore[union-attr]
    assert tag("clip_rate") in tags["scalars"] and tag("lr_scale") not in tags["scalars"]
    assert tags["histograms"] == [] and tags["images"] == []


class Finetuned(L.LightningModule):
    """A backbone (frozen first, unfrozen by BackboneFinetuning or by hand) and a head."""

    def __init__(self, nan_at_step: int | None = None, all_params_in_optimizer: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh())
        self.head = nn.Linear(32, 1)
        self.nan_at_step = nan_at_step
        self.all_params_in_optimizer = all_params_in_optimizer
        self.backbone[0].weight.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.nan if self.trainer.global_step == self.nan_at_step else grad

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y * 100)  # large gradients: clipping is active

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = (
            self.parameters() if self.all_params_in_optimizer else filter(lambda p: p.requires_grad, self.parameters())
        )
        return torch.optim.SGD(params, lr=1e-3)

    def train_dataloader(self) -> Any:
        return TinyRegressor().train_dataloader()  # 8 steps per epoch


class AfterGuard(Callback):
    """After GradGuard: the global norm over every gradient the optimizer will apply, and the backbone weight."""

    def __init__(self) -> None:
        self.norms: dict[int, float] = {}
        self.backbone: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms[trainer.global_step] = torch.linalg.vector_norm(torch.cat(grads)).item() if grads else 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = pl_module.backbone[0].weight.detach().clone()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.backbone[trainer.global_step - 1] = (self._before, pl_module.backbone[0].weight.detach().clone())


class UnfreezeByHand(Callback):
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        pl_module.backbone.requires_grad_(False)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            pl_module.backbone.requires_grad_(True)


@pytest.mark.parametrize("how", ["BackboneFinetuning", "by hand"])
def test_parameters_unfrozen_during_training_are_clipped_and_skipped(how: str, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import BackboneFinetuning

    guard = GradGuard(clip="fixed", max_norm=0.5, lr_guard=False, histogram_every_n_steps=0, diagnostics=False)
    after = AfterGuard()
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1) if how == "BackboneFinetuning" else UnfreezeByHand()
    trainer = make_trainer(tmp_path, [unfreeze, guard, after], max_epochs=2, log_every_n_steps=1)
    trainer.fit(Finetuned(nan_at_step=11, all_params_in_optimizer=how == "by hand"))
    assert len(after.norms) == 16
    assert all(norm <= 0.5 * (1 + 1e-5) for norm in after.norms.values()), after.norms  # backbone included
    assert guard.skipped_steps == 1
    before, now = after.backbone[11]
    assert torch.isfinite(now).all() and torch.equal(before, now)  # the NaN step left the backbone untouched
    before, now = after.backbone[12]
    assert not torch.equal(before, now)  # and it trains after it
    layers = guard.state_dict()["guards"]["0"]["layers"]
    assert layers == ["backbone.0", "head"]
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert 12 in scalars(acc, tag("layer_norm/{layer}", 0, "backbone.0"))
    # the update-to-weight ratios (weight copies rebuilt at the regroup) cover the unfrozen backbone too
    ratios = scalars(acc, tag("update_ratio/{layer}", 0, "backbone.0"))
    assert 12 in ratios and math.isfinite(ratios[12]) and -8.0 < ratios[12] < 0.0


def test_plain_guard_regroups_after_an_unfreeze() -> None:
    from lightning_gradguard import Guard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = Guard(model, optimizer, clip="fixed", max_norm=0.1, lr_guard=False, diagnostics=False)
    x = torch.randn(8, 4)
    for step in range(3):
        if step == 2:
            model[0].requires_grad_(True)
        optimizer.zero_grad()
        (model(x).sum() * 100).backward()
        outcome = guard.before_optimizer_step()
        total = torch.linalg.vector_norm(
            torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        )
        assert total.item() <= 0.1 * (1 + 1e-5)
        assert list(outcome.stats.layers) == (["0", "1"] if step == 2 else ["1"])
        optimizer.step()


class ComplexNet(L.LightningModule):
    """A complex linear map followed by a real head; a NaN loss at ``nan_at_steps``."""

    def __init__(self, nan_at_steps: tuple[int, ...] = ()) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.cplx = nn.Linear(4, 4, dtype=torch.complex64)
        with torch.no_grad():
            self.cplx.weight.copy_(torch.randn(4, 4, generator=g, dtype=torch.complex64) * 10)
        self.head = nn.Linear(4, 1)
        self.nan_at_steps = nan_at_steps

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.cplx(x.to(torch.complex64)).abs()), y)
        if self.trainer.global_step in self.nan_at_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True) * 100), batch_size=8)


class PostClip(Callback):
    """Placed after GradGuard: records what the optimizer will apply (norm of the gradients, weights)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.weights: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(math.sqrt(sum(float(g.abs().square().sum()) for g in grads)) if grads else math.nan)
        self.weights.append(pl_module.cplx.weight.detach().clone())  # type: ignore[union-attr]


def test_complex_parameters_clip_skip_and_histograms(tmp_path: Path) -> None:
    max_norm = 0.5
    post = PostClip()
    guard = GradGuard(clip="fixed", max_norm=max_norm, lr_guard=False, histogram_every_n_steps=1)
    trainer = make_trainer(tmp_path, [guard, post], max_steps=4)
    trainer.fit(ComplexNet(nan_at_steps=(2,)))
    # step 2 is skipped (gradients set to None); the others are clipped to max_norm
    assert guard.skipped_steps == 1
    assert len(post.norms) == 4 and math.isnan(post.norms[2])
    finite = [n for i, n in enumerate(post.norms) if i != 2]
    assert all(n == pytest.approx(max_norm, rel=1e-4) for n in finite)
    assert torch.equal(post.weights[3], post.weights[2])  # the NaN step left the weights untouched
    assert torch.isfinite(torch.view_as_real(post.weights[3])).all()
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    pre = scalars(acc, tag("global_norm"))
    assert math.isnan(pre[2]) and all(pre[s] > max_norm for s in (0, 1, 3))
    assert scalars(acc, tag("skipped_total"))[3] == 1.0
    hist = acc.Histograms(tag("hist/{layer}", layer="cplx"))
    assert {h.step for h in hist} == {0, 1, 3}  # the non-finite step has no histogram
    for h in hist:  # magnitudes: 16 weights + 4 biases, all >= 0
        assert h.histogram_value.num == 20 and h.histogram_value.min >= 0.0

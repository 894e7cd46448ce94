"""Clipping and non-finite skipping inside a real Trainer: parity, skips, AMP, manual optimization, conflicts."""

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

from lightning_gradguard import GradGuard, GradGuardError, NonFiniteGradientsError
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


class _Snapshots(Callback):
    """Weights and optimizer state after every optimizer step."""

    def __init__(self) -> None:
        self.after: dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        opt_state = copy.deepcopy(trainer.optimizers[0].state_dict()["state"])
        self.after[trainer.global_step] = (weights(pl_module), opt_state)


def test_nan_step_is_skipped_without_touching_weights_or_optimizer_state(tmp_path: Path) -> None:
    snaps = _Snapshots()
    guard = GradGuard(log_every_n_steps=1, histogram_every_n_steps=0)
    model = TinyRegressor(optimizer="adamw", nan_at_steps=(3,))
    trainer = _fit(tmp_path, [guard, snaps], model, max_steps=6)
    assert guard.skipped_steps == 1
    w_before, s_before = snaps.after[3]  # after optimizer step index 2
    w_after, s_after = snaps.after[4]  # after the skipped step index 3
    for key in w_before:
        assert torch.equal(w_before[key], w_after[key]), key
    for pid in s_before:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s_before[pid][name], s_after[pid][name]), (pid, name)
    # training continued afterwards
    assert not torch.equal(snaps.after[5][0]["net.0.weight"], w_after["net.0.weight"])
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert scalars(acc, tag("skipped"))[3] == 1.0 and scalars(acc, tag("skipped_total"))[5] == 1.0
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag("events") + "/text_summary")]
    assert any("step 3" in t and "net.0" in t for t in texts)


def test_raise_and_max_consecutive_skips_stop_with_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteGradientsError, match="non-finite gradients at optimizer step 1"):
        _fit(tmp_path / "r", [GradGuard(on_nonfinite="raise")], TinyRegressor(nan_at_steps=(1,)), max_steps=4)
    guard = GradGuard(max_consecutive_skips=3, rollback=False)  # with recovery on, the streak rolls back instead
    with pytest.raises(NonFiniteGradientsError, match="3 consecutive optimizer steps had non-finite gradients"):
        _fit(tmp_path / "s", [guard], TinyRegressor(nan_at_steps=(2, 3, 4, 5)), max_steps=8)
    assert guard.skipped_steps == 3


def test_warn_steps_anyway(tmp_path: Path) -> None:
    guard = GradGuard(on_nonfinite="warn")
    model = TinyRegressor(nan_at_steps=(1,))
    with pytest.warns(UserWarning, match="non-finite gradients at step 1"):
        _fit(tmp_path, [guard], model, max_steps=3)
    assert guard.skipped_steps == 0
    assert torch.isnan(model.net[0].weight).all()  # the user asked for it


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


def test_scaler_skipped_steps_are_not_counted_as_explosions(tmp_path: Path) -> None:
    guard = GradGuard(log_every_n_steps=1, histogram_every_n_steps=0)
    trainer = _fit(tmp_path, [guard], TinyRegressor(nan_at_steps=(1,)), max_steps=3, plugins=[_scaler_plugin()])
    assert guard.skipped_steps == 0
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    assert scalars(acc, tag("scaler_skipped"))[1] == 1.0


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

"""Update-to-weight ratio verdicts on a LoRA-style adapter: a weight that starts at zero is moved by large
fractions of its norm only because its norm is its few updates so far; that is no verdict on the LR."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard, Guard


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``lora_B(lora_A(x))``, ``lora_B`` initialised to zero
    (the layout of peft's LoRA layers: each factor its own module, so its own layer for GradGuard)."""

    def __init__(self, features: int, rank: int = 8) -> None:
        super().__init__()
        self.base = nn.Linear(features, features)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(features, rank, bias=False)
        self.lora_B = nn.Linear(rank, features, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x))


class LoRAModel(L.LightningModule):
    def __init__(self, lr: float = 1e-3, features: int = 64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, features)
        self.embed.requires_grad_(False)
        self.block1 = LoRALinear(features)
        self.block2 = LoRALinear(features)
        self.head = nn.Linear(features, 4)
        self.head.requires_grad_(False)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.block2(torch.tanh(self.block1(self.embed(x))))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1024, 16, generator=g)
        y = (x[:, :4] @ torch.randn(4, 4, generator=g)).argmax(dim=1)
        return DataLoader(TensorDataset(x, y), batch_size=32)


def _fit(tmp_path: Path, lr: float, steps: int) -> GradGuard:
    guard = GradGuard(histogram_every_n_steps=0, heatmap_every_n_steps=0, rollback=False, lr_guard=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard],
    )
    trainer.fit(LoRAModel(lr=lr))
    return guard


def test_healthy_lora_run_gets_no_update_ratio_verdict(tmp_path: Path) -> None:
    guard = _fit(tmp_path, lr=1e-3, steps=30)
    engine = guard._first_engine()
    assert engine is not None
    assert {"block1.lora_A", "block1.lora_B", "block2.lora_B"} <= set(engine.stats.layers)
    assert [(v.layer, v.kind, v.step) for v in engine.update_verdicts] == []


def test_a_layer_grown_from_zero_is_judged_once_its_norm_is_its_own() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    nn.init.zeros_(model[0].weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    guard = Guard(model, optimizer, clip=None, lr_guard=False, rollback=False, log_every_n_steps=1,
                  diagnose_every_n_steps=1, histogram_every_n_steps=0, heatmap_every_n_steps=0)  # fmt: skip
    for step in range(60):
        if step == 10:  # grown to 1.0 per element (norm 4); from now on each step moves it by half of that
            optimizer.param_groups[0]["lr"] = 50.0
        sign = -1.0 if step < 10 or step % 2 == 1 else 1.0  # gradients set by hand: the updates are known
        model[0].weight.grad = torch.full_like(model[0].weight, sign * 0.01)
        guard.before_optimizer_step()
        optimizer.step()
    verdicts = [(v.kind, v.step) for v in guard.engine.update_verdicts]
    # growing from zero (steps 0-9: ratios 1, 1/2, 1/3 ...) is no verdict; swinging by half its norm is one
    assert len(verdicts) == 1 and verdicts[0][0] == "lr_too_high" and 10 < verdicts[0][1] < 40, verdicts


def test_a_fast_layer_while_the_loss_still_falls_is_no_lr_too_high_verdict() -> None:
    """The healthy zoo's tanh MLP regressing a sine with SGD (seed 2) sits on a plateau, then learns: its small output
    layer moves by about 10 % of its norm per step at the diagnose steps up to step 200 (median log10 ratio -0.99).
    Under the LR guard the loss record says the loss still falls there, and no "LR too high" verdict is given;
    without the LR guard (no loss record) the band alone decides and gives one."""
    import sys
    import warnings

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        import bench_zoo
    finally:
        sys.path.pop(0)

    def verdicts(lr_guard: bool) -> list[tuple[str, str, int]]:
        c = bench_zoo.CONFIGS["sine_tanh_sgd"]
        model, loss_fn = bench_zoo.build(c, 2)
        opt = bench_zoo.optimizer(c, model)
        batches = bench_zoo.Batches(c, 2, 210)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            guard = Guard(model, opt, lr_guard=lr_guard, incidents=False)
            for i in range(210):
                loss = loss_fn(model, batches[i])
                opt.zero_grad()
                loss.backward()
                guard.before_optimizer_step(loss)
                opt.step()
        return [(v.layer, v.kind, v.step) for v in guard.engine.update_verdicts]

    assert verdicts(lr_guard=True) == []
    assert verdicts(lr_guard=False) == [("4", "lr_too_high", 200)]

"""Recovery without a Trainer: snapshot round trips, the rollback trigger on real loss curves, a plain loop."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gradguard.recovery.snapshot import Snapshot
from lightning_gradguard.recovery.trigger import RecoveryError, RollbackDecision, RollbackTrigger

# ------------------------------------------------------------------------------------------------ helpers


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def _train_steps(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, n: int, seed: int) -> list[float]:
    x, y = _digits()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bit-exact equality of nested state (tensors compared with torch.equal, including dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} != {b.keys()}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _full_state(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    return copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict() if sched else None}
    )


def _adamw_setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = _mlp(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=200)
    return model, opt, sched


# ----------------------------------------------------------------------------------------------- snapshot


def test_round_trip_adamw_and_scheduler_is_bit_exact() -> None:
    model, opt, sched = _adamw_setup()
    _train_steps(model, opt, sched, 5, seed=1)
    snap = Snapshot(model, opt, sched)
    snap.capture(step=5, extra={"policy": {"ema": 1.5, "window": [1.0, 2.0]}, "t": torch.tensor([3.0])})
    saved = _full_state(model, opt, sched)
    ptrs = [t.data_ptr() for t in [*model.parameters(), *model.buffers()]]

    after = _train_steps(model, opt, sched, 7, seed=2)  # moves weights, moments, BN stats, the schedule
    assert math.isfinite(after[-1])
    assert not torch.equal(model.state_dict()["0.weight"], saved["model"]["0.weight"])
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    opt.param_groups[0]["lr"] = 123.0

    assert snap.restore() == 5
    _assert_same(_full_state(model, opt, sched), saved)
    assert [t.data_ptr() for t in [*model.parameters(), *model.buffers()]] == ptrs  # restored in place
    assert all(p.grad is None for p in model.parameters())
    assert snap.extra == {"policy": {"ema": 1.5, "window": [1.0, 2.0]}, "t": torch.tensor([3.0])}

    # Continuing from the restored state equals continuing from the state itself, bit for bit.
    ref_model, ref_opt, ref_sched = _adamw_setup()
    ref_model.load_state_dict(saved["model"])
    ref_opt.load_state_dict(saved["opt"])
    ref_sched.load_state_dict(saved["sched"])
    a = _train_steps(model, opt, sched, 4, seed=3)
    b = _train_steps(ref_model, ref_opt, ref_sched, 4, seed=3)
    assert a == b
    _assert_same(model.state_dict(), ref_model.state_dict())


def test_state_created_after_the_snapshot_is_removed() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    snap = Snapshot(model, opt)
    snap.capture(step=0)  # no optimizer state yet
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert len(opt.state) == 4
    opt.state[model[0].weight]["extra_key"] = torch.ones(2)
    snap.restore()
    assert len(opt.state) == 0

    # A key added to existing state after the snapshot goes too; a key deleted since comes back.
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    snap.capture(step=1)
    exp_avg = opt.state[model[1].bias]["exp_avg"].clone()
    opt.state[model[1].bias]["extra_key"] = 1
    del opt.state[model[1].bias]["exp_avg"]
    snap.restore()
    assert set(opt.state[model[1].bias]) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(opt.state[model[1].bias]["exp_avg"], exp_avg)


def test_second_capture_reuses_the_host_buffers() -> None:
    model, opt, sched = _adamw_setup()
    _train_steps(model, opt, sched, 2, seed=0)
    snap = Snapshot(model, opt, sched)
    snap.capture(step=2)

    def buffers() -> list[torch.Tensor]:
        out = [s.buffer for s in snap._model_slots]
        for entries in snap._opt_state.values():
            out += [v.buffer for v in (entries or {}).values() if hasattr(v, "buffer")]
        return out

    first = [b.data_ptr() for b in buffers()]
    nbytes = snap.nbytes
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    n_tensors = len(list(model.parameters()))
    # weights + exp_avg + exp_avg_sq (fp32) + one fp32 step scalar per parameter + BatchNorm buffers
    assert nbytes == 3 * 4 * n_params + 4 * n_tensors + n_buffers
    _train_steps(model, opt, sched, 3, seed=1)
    snap.capture(step=5)
    assert [b.data_ptr() for b in buffers()] == first
    assert snap.nbytes == nbytes
    assert snap.step == 5
    # and the reused buffers hold the new values
    assert torch.equal(snap._model_slots[0].buffer, model[0].weight.detach())


def test_restore_before_capture_and_changed_structure_raise() -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = Snapshot(model, opt)
    with pytest.raises(RuntimeError, match="before any capture"):
        snap.restore()
    snap.capture(0)
    # a group appended since the capture (BackboneFinetuning's unfreeze) is fine; it keeps its LR
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5})
    assert snap.restore() == 0 and opt.param_groups[1]["lr"] == 0.5
    # a group that lost a parameter is not: refused before anything is written
    opt.param_groups[0]["params"].pop()
    with torch.no_grad():
        model.weight.fill_(7.0)
    with pytest.raises(RuntimeError, match="param groups changed"):
        snap.restore()
    assert bool((model.weight == 7.0).all())
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module"):
        Snapshot(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`optimizers\[0\]` must be an instance of Optimizer"):
        Snapshot(model, [object()])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="`step` must be an int >= 0, got -1"):
        snap.capture(-1)


def test_dtensor_local_shards_are_snapshotted_in_place(tmp_path: Path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        fully_shard(model, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        x = torch.randn(5, 8)

        def step() -> None:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        step()
        snap = Snapshot(model, opt)
        snap.capture(step=1)
        weights = [p.to_local().clone() for p in model.parameters()]
        moments = [opt.state[p]["exp_avg"].to_local().clone() for p in model.parameters()]
        ptrs = [p.to_local().data_ptr() for p in model.parameters()]
        step()
        step()
        with torch.no_grad():
            next(iter(model.parameters())).to_local().fill_(float("nan"))
        p_last = list(model.parameters())[-1]
        del opt.state[p_last]["exp_avg"]  # forces the DTensor to be rebuilt from the host copy

        assert snap.restore() == 1
        for p, w, m, ptr in zip(model.parameters(), weights, moments, ptrs, strict=True):
            assert isinstance(p, DTensor)
            assert p.to_local().data_ptr() == ptr
            assert torch.equal(p.to_local(), w)
            assert isinstance(opt.state[p]["exp_avg"], DTensor)
            assert torch.equal(opt.state[p]["exp_avg"].to_local(), m)
        step()  # the optimizer still works on the restored DTensor state
        assert all(bool(p.to_local().isfinite().all()) for p in model.parameters())
    finally:
        dist.destroy_process_group()


def _fsdp2_worker(rank: int, store: str, out: str) -> None:
    """One of two gloo ranks: each snapshots and restores its own half of every FSDP2 parameter."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        full = sum(p.numel() for p in model.parameters())
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(rank))  # different data per rank

        def step() -> None:
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

        step()
        snap = Snapshot(model, opt)
        snap.capture(step=1)
        local = sum(p.to_local().numel() for p in model.parameters())
        assert local == full // 2, (local, full)
        # weights + two moments (fp32) + one fp32 step scalar per parameter: this rank's half only
        assert snap.nbytes == 3 * 4 * local + 4 * len(list(model.parameters())), snap.nbytes
        weights = [p.to_local().clone() for p in model.parameters()]
        step()
        if rank == 1:  # a fault on one rank only
            with torch.no_grad():
                next(iter(model.parameters())).to_local().fill_(float("nan"))
        assert snap.restore() == 1
        for p, w in zip(model.parameters(), weights, strict=True):
            assert torch.equal(p.to_local(), w)
        step()  # collectives still line up after the restore
        assert all(bool(p.to_local().isfinite().all()) for p in model.parameters())
        gathered = [torch.zeros(full) for _ in range(2)]
        dist.all_gather(gathered, torch.cat([p.full_tensor().flatten() for p in model.parameters()]))
        assert torch.equal(gathered[0], gathered[1])
        Path(out, f"ok_rank{rank}").write_text("ok", encoding="utf-8")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_ranks_snapshot_their_own_shards(tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessExitedException

    # gloo sometimes aborts while a process exits; the markers written after the checks say whether they passed
    with contextlib.suppress(ProcessExitedException):
        mp.spawn(_fsdp2_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in tmp_path.glob("ok_rank*")) == ["ok_rank0", "ok_rank1"]


# ------------------------------------------------------------------------------------------------ trigger


def _feed(trigger: RollbackTrigger, losses: list[float], start: int = 0) -> list[RollbackDecision]:
    return [trigger.update(start + i, loss=v) for i, v in enumerate(losses)]


def test_nonfinite_gradients_fire_after_k_consecutive_steps_only() -> None:
    trigger = RollbackTrigger(nonfinite_steps=3)
    flags = [False, True, True, False, True, True, True]
    decisions = [trigger.update(i, loss=1.0, nonfinite=f) for i, f in enumerate(flags)]
    assert [d.rollback for d in decisions] == [False] * 6 + [True]
    assert decisions[-1].trigger == "nonfinite_grad"
    assert decisions[-1].evidence["nonfinite_streak"] == 3
    assert [d.snapshot_ok for d in decisions] == [True, False, False, True, False, False, False]


def test_nonfinite_loss_fires_and_none_loss_disables_loss_checks() -> None:
    trigger = RollbackTrigger()  # default: 3 consecutive non-finite losses (an isolated one is skipping's business)
    assert not trigger.update(0, loss=2.0).rollback
    assert [trigger.update(i, loss=float("nan")).rollback for i in (1, 2)] == [False, False]
    d = trigger.update(3, loss=float("nan"))
    assert d.rollback and d.trigger == "nonfinite_loss" and not d.snapshot_ok
    trigger = RollbackTrigger(nonfinite_loss_steps=1)
    assert not trigger.update(0, loss=2.0).rollback
    assert trigger.update(1, loss=float("inf")).rollback
    trigger = RollbackTrigger(nonfinite_loss_steps=0)
    assert not trigger.update(0, loss=float("inf")).rollback
    trigger = RollbackTrigger()
    assert all(trigger.update(i, loss=None).snapshot_ok for i in range(30))
    assert trigger.level() is None


def test_runaway_needs_a_majority_of_recent_steps_and_spares_isolated_spikes() -> None:
    trigger = RollbackTrigger(climb_steps=0)  # the runaway check alone (the loss-climb check fires a step sooner)
    rng = random.Random(0)
    base = [2.0 + 0.1 * rng.gauss(0, 1) for _ in range(50)]
    assert not any(d.rollback for d in _feed(trigger, base))
    spikes = [2.0, 50.0, 2.0, 2.0, 80.0, 2.1, 1.9, 40.0, 2.0, 2.0, 2.0, 2.0]  # 3 of 10 above: no rollback
    decisions = _feed(trigger, spikes, start=50)
    assert not any(d.rollback for d in decisions)
    assert not decisions[1].snapshot_ok and not decisions[2].snapshot_ok  # a spike blocks snapshots
    median, _mad, thr = trigger.level()  # type: ignore[misc]
    assert 1.9 < median < 2.1 and thr == pytest.approx(2 * median)  # spikes never entered the window
    decisions = _feed(trigger, [30.0, 2.0] + [30.0] * 5, start=62)
    assert [d.rollback for d in decisions] == [False] * 6 + [True]
    assert decisions[-1].trigger == "loss_runaway"
    assert decisions[-1].evidence["runaway_above"] == 6
    assert "running median" in decisions[-1].message


def test_run_diverging_in_its_first_steps_fires() -> None:
    trigger = RollbackTrigger()
    decisions = _feed(trigger, [2.3, 2790.0, 3610.0, 569.0, 1450.0, 2410.0, 2570.0])
    assert decisions[-1].rollback and decisions[-1].trigger == "loss_runaway"
    assert not any(d.snapshot_ok for d in decisions[1:])


def test_heavy_tailed_stationary_and_decaying_streams_never_fire() -> None:
    rng = random.Random(1)
    for draw in (
        lambda i: rng.lognormvariate(0.0, 0.6),
        lambda i: rng.expovariate(1.0),
        lambda i: 2.3 * math.exp(-i / 3000) * rng.lognormvariate(0.0, 0.4) + 0.01,
        lambda i: rng.gauss(-1.0, 0.3),  # a loss that is negative (a log-likelihood)
    ):
        trigger = RollbackTrigger()
        assert not any(trigger.update(i, loss=draw(i)).rollback for i in range(10_000))


def test_max_rollbacks_gives_an_error_naming_each_rollback() -> None:
    trigger = RollbackTrigger(nonfinite_steps=1, nonfinite_loss_steps=1, max_rollbacks=2)
    trigger.update(0, loss=1.0)
    d1 = trigger.update(10, loss=1.0, nonfinite=True)
    trigger.record_rollback(d1, restored_to=0)
    d2 = trigger.update(14, loss=float("nan"))
    assert trigger.record_rollback(d2, restored_to=5).steps_lost == 9
    d3 = trigger.update(20, loss=1.0, nonfinite=True)
    assert not d3.rollback and isinstance(d3.error, RecoveryError)
    text = str(d3.error)
    assert "step 20" in text and "max_rollbacks=2" in text and "19 step(s) lost" in text
    assert "rollback 1: at step 10 (nonfinite_grad) restored step 0" in text
    assert "rollback 2: at step 14 (nonfinite_loss) restored step 5" in text
    assert "What to try" in text and "learning rate" in text
    assert trigger.rollbacks_total == 2 and trigger.steps_lost == 19
    with pytest.raises(ValueError, match="did not ask for a rollback"):
        trigger.record_rollback(d3, restored_to=0)


def test_record_rollback_forgets_losses_of_the_discarded_trajectory() -> None:
    trigger = RollbackTrigger(runaway_steps=0, nonfinite_loss_steps=1)
    _feed(trigger, [1.0] * 10 + [1.5] * 10)
    d = trigger.update(20, loss=float("nan"))
    trigger.record_rollback(d, restored_to=9)
    assert trigger.state_dict()["losses"] == [[s, 1.0] for s in range(10)]


def test_state_dict_loads_with_weights_only_and_continues_identically() -> None:
    rng = random.Random(2)
    stream = (
        [2.0 + 0.2 * rng.random() for _ in range(150)] + [40.0] * 12 + [2.0 + 0.2 * rng.random() for _ in range(30)]
    )
    full = RollbackTrigger(max_rollbacks=5)
    first = RollbackTrigger(max_rollbacks=5)

    def drive(t: RollbackTrigger, lo: int, hi: int) -> list[tuple[bool, str | None, bool]]:
        out = []
        for i in range(lo, hi):
            d = t.update(i, loss=stream[i])
            if d.rollback:
                t.record_rollback(d, restored_to=100)
            out.append((d.rollback, d.trigger, d.snapshot_ok))
        return out

    a = drive(full, 0, len(stream))
    b = drive(first, 0, 155)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = RollbackTrigger(max_rollbacks=5)
    second.load_state_dict(torch.load(buf, weights_only=True))
    b += drive(second, 155, len(stream))
    assert a == b
    assert full.rollbacks_total == second.rollbacks_total == 2  # the bad stretch outlasts one rollback
    assert full.state_dict() == second.state_dict()
    assert RollbackTrigger().state_dict()["rollbacks_total"] == 0
    second.load_state_dict({})  # missing keys take their defaults
    assert second.rollbacks_total == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"nonfinite_steps": -1}, ValueError, "`nonfinite_steps` must be an int >= 0, got -1"),
        ({"max_rollbacks": 0}, ValueError, "`max_rollbacks` must be an int >= 1, got 0"),
        ({"runaway_steps": 2.5}, TypeError, "`runaway_steps` must be an int"),
        ({"runaway_mad": -1.0}, ValueError, "`runaway_mad` must be a finite float >= 0, got -1.0"),
        ({"runaway_rel": "x"}, TypeError, "`runaway_rel` must be a float >= 0"),
    ],
)
def test_arguments_are_validated(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        RollbackTrigger(**kwargs)


# ---------------------------------------------------------------------------------- real loss curves


def _digits_run(
    opt_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    seed: int,
    steps: int,
    blow_up_at: int | None = None,
) -> list[RollbackDecision]:
    x, y = _digits()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = opt_factory(list(model.parameters()))
    trigger = RollbackTrigger()
    decisions = []
    for step in range(steps):
        if step == blow_up_at:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(8.0)
        idx = torch.randint(0, len(x), (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        d = trigger.update(step, loss=loss.item())
        decisions.append(d)
        if d.rollback:
            trigger.record_rollback(d, restored_to=0)  # count only: this test watches the trigger
        opt.step()
    return decisions


def _char_run(seed: int, steps: int) -> list[RollbackDecision]:
    """A character-level MLP language model on the project's own docs (noisier losses than digits)."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = "".join(p.read_text(encoding="utf-8") for p in sorted(docs.glob("*.md")))
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text[:60_000]])
    ctx = 8
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Embedding(len(vocab), 16), nn.Flatten(), nn.Linear(16 * ctx, 128), nn.Tanh())
    head = nn.Linear(128, len(vocab))
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=3e-3)
    trigger = RollbackTrigger()
    decisions = []
    for step in range(steps):
        starts = torch.randint(0, len(data) - ctx - 1, (16,), generator=g)
        xb = torch.stack([data[s : s + ctx] for s in starts.tolist()])
        yb = data[starts + ctx]
        loss = nn.functional.cross_entropy(head(model(xb)), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        decisions.append(trigger.update(step, loss=loss.item()))
    return decisions


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_real_runs_never_fire(seed: int) -> None:
    runs = [
        _digits_run(lambda p: torch.optim.AdamW(p, lr=3e-3), seed, 400),
        _digits_run(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), seed, 400),
        _char_run(seed, 400),
    ]
    for decisions in runs:
        assert not any(d.rollback for d in decisions)
        assert sum(d.snapshot_ok for d in decisions) > 0.9 * len(decisions)


def test_too_high_lr_and_injected_blow_up_fire() -> None:
    high = _digits_run(lambda p: torch.optim.AdamW(p, lr=1.0), 0, 30)
    assert [d.trigger for d in high if d.rollback][:1] == ["loss_runaway"]
    assert next(d.step for d in high if d.rollback) < 15
    blown = _digits_run(lambda p: torch.optim.AdamW(p, lr=1e-3), 0, 230, blow_up_at=200)
    fired = [d.step for d in blown if d.rollback]
    assert fired and 200 <= fired[0] <= 215
    assert not any(d.rollback for d in blown[:200])


# ----------------------------------------------------------------------------------- plain-loop recovery


def _plain_loop(fault_at: int | None, steps: int = 300, every: int = 10) -> tuple[nn.Module, float, RollbackTrigger]:
    """A plain training loop wired the way a front-end wires recovery (decide before the optimizer step)."""
    x, y = _digits()
    g = torch.Generator().manual_seed(0)
    model = _mlp(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    snap = Snapshot(model, opt)
    trigger = RollbackTrigger()
    for step in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        if step == fault_at:
            with torch.no_grad():
                model[3].weight[0, 0] = float("nan")  # a silent hardware fault in one weight
        model.train()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        nonfinite = not all(bool(p.grad.isfinite().all()) for p in model.parameters() if p.grad is not None)
        d = trigger.update(step, loss=loss.item(), nonfinite=nonfinite)
        if d.error is not None:
            raise d.error
        if d.rollback:
            trigger.record_rollback(d, restored_to=snap.restore())
            for group in opt.param_groups:
                group["lr"] *= 0.5
            continue
        if nonfinite:
            continue
        if d.snapshot_ok and step % every == 0:
            snap.capture(step)
        opt.step()
    model.eval()
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
    return model, final, trigger


def test_weight_corrupted_to_nan_mid_run_rolls_back_and_finishes_close_to_fault_free() -> None:
    _, clean_loss, clean_trigger = _plain_loop(fault_at=None)
    model, loss, trigger = _plain_loop(fault_at=150)
    assert clean_trigger.rollbacks_total == 0
    assert trigger.rollbacks_total == 1
    (record,) = trigger.history
    # Non-finite from step 150 on: the third consecutive step fires (grads are checked before the loss).
    assert record.step == 152 and record.trigger == "nonfinite_grad" and record.restored_to == 150 - 10
    assert trigger.steps_lost == 12
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    assert all(bool(b.isfinite().all()) for b in model.buffers())
    assert math.isfinite(loss)
    assert abs(loss - clean_loss) < 0.1 + 0.5 * clean_loss, (loss, clean_loss)


def _reference_decisions(losses: list[float], window: int = 200, m: int = 10) -> list[bool]:
    """The runaway rule written the slow, obvious way (full median and MAD every step)."""
    import statistics

    kept: list[float] = []
    recent: list[bool] = []
    out = []
    for loss in losses:
        above = False
        if kept:
            med = statistics.median(kept)
            mad = statistics.median(abs(v - med) for v in kept)
            rel = 1.0 * max(1.0, m / len(kept))  # widened while the window holds fewer than m losses
            above = loss > med + max(10.0 * mad, rel * abs(med), 1e-3)
        if not above:
            kept = [*kept, loss][-window:]
        recent = [*recent, above][-m:]
        out.append(2 * sum(recent) > m)
    return out


def test_runaway_fast_path_matches_the_plain_definition() -> None:
    rng = random.Random(3)
    losses = []
    for i in range(3000):
        base = 1.0 + 0.5 * math.sin(i / 200)
        burst = 6.0 if (i // 97) % 9 == 4 and rng.random() < 0.8 else 1.0
        losses.append(base * burst * rng.lognormvariate(0.0, 0.5))
    expected = _reference_decisions(losses)
    assert 0 < sum(expected) < len(losses) // 4  # the stream does exercise the rule both ways
    trigger = RollbackTrigger(max_rollbacks=10**6, nonfinite_loss_steps=0)
    got = []
    for i, v in enumerate(losses):
        got.append(trigger.update(i, loss=v).trigger == "loss_runaway")
    assert got == expected


def test_docs_page_example_runs() -> None:
    """docs/recovery.md's plain-loop example runs top to bottom and its own assertions hold."""
    import re

    page = Path(__file__).resolve().parents[1] / "docs" / "recovery.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2  # the options, the plain loop
    namespace: dict[str, Any] = {"__name__": "recovery_docs"}
    for block in blocks:
        exec(compile(block, "recovery.md", "exec"), namespace)
    assert namespace["trigger"].history[0].trigger in ("nonfinite_loss", "nonfinite_grad")


def test_skipped_steps_are_not_healthy() -> None:
    """(That the module needs no Lightning is checked in ``tests/test_engine.py``, in one interpreter start.)"""
    trigger = RollbackTrigger()
    assert trigger.update(0, loss=1.0).snapshot_ok
    assert not trigger.update(1, loss=1.0, skipped=True).snapshot_ok
    assert trigger.update(2, loss=1.0).snapshot_ok

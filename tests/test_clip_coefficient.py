"""The clip coefficient is scale-free: a run whose loss is multiplied by k clips the same steps to k times the
threshold, down to gradients of 1e-6, and at a threshold of 1 it is exactly ``clip_grad_norm_``'s."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_gradguard import Guard

STEPS = 60


def _run(k: float, threshold: float) -> tuple[list[int], list[float], list[float]]:
    """A small regression whose gradients are ~1e-6 x k (its loss is multiplied by 1e-6 x k), clipped at
    ``threshold x k`` by ``clip="fixed"``; SGD at LR / (1e-6 x k) makes every k the same run without clipping.

    Returns the clipped steps, the thresholds and the post-clip norms."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    scale = 1e-6 * k
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 / scale)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS, 32, 8, generator=g), torch.randn(STEPS, 32, 1, generator=g)
    guard = Guard(model, optimizer, clip="fixed", max_norm=threshold * scale, lr_guard=False, diagnostics=False)
    clipped, thresholds, post = [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(STEPS):
            loss = nn.functional.mse_loss(model(x[step]), y[step]) * scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            outcome = guard.before_optimizer_step(loss)
            after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
            if outcome.clipped:
                clipped.append(step)
                thresholds.append(outcome.threshold / scale)
                post.append(float(after) / scale)
            optimizer.step()
    guard.close()
    return clipped, thresholds, post


def test_tiny_norm_runs_clip_the_same_steps_to_the_same_norm_whatever_the_loss_units() -> None:
    base = _run(1.0, threshold=0.5)
    tiny = _run(1e-4, threshold=0.5)
    assert len(base[0]) >= 10  # the threshold is pressed: the comparison means something
    assert tiny[0] == base[0]
    assert tiny[1] == pytest.approx(base[1], rel=1e-6)
    assert tiny[2] == pytest.approx(base[2], rel=1e-6)
    # and the clipped norm is the threshold itself, to torch's epsilon relative to it
    assert tiny[2] == pytest.approx([0.5] * len(tiny[2]), rel=1e-5)


def test_at_threshold_one_the_coefficient_is_clip_grad_norm_s() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    twin = nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 4)
    for net in (model, twin):
        (net(x).square().sum() * 10).backward()
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.1), clip="fixed", max_norm=1.0, lr_guard=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert guard.before_optimizer_step().clipped
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine.grad, theirs.grad)

"""Gradient norms measured while the gradients are hot (post-accumulate-grad hooks) against the fused pass.

On bench_e2e's 5M-parameter causal transformer (CPU, a plain loop: forward, backward, AdamW step, no Lightning),
each step runs one of two variants, alternating:

* ``cold`` (what GradGuard does): after the backward pass, one ``foreach_norm`` over every gradient, then the
  per-layer squared norms (``stack``, float64, ``square``, ``index_add_``);
* ``hot``: every parameter carries a ``register_post_accumulate_grad_hook`` that norms its gradient with the same
  kernel (``foreach_norm`` of a one-tensor list) right after the gradient is accumulated, while it is in cache;
  at step time the stored norms are used for every gradient that is still the tensor the hook saw (identity;
  a real implementation would also compare the tensor's version counter), the others are normed again, and the
  per-layer vector is assembled the same way.

Printed: the median process-CPU milliseconds of the backward pass, of the step-time norm work and of their sum
for each variant, and the median of the paired per-step differences (``hot - cold``, neighbouring steps). Before
timing, the hot norms are checked to equal the fused pass bit for bit. The hooks move the work into the backward
pass; the variant is a win only if the sum goes down.

Run: ``.venv/bin/python benchmarks/bench_hot_norms.py [--quick] [--steps N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

from bench_e2e import FULL, QUICK, TinyLM, make_data  # noqa: E402

from lightning_gradguard._compat import foreach_norm  # noqa: E402
from lightning_gradguard.measure.stats import layer_name  # noqa: E402


class HotNorms:
    """Each parameter's gradient norm, computed by a post-accumulate-grad hook, with the gradient it belongs to."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.norms: list[Tensor | None] = [None] * len(self.params)
        self.grads: list[weakref.ref[Tensor] | None] = [None] * len(self.params)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            grad = param.grad
            assert grad is not None
            self.norms[i] = foreach_norm([grad], None)[0]
            self.grads[i] = weakref.ref(grad)

        return hook

    def read(self) -> list[Tensor]:
        """The norms of the current gradients: stored ones where the gradient is the hooked tensor, else measured."""
        out: list[Tensor] = []
        for p, norm, ref in zip(self.params, self.norms, self.grads, strict=True):
            grad = p.grad
            assert grad is not None
            if norm is not None and ref is not None and ref() is grad:
                out.append(norm)
            else:
                out.append(foreach_norm([grad], None)[0])
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bench_e2e's tiny model, few steps (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 100; quick 5)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    steps = args.steps or (5 if args.quick else 100)
    warmup = 2 if args.quick else 10
    torch.manual_seed(0)
    model = TinyLM(cfg["vocab"], cfg["width"], cfg["layers"], cfg["ffn"], cfg["seq"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    layers: dict[str, int] = {}
    index = torch.tensor([layers.setdefault(layer_name(n, "module"), len(layers)) for n, _ in named])
    batches = list(make_data(cfg, 16))

    def backward(k: int) -> None:
        model.training_step(batches[k % len(batches)], k).backward()

    def per_layer(norms: list[Tensor]) -> Tensor:
        out = torch.zeros(len(layers), dtype=torch.float64)
        return out.index_add_(0, index, torch.stack(norms).to(torch.float64).square())

    model.log = lambda *a, **k: None  # type: ignore[method-assign]  # training_step logs; no Trainer here
    # Check: the hot norms equal the fused pass bit for bit.
    hot = HotNorms(params)
    optimizer.zero_grad()
    backward(0)
    same = torch.equal(per_layer(hot.read()), per_layer(foreach_norm([p.grad for p in params], None)))  # type: ignore[misc]
    hot.remove()
    if not same:
        raise SystemExit("check failed: the hot norms differ from the fused pass")
    print(f"check: hot norms equal the fused pass bit for bit ({len(params)} tensors, {len(layers)} layers)")

    times: dict[str, list[tuple[float, float]]] = {"cold": [], "hot": []}
    for k in range(2 * (warmup + steps)):
        variant = ("cold", "hot")[(k + k // 2) % 2]  # cold, hot, hot, cold, ...: each pair in both orders
        hooks = HotNorms(params) if variant == "hot" else None
        optimizer.zero_grad()
        c0 = time.process_time()
        backward(k)
        c1 = time.process_time()
        if hooks is not None:
            per_layer(hooks.read())
        else:
            per_layer(foreach_norm([p.grad for p in params], None))  # type: ignore[misc]
        c2 = time.process_time()
        if hooks is not None:
            hooks.remove()
        optimizer.step()
        if k >= 2 * warmup:
            times[variant].append((c1 - c0, c2 - c1))

    print(f"\nbench_hot_norms{' (quick)' if args.quick else ''}: CPU ms per step, torch threads {args.threads}")
    print(f"{'variant':<8s} {'backward':>9s} {'norms':>7s} {'sum':>7s}")
    for variant, samples in times.items():
        bwd = statistics.median(b for b, _ in samples)
        nrm = statistics.median(n for _, n in samples)
        total = statistics.median(b + n for b, n in samples)
        print(f"{variant:<8s} {bwd * 1e3:9.3f} {nrm * 1e3:7.3f} {total * 1e3:7.3f}")
    paired = [sum(h) - sum(c) for c, h in zip(times["cold"], times["hot"], strict=True)]
    print(f"median paired difference hot - cold (backward + norms): {statistics.median(paired) * 1e3:+.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Regression tests for issue 13 (defects found trying GradGuard as users would), phase 1."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradGuard
from lightning_gradguard.keys import tag
from lightning_gradguard.measure.stats import GradStats
from tests._models import make_trainer, read_events, scalars


# ---------------------------------------------------------------------------------- 4: complex parameters
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


def test_complex_gradient_norms_match_torch() -> None:
    layer = nn.Linear(3, 2, dtype=torch.complex128)
    layer.weight.grad = torch.tensor([[3 + 4j, 0, 0], [0, 0, 12j]], dtype=torch.complex128)
    layer.bias.grad = torch.zeros(2, dtype=torch.complex128)
    stats = GradStats(layer.named_parameters(), group_by="param")
    read = stats.read(stats.squared_norms())
    assert read.layer_norms() == pytest.approx({"weight": 13.0, "bias": 0.0})
    stats.scale_(0.5)
    assert layer.weight.grad[0, 0] == 1.5 + 2j
    ranges = stats.histogram_ranges()
    hist = stats.read_histograms(ranges, stats.histogram_counts(ranges, 4))["weight"]
    assert (hist.min, hist.max, hist.num, hist.sum) == (0.0, 6.0, 6.0, 2.5 + 6.0)


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


# ---------------------------------------------------------------------------------- 14: torch.compile names
def test_compiled_module_has_the_eager_layer_names() -> None:
    eager = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Sequential(nn.Linear(3, 1)))
    outer = nn.Module()
    outer.net = torch.compile(eager)  # wrapping is lazy: nothing is compiled until the first call
    names = [n for n, _ in outer.named_parameters()]
    assert any("_orig_mod" in n for n in names)  # what torch.compile does to the names
    compiled = torch.compile(outer)
    for group_by in ("module", "param", 1):
        stats = GradStats(compiled.named_parameters(), group_by=group_by)  # type: ignore[arg-type]
        reference = GradStats((f"net.{n}", p) for n, p in eager.named_parameters())
        if group_by == "module":
            assert stats.layers == reference.layers == ["net.0", "net.2.0"]
        assert not any("_orig_mod" in layer for layer in stats.layers), stats.layers
    assert GradStats(compiled.named_parameters(), group_by=1).layers == ["net"]


# ---------------------------------------------------------------------------------- 6: LR reductions in the report
def _reduction_text(step: int) -> str:
    from lightning_gradguard.decide.lr_guard import LRReduction

    return LRReduction(
        step=step, reason="saturation", lr_scale_before=1.0, lr_scale=0.5, num_reductions=1, norm=3.0,
        threshold=2.0, center=1.0, recent_norms=(2.5, 3.0), level=2.8, reference=1.0, approaching_steps=8,
        risen_steps=8, patience=8, old_lrs=(0.1,), new_lrs=(0.05,),
    ).message()  # fmt: skip


def _lr_run(run_dir: Path, lr_scale: list[float] | None, texts: list[tuple[int, str]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    for k in range(3):
        writer.add_scalar(tag("global_norm"), 1.0, 100 * k)
        if lr_scale is not None:
            writer.add_scalar(tag("lr_scale"), lr_scale[k], 100 * k)
    for step, text in texts:
        writer.add_text(tag("events"), text, step)
    writer.close()


_REMEDY = (
    "Layer 'fc' has an exploding gradient: L2 norm 309 at step 100. Remedy: clip gradients, lower the learning "
    "rate or lengthen its warmup, and scale the initialisation down."
)


@pytest.mark.parametrize("lr_scale", [[1.0, 1.0, 1.0], None], ids=["lr_scale-logged", "no-lr_scale"])
def test_report_does_not_invent_lr_reductions(
    lr_scale: list[float] | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from lightning_gradguard.outputs.report import main

    _lr_run(tmp_path, lr_scale, [(100, _REMEDY)] * 3)
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert main(["report", str(tmp_path), "--json"]) == 0
    (section,) = json.loads(capsys.readouterr().out)["runs"]
    assert section["lr_reductions"] == [] and section["lr_events"] == []
    lr_lines = [line for line in text.splitlines() if line.startswith("LR reductions")]
    assert lr_lines == (["LR reductions   none"] if lr_scale else [])


@pytest.mark.parametrize("lr_scale", [[1.0, 0.5, 0.5], None], ids=["lr_scale-logged", "no-lr_scale"])
def test_report_counts_real_lr_reductions_in_text_and_json_alike(
    lr_scale: list[float] | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from lightning_gradguard.outputs.report import main

    _lr_run(tmp_path, lr_scale, [(0, _REMEDY), (100, _reduction_text(100)), (100, _REMEDY)])
    assert main(["report", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert main(["report", str(tmp_path), "--json"]) == 0
    (section,) = json.loads(capsys.readouterr().out)["runs"]
    source = "lr_scale" if lr_scale else "events"
    assert section["lr_reductions"] == [{"step": 100, "from": 1.0, "to": 0.5, "source": source}]
    assert [e["step"] for e in section["lr_events"]] == [100]
    suffix = "" if lr_scale else " (from events)"
    assert f"LR reductions   1{suffix}: step 100 (lr_scale 1 -> 0.5)" in text.splitlines()


# ---------------------------------------------------------------------------------- 14: "1 log steps"
def test_counts_are_pluralised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard.decide.diagnostics import GradientDiagnostics
    from lightning_gradguard.outputs.report import main

    diag = GradientDiagnostics()
    diag.observe(0, {"fc": 1.0}, {"fc": 4})
    assert diag.summary().startswith("1 layer over 1 log step (step 0): 0 with verdicts")
    writer = SummaryWriter(str(tmp_path))
    for name, value in (("global_norm", 1.0), ("steps", 1.0), ("clip_rate", 1.0), ("clipped_total", 1.0)):
        writer.add_scalar(tag(name), value, 0)
    writer.close()
    assert main(["report", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "steps           0 .. 0 (1 log step, 1 optimizer step)" in lines
    assert any(line.startswith("clipping        1 clipped step, ") for line in lines)


# ---------------------------------------------------------------------------------- 12: one heatmap quantity
def test_report_heatmap_draws_the_tensorboard_heatmap(tmp_path: Path) -> None:
    """With histograms (element counts known), the report used to draw per-element RMS where TensorBoard drew L2."""
    import io

    import matplotlib.image
    import numpy as np

    from lightning_gradguard.outputs.heatmap import render_heatmap
    from lightning_gradguard.outputs.report import _heatmap_grid, build_report
    from tests._models import TinyRegressor

    guard = GradGuard(histogram_every_n_steps=1, heatmap_every_n_steps=1000, log_every_n_steps=1)
    trainer = make_trainer(tmp_path, [guard], max_steps=6)
    trainer.fit(TinyRegressor(hidden=64))
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    (image_event,) = read_events(log_dir).Images(tag("heatmap"))
    tensorboard_image = matplotlib.image.imread(io.BytesIO(image_event.encoded_image_string), format="png")
    (section,) = build_report(log_dir)
    assert section["measure"] == "rms"  # element counts known: the case that used to differ
    layers, steps, grid = _heatmap_grid(section)
    assert layers == ["net.0", "net.2"] and steps == [0, 1, 2, 3, 4, 5]
    # the callback's heatmap buffer holds the same quantity (the scalars are float32 in the event file)
    state = guard.state_dict()["guards"]["0"]
    assert state["heatmap_steps"] == steps
    assert np.allclose(grid, np.array(state["heatmap_columns"]).T, rtol=0, atol=1e-6)
    # and the image TensorBoard shows is the report's picture, pixel for pixel left of the colour scale
    # (its tick labels may move by a pixel with float32 rounding of the range)
    redrawn = render_heatmap(layers, steps, grid)
    tb = np.round(tensorboard_image[:, :, :3] * 255).astype(np.uint8)
    assert tb.shape == redrawn.shape
    assert np.array_equal(tb[:, :850], redrawn[:, :850])


# ---------------------------------------------------------------------------------- 11: all events of a step
def _served_texts(logdir: Path, runs: list[str]) -> dict[str, list[tuple[int, str]]]:
    """``run -> [(step, html)]`` as the real TensorBoard server's Text tab receives them.

    The server runs as a user starts it (``tensorboard --logdir``: the fast Rust data server where installed).
    """
    import json
    import os
    import subprocess
    import time
    import urllib.error
    import urllib.parse
    import urllib.request

    from tests.test_tensorboard_server import TENSORBOARD, _free_port

    def get(base: str, path: str) -> Any:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return json.loads(response.read().decode("utf-8"))

    text_tag = f"{tag('events')}/text_summary"  # torch's SummaryWriter.add_text appends /text_summary
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(TENSORBOARD), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    with (logdir / "tensorboard.log").open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                served = get(base, "/data/plugin/text/tags")
                if all(text_tag in served.get(run, []) for run in runs):
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        out = {}
        for run in runs:
            query = urllib.parse.urlencode({"run": run, "tag": text_tag})
            out[run] = [(e["step"], e["text"]) for e in get(base, f"/data/plugin/text/text?{query}")]
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_text_tab_shows_every_event_of_a_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_tensorboard_server import TENSORBOARD

    if not TENSORBOARD.exists():
        pytest.skip(f"{TENSORBOARD} not installed")
    from torch.utils.tensorboard import SummaryWriter

    from lightning_gradguard.outputs.report import build_report
    from lightning_gradguard.outputs.tensorboard import EventLog

    verdicts = [f"Layer 'enc.{i}' has a vanishing gradient at step 0." for i in range(5)]
    with SummaryWriter(str(tmp_path / "per_event")) as writer:  # what GradGuard wrote: one add_text per event
        for text in verdicts:
            writer.add_text(tag("events"), text, 0)
        writer.add_scalar(tag("global_norm"), 1.0, 0)
    with SummaryWriter(str(tmp_path / "joined")) as writer:
        log = EventLog()
        for text in verdicts:
            log.add(tag("events"), 0, text, writer)
        log.add(tag("events"), 7, "skipped optimizer step 7", writer)
        log.flush(writer)
        writer.add_scalar(tag("global_norm"), 1.0, 0)
    served = _served_texts(tmp_path, ["per_event", "joined"])
    import importlib.util

    if importlib.util.find_spec("tensorboard_data_server") is not None:  # the default (fast) loader
        assert len(served["per_event"]) == 1  # the defect: TensorBoard shows one entry per step
    assert [step for step, _ in served["joined"]] == [0, 7]
    html = served["joined"][0][1]
    assert all(f"enc.{i}" in html for i in range(5)) and "5 events" in html
    # the report splits joined entries back into events
    section = next(s for s in build_report(tmp_path) if s["run"].endswith("joined"))
    assert [e["text"] for e in section["events"]] == [*verdicts, "skipped optimizer step 7"]


# ---------------------------------------------------------------------------------- 10: printed commands run
@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_printed_follow_up_commands_run_as_printed(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quickstart (``python3 dev.py demo``) prints a tensorboard and a report command: both must run from
    the user's directory, without ``.venv/bin`` on PATH."""
    import os
    import shlex
    import subprocess
    import sys

    from tests.test_examples import load

    # the user's shell directory: the checkout holding .venv (README flow), or anywhere else
    user_dir = Path(sys.executable).parents[2] if where == "repository root" else tmp_path / "somewhere"
    user_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("PWD", str(user_dir))
    load("quickstart").main(["--max-steps", "3", "--logdir", str(tmp_path / "logs")])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    (tb_line,) = [line for line in lines if "--logdir" in line]
    (report_line,) = [line for line in lines if " report " in line]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".venv" not in p)

    tb = shlex.split(tb_line)
    program = user_dir / tb[0]  # absolute stays absolute; relative is relative to the user's directory
    assert program.is_file() and os.access(program, os.X_OK), tb_line
    if where == "repository root" and Path(sys.executable).parent.parent.name == ".venv":
        assert tb[0] == os.path.join(".venv", "bin", "tensorboard")  # what the README's user has
    assert (user_dir / tb[-1]).resolve() == (tmp_path / "logs").resolve()
    # tensorboard itself starts from there (its --help exits at once)
    assert subprocess.run([*tb[:-2], "--help"], cwd=user_dir, env=env, capture_output=True).returncode == 0

    done = subprocess.run(shlex.split(report_line), cwd=user_dir, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("== ") and "global norm" in done.stdout

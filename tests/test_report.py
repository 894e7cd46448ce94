"""`gradguard report` on event files written here with SummaryWriter and on real runs (rollbacks, LR
reductions, the heatmap TensorBoard shows), and every bad-input case."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.image
import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

import lightning_gradguard
from lightning_gradguard import GradGuard
from lightning_gradguard.keys import tag
from lightning_gradguard.outputs.heatmap import heatmap_size, render_heatmap
from lightning_gradguard.outputs.report import main

from ._models import make_trainer, read_events

LAYERS = [f"net.{i}" for i in range(0, 20, 2)]
NUMELS = [78400] + [10000] * 8 + [1000]
# per-element RMS from 2.4e-10 (first layer) to 3e-2 (last): 0.9 decades per layer, like a deep Sigmoid net
RMS = [2.4e-10 * 10 ** (0.9 * i) for i in range(10)]
STEPS = list(range(0, 200, 10))  # 20 log steps, 10 optimizer steps each


def write_run(run_dir: Path, histograms: bool = True, lr_drop_at: int = 100) -> None:
    """A run directory as GradGuard writes it: scalars, raw histograms and a text event."""
    writer = SummaryWriter(str(run_dir))
    for k, step in enumerate(STEPS):
        writer.add_scalar(tag("global_norm"), 1.0 + 0.1 * k, step)  # 1.0 .. 2.9
        writer.add_scalar(tag("global_norm_max"), 1.5 + 0.1 * k, step)  # max 3.4
        writer.add_scalar(tag("steps"), 10.0, step)
        writer.add_scalar(tag("threshold"), 2.0, step)
        writer.add_scalar(tag("clip_rate"), 0.1, step)
        writer.add_scalar(tag("clipped_total"), float(k + 1), step)
        writer.add_scalar(tag("skipped"), 1.0 if k == 6 else 0.0, step)
        writer.add_scalar(tag("skipped_total"), 1.0 if k >= 6 else 0.0, step)
        writer.add_scalar(tag("lr_scale"), 1.0 if step < lr_drop_at else 0.5, step)
        for layer, numel, rms in zip(LAYERS, NUMELS, RMS, strict=True):
            writer.add_scalar(tag("layer_norm/{layer}", layer=layer), rms * math.sqrt(numel), step)
        if histograms and k % 5 == 0:
            for layer, numel in zip(LAYERS, NUMELS, strict=True):
                writer.add_histogram_raw(
                    tag("hist/{layer}", layer=layer),
                    min=-1.0,
                    max=1.0,
                    num=numel,
                    sum=0.0,
                    sum_squares=1.0,
                    bucket_limits=[0.0, 1.0],
                    bucket_counts=[numel // 2, numel - numel // 2],
                    global_step=step,
                )
    writer.add_text(tag("events"), f"LR guard: step {lr_drop_at}: LR scale 1 -> 0.5 (reduction 1). Norm 3", lr_drop_at)
    writer.close()


def event_file(run_dir: Path) -> Path:
    (path,) = run_dir.glob("events.out.tfevents.*")
    return path


def run_report(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["report", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runs") / "version_0"
    write_run(path)
    return path


def test_text_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_report(capsys, str(run_dir))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"== {run_dir} =="
    assert "steps           0 .. 190 (20 log steps, 200 optimizer steps)" in lines
    # global norms 1.0..2.9: p50 = 1.95, p90 = 2.71, p99 = 2.881; max of global_norm_max = 3.4
    assert "global norm     p50 1.95  p90 2.71  p99 2.88  max 3.4" in lines
    assert "clipping        20 clipped steps, clip rate 10.0%, median threshold 2" in lines
    assert "skipped steps   1 (non-finite gradients)" in lines
    assert "LR reductions   1: step 100 (lr_scale 1 -> 0.5)" in lines
    assert "  step 100: LR guard: step 100: LR scale 1 -> 0.5 (reduction 1). Norm 3" in lines
    table = {line.split()[0]: line for line in lines if line.startswith("net.")}
    assert list(table) == LAYERS  # model order
    # first layer: L2 = 2.4e-10 * sqrt(78400) = 6.72e-08, RMS 2.4e-10, vanishing from the first log step
    assert table["net.0"].split()[1:6] == ["78400", "6.720e-08", "6.720e-08", "6.720e-08", "2.400e-10"]
    assert table["net.0"].endswith("vanishing (step 0)")
    # RMS 10^(0.9*i) * 2.4e-10 against 3.0e-2 at the last layer: layers 0-4 are > 1e4x below it
    assert [name for name, line in table.items() if "vanishing" in line] == LAYERS[:5]
    assert all(table[name].endswith("ok") for name in LAYERS[5:])
    assert "Remedies:" in out and "non-saturating activation" in out


def test_json_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_report(capsys, str(run_dir), "--json")
    assert code == 0
    (section,) = json.loads(out)["runs"]
    assert section["run"] == str(run_dir) and section["namespace"] == "gradguard"
    assert section["steps"] == {"first": 0, "last": 190, "log_steps": 20, "optimizer_steps": 200}
    g = section["global_norm"]
    assert g["p50"] == pytest.approx(1.95) and g["p90"] == pytest.approx(2.71)
    assert g["p99"] == pytest.approx(2.881) and g["max"] == pytest.approx(3.4)
    assert section["clipping"] == {"clipped_steps": 20, "clip_rate": pytest.approx(0.1), "threshold_median": 2.0}
    assert section["skipped_steps"] == 1
    assert section["lr_reductions"] == [{"step": 100, "from": 1.0, "to": 0.5, "source": "lr_scale"}]
    assert section["lr_scale_final"] == 0.5
    assert [e["step"] for e in section["lr_events"]] == [100]
    assert section["measure"] == "rms"
    first, last = section["layers"][0], section["layers"][-1]
    assert first["layer"] == "net.0" and first["numel"] == 78400
    assert first["median_rms"] == pytest.approx(2.4e-10)
    (verdict,) = first["verdicts"]
    assert verdict["kind"] == "vanishing" and verdict["first_step"] == 0 and verdict["episodes"] == 1
    assert "net.0" in verdict["message"]
    assert last["verdicts"] == [] and last["numel"] == 1000
    assert section["heatmap"] is None


def test_png_heatmap(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "heat.png"
    code, out, _ = run_report(capsys, str(run_dir), "--png", str(png))
    assert code == 0 and f"heatmap written to {png}" in out
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == heatmap_size(len(LAYERS)) == (360, 1000)
    # the first layer (top rows, deep purple) is darker than the last (bottom rows, yellow)
    plot = image[60:270, 300:800, :3]
    top, bottom = plot[:15].mean(), plot[-15:].mean()
    assert top < 0.4 < 0.6 < bottom


def test_render_heatmap_shape_and_validation() -> None:
    grid = np.array([[-9.0, -8.5, -np.inf], [-1.0, np.nan, -0.5]])
    image = render_heatmap(["a", "b"], [0, 10, 20], grid, "t")
    assert image.dtype == np.uint8 and image.shape == (360, 1000, 3)
    assert render_heatmap(["a"] * 90, [0], np.zeros((90, 1)), width=640).shape == (1600, 640, 3)
    with pytest.raises(ValueError, match=r"must have shape \(len\(layers\), len\(steps\)\) = \(2, 2\)"):
        render_heatmap(["a", "b"], [0, 1], grid)
    with pytest.raises(ValueError, match="`width` must be an int >= 400, got 100"):
        render_heatmap(["a", "b"], [0, 10, 20], grid, width=100)


def test_single_event_file_argument(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_report(capsys, str(event_file(run_dir)), "--json")
    assert code == 0
    (section,) = json.loads(out)["runs"]
    assert section["run"] == str(event_file(run_dir)) and section["steps"]["log_steps"] == 20


def test_without_histograms_verdicts_fall_back_to_l2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "run", histograms=False)
    code, out, _ = run_report(capsys, str(tmp_path / "run"), "--json")
    assert code == 0
    (section,) = json.loads(out)["runs"]
    assert section["measure"] == "l2"
    assert section["layers"][0]["numel"] is None and section["layers"][0]["median_rms"] is None
    assert any("element count is unknown" in note for note in section["notes"])
    # L2: 6.7e-8 (first) vs 0.955 (last): still > 1e4 apart
    assert section["layers"][0]["verdicts"][0]["kind"] == "vanishing"
    assert "element count unknown" in section["layers"][0]["verdicts"][0]["message"]


def test_directory_of_runs_gets_one_section_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "lightning_logs" / "version_0", lr_drop_at=50)
    write_run(tmp_path / "lightning_logs" / "version_1", lr_drop_at=150)
    png = tmp_path / "heat.png"
    code, out, _ = run_report(capsys, str(tmp_path / "lightning_logs"), "--json", "--png", str(png))
    assert code == 0
    runs = json.loads(out)["runs"]
    assert [r["run"] for r in runs] == [str(tmp_path / "lightning_logs" / f"version_{i}") for i in (0, 1)]
    assert [r["lr_reductions"][0]["step"] for r in runs] == [50, 150]
    for r in runs:
        assert Path(r["heatmap"]).exists() and Path(r["heatmap"]).parent == tmp_path
    assert [Path(r["heatmap"]).name for r in runs] == [f"heat.version_{i}-gradguard.png" for i in (0, 1)]

    code, out, _ = run_report(capsys, str(tmp_path / "lightning_logs"))
    assert code == 0
    assert out.count("== ") == 2 and "version_0 ==" in out and "version_1 ==" in out


def test_run_without_gradguard_tags_beside_good_runs_is_listed_as_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "a")
    with SummaryWriter(str(tmp_path / "b")) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    code, out, _ = run_report(capsys, str(tmp_path))
    assert code == 0
    assert f"== {tmp_path / 'b'} ==\n(skipped: no GradGuard tags)" in out


# ----------------------------------------------------------------------------------------- bad input
def _bad_cases(tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    """name -> (argument, path the error must name, problem text)."""
    cases: dict[str, tuple[Path, Path, str]] = {}
    missing = tmp_path / "does-not-exist"
    cases["missing"] = (missing, missing, "no such file or directory")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    cases["no event files"] = (empty, empty, "no TensorBoard event files")

    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    cases["not an event file"] = (plain, plain, "not a directory or a TensorBoard event file")

    foreign = tmp_path / "foreign"
    with SummaryWriter(str(foreign)) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
        writer.add_histogram_raw("weights", 0, 1, 2, 1, 1, [0.5, 1.0], [1, 1], 0)
    cases["no gradguard tags"] = (foreign, foreign, "event files hold no GradGuard tags")

    truncated = tmp_path / "truncated"
    write_run(truncated)
    data = event_file(truncated).read_bytes()
    event_file(truncated).write_bytes(data[: len(data) - 37])
    cases["truncated"] = (truncated, event_file(truncated), "truncated or corrupt event file")

    corrupt = tmp_path / "corrupt"
    write_run(corrupt)
    data = bytearray(event_file(corrupt).read_bytes())
    data[len(data) // 2] ^= 0xFF
    event_file(corrupt).write_bytes(bytes(data))
    cases["corrupt"] = (corrupt, event_file(corrupt), "truncated or corrupt event file")

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "events.out.tfevents.123.host").write_bytes(b"this is not a tfrecord file at all, really")
    cases["garbage"] = (garbage, garbage / "events.out.tfevents.123.host", "truncated or corrupt event file")
    return cases


CASES = ["missing", "no event files", "not an event file", "no gradguard tags", "truncated", "corrupt", "garbage"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_error_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arg, named, problem = _bad_cases(tmp_path)[case]
    code, out, err = run_report(capsys, str(arg))
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"gradguard report: error: {named}: ")
    assert problem in err
    assert "Traceback" not in err


def test_truncated_file_inside_a_directory_of_runs_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "good")
    write_run(tmp_path / "bad")
    data = event_file(tmp_path / "bad").read_bytes()
    event_file(tmp_path / "bad").write_bytes(data[:-5])
    code, _, err = run_report(capsys, str(tmp_path), "--json")
    assert code == 2 and str(event_file(tmp_path / "bad")) in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["report"]) == 2
    assert main(["report", "x", "--bogus"]) == 2
    assert main(["report", "--help"]) == 0
    assert "RUN_DIR" in capsys.readouterr().out


def test_python_dash_m_entry_point(run_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(lightning_gradguard.__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, "-m", "lightning_gradguard", "report", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (section,) = json.loads(done.stdout)["runs"]
    assert section["layers"][0]["verdicts"][0]["kind"] == "vanishing"


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


def test_report_heatmap_draws_the_tensorboard_heatmap(tmp_path: Path) -> None:
    """With histograms (element counts known), the report's heatmap and TensorBoard's show one quantity, drawn
    alike."""
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
    assert section["measure"] == "rms"  # element counts known: the per-element RMS
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


def test_report_shows_rollbacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``gradguard report`` on a run that rolled back names the rollback, in text and JSON."""
    import json

    from lightning_gradguard.outputs.report import main as report_main

    from ._models import TinyRegressor

    def fit(nan_at: tuple[int, ...], version: int) -> GradGuard:
        from lightning.pytorch.loggers import TensorBoardLogger

        torch.manual_seed(0)
        guard = GradGuard(histogram_every_n_steps=0)
        logger = TensorBoardLogger(tmp_path, name="run", version=version)
        trainer = make_trainer(tmp_path, [guard], logger=logger, log_every_n_steps=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(TinyRegressor(nan_at_steps=nan_at))
        return guard

    guard = fit((2, 3, 4), 0)
    # non-finite from step 2: step 4 goes back to the newest snapshot before step 2 (the early capture at step 1)
    assert (guard.rollbacks_total, guard.steps_lost) == (1, 3)
    assert report_main(["report", str(tmp_path / "run" / "version_0")]) == 0, capsys.readouterr().err
    assert "rollbacks       1 (3 steps lost): step 4 -> step 1" in capsys.readouterr().out.splitlines()
    assert report_main(["report", str(tmp_path / "run" / "version_0"), "--json"]) == 0
    rollbacks = json.loads(capsys.readouterr().out)["runs"][0]["rollbacks"]
    assert rollbacks == {"total": 1, "steps_lost": 3, "rollbacks": [{"step": 4, "restored_to": 1, "steps_lost": 3}]}

    assert fit((), 1).rollbacks_total == 0
    assert report_main(["report", str(tmp_path / "run" / "version_1")]) == 0
    assert "rollbacks       none" in capsys.readouterr().out.splitlines()


def test_report_on_a_real_run(sigmoid_run: tuple[GradGuard, L.Trainer], tmp_path: Path, capsys: Any) -> None:
    _, trainer = sigmoid_run
    run_dir = Path(trainer.logger.log_dir)  # type: ignore[union-attr]
    png = tmp_path / "heat.png"
    assert main(["report", str(run_dir), "--json", "--png", str(png)]) == 0
    sections = json.loads(capsys.readouterr().out)
    section = sections[0] if isinstance(sections, list) else sections["runs"][0]
    text = json.dumps(section)
    assert "net.0" in text and "vanishing" in text
    assert png.exists() and png.stat().st_size > 10_000
    from PIL import Image

    with Image.open(png) as image:
        width, height = image.size
    assert width == 1000 and height >= 360

"""GradGuard's monitoring: the event file read back holds the documented tags with the right values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_gradguard import GradGuard, GradMonitor
from lightning_gradguard.keys import tag

from ._models import GradRecorder, RankZeroMessages, TinyRegressor, make_trainer, read_events, scalars


def test_layer_and_global_norms_match_an_independent_computation(tmp_path: Path) -> None:
    recorder = GradRecorder()
    guard = GradMonitor(log_every_n_steps=1, histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [recorder, guard], max_steps=6)
    trainer.fit(TinyRegressor())
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    logged = scalars(acc, tag("global_norm"))
    assert sorted(logged) == recorder.steps == list(range(6))
    for step, expected in zip(recorder.steps, recorder.global_norms, strict=True):
        assert logged[step] == pytest.approx(expected, rel=1e-5)
    for layer in ("net.0", "net.2"):
        per_layer = scalars(acc, tag("layer_norm/{layer}", layer=layer))
        for step, norms in zip(recorder.steps, recorder.layer_norms, strict=True):
            assert per_layer[step] == pytest.approx(norms[layer], rel=1e-5)


def test_interval_aggregates_cover_every_step_between_log_steps(tmp_path: Path) -> None:
    recorder = GradRecorder()
    guard = GradMonitor(log_every_n_steps=4, histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [recorder, guard], max_steps=10)
    trainer.fit(TinyRegressor())
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    steps = scalars(acc, tag("steps"))
    # logged at optimizer steps 0, 4, 8 and, at the end of training, for the unlogged tail 9
    assert sorted(steps) == [0, 4, 8, 9]
    assert [steps[s] for s in sorted(steps)] == [1, 4, 4, 1]
    norm_max, norm_mean = scalars(acc, tag("global_norm_max")), scalars(acc, tag("global_norm_mean"))
    norms = recorder.global_norms
    assert norm_max[4] == pytest.approx(max(norms[1:5]), rel=1e-5)
    assert norm_mean[8] == pytest.approx(sum(norms[5:9]) / 4, rel=1e-5)
    assert norm_max[9] == pytest.approx(norms[9], rel=1e-5)


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path: Path) -> None:
    recorder = GradRecorder()
    guard = GradMonitor(log_every_n_steps=1, histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [recorder, guard], max_epochs=1, accumulate_grad_batches=4)
    trainer.fit(TinyRegressor(n=64, batch_size=8))  # 8 batches -> 2 optimizer steps
    assert trainer.global_step == 2
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    logged = scalars(acc, tag("global_norm"))
    assert sorted(logged) == [0, 1]
    assert [logged[0], logged[1]] == pytest.approx(recorder.global_norms, rel=1e-5)


def test_histograms_and_dashboard_are_written(tmp_path: Path) -> None:
    guard = GradMonitor(log_every_n_steps=1, histogram_every_n_steps=3, histogram_bins=10)
    trainer = make_trainer(tmp_path, [guard], max_steps=7)
    trainer.fit(TinyRegressor())
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    hist_tags = acc.Tags()["histograms"]
    assert set(hist_tags) == {tag("hist/{layer}", layer=lay) for lay in ("net.0", "net.2")}
    events = acc.Histograms(tag("hist/{layer}", layer="net.0"))
    assert [e.step for e in events] == [0, 3, 6]
    h = events[0].histogram_value
    assert h.num == 8 * 16 + 16 and len(h.bucket) == 10 and sum(h.bucket) == h.num
    assert h.min < 0 < h.max
    # the custom-scalars layout: "GradGuard" categories whose charts name our tags
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    layout_events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(layout_events[0].tensor_proto.string_val[0])
    categories = [c for c in layout.category if c.title == "GradGuard" or c.title.startswith("GradGuard: ")]
    assert categories[0].title == "GradGuard"
    charts = {chart.title: list(chart.multiline.tag) for c in categories for chart in c.chart}
    assert "^gradguard/global_norm$" in charts["global gradient norm"]
    assert charts["clipping"] == ["^gradguard/clip_rate$", "^gradguard/clipped$"]  # not clipped_total
    assert charts["per-layer gradient norm"] == ["^gradguard/layer_norm/.*"]


def test_scalars_reach_a_csv_logger_and_tensorboard_outputs_are_skipped_with_one_notice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard = GradMonitor(log_every_n_steps=2, histogram_every_n_steps=1)
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = make_trainer(tmp_path, [guard], max_steps=4, logger=logger)
    with caplog.at_level("INFO", logger="lightning.pytorch"):  # other tests may have quieted this logger
        trainer.fit(TinyRegressor())
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    header = text.splitlines()[0].split(",")
    assert tag("global_norm") in header and tag("layer_norm/{layer}", layer="net.0") in header
    notices = [r for r in caplog.records if "no TensorBoardLogger" in r.getMessage()]
    assert len(notices) == 1


def test_at_most_one_device_to_host_transfer_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside GradGuard's hook: no .item(), one .tolist(), no .cpu() -- whatever the number of layers."""
    counts = {"item": 0, "tolist": 0, "cpu": 0, "numpy": 0}
    hook_calls = 0

    class CountingGuard(GradGuard):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
            nonlocal hook_calls
            hook_calls += 1
            originals = {name: getattr(torch.Tensor, name) for name in counts}

            def wrap(name: str):  # type: ignore[no-untyped-def]
                def counted(self_t, *a, **k):  # type: ignore[no-untyped-def]
                    counts[name] += 1
                    return originals[name](self_t, *a, **k)

                return counted

            for name in counts:
                monkeypatch.setattr(torch.Tensor, name, wrap(name))
            try:
                super().on_before_optimizer_step(trainer, pl_module, optimizer)
            finally:
                for name, fn in originals.items():
                    monkeypatch.setattr(torch.Tensor, name, fn)

    # log every step (worst case), no histograms; clipping on
    guard = CountingGuard(log_every_n_steps=1, histogram_every_n_steps=0, clip="fixed", max_norm=0.01)
    trainer = make_trainer(tmp_path, [guard], max_steps=5)
    trainer.fit(TinyRegressor(hidden=32))
    assert hook_calls == 5
    assert counts == {"item": 0, "tolist": 5, "cpu": 0, "numpy": 0}
    assert guard.clipped_steps == 5  # the clipping path ran too


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip": "median"}, "`clip` must be one of auto, fixed, percentile, zscore"),
        ({"max_norm": -1.0}, "`max_norm` must be a finite number > 0"),
        ({"max_norm": float("inf")}, "`max_norm` must be a finite number > 0"),
        ({"on_nonfinite": "ignore"}, "`on_nonfinite` must be one of skip, raise, warn, got 'ignore'"),
        ({"max_consecutive_skips": 0}, "`max_consecutive_skips` must be an int >= 1, got 0"),
        ({"log_every_n_steps": 0}, "`log_every_n_steps` must be an int >= 1, got 0"),
        ({"histogram_every_n_steps": -1}, "`histogram_every_n_steps` must be an int >= 0, got -1"),
        ({"histogram_bins": 0}, "`histogram_bins` must be an int >= 1, got 0"),
        ({"group_by": "layer"}, "`group_by` must be 'module', 'param', an int depth >= 1 or a callable"),
        ({"group_by": 0}, "`group_by` must be an int >= 1, got 0"),
        ({"lr_guard": "yes"}, "`lr_guard` must be True, False or an LRGuard instance"),
        ({"diagnostics": 1}, "`diagnostics` must be True, False or a GradientDiagnostics instance"),
        ({"heatmap_every_n_steps": 1.5}, "`heatmap_every_n_steps` must be an int >= 0, got 1.5 \\(float\\)"),
    ],
)
def test_arguments_are_validated_up_front(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        GradGuard(**kwargs)  # type: ignore[arg-type]


def test_defaults_are_useful() -> None:
    guard = GradGuard()
    assert guard.options.clip == "auto" and guard.options.on_nonfinite == "skip"
    assert guard.options.histogram_every_n_steps == 100
    assert math.isclose(guard.lr_scale, 1.0) and guard.threshold is None


def test_end_of_fit_flush_is_logged_at_the_last_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_gradguard.outputs.report import main

    guard = GradGuard(log_every_n_steps=4, histogram_every_n_steps=0)
    trainer = make_trainer(tmp_path, [guard], max_steps=6)
    with RankZeroMessages() as said:
        trainer.fit(TinyRegressor())
    log_dir = trainer.logger.log_dir  # type: ignore[union-attr]
    assert sorted(scalars(read_events(log_dir), tag("global_norm"))) == [0, 4, 5]  # not 6: the run is steps 0-5
    summaries = [m for m in said.messages if "diagnostics summary" in m]
    assert len(summaries) == 1 and "(steps 0-5)" in summaries[0]
    capsys.readouterr()
    assert main(["report", str(log_dir)]) == 0
    assert "steps           0 .. 5 (" in capsys.readouterr().out

"""Histograms and the heatmap reach W&B (offline run files) and MLflow (file store), read back."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_gradguard.measure.stats import GradStats, HistogramData
from lightning_gradguard.outputs.loggers import (
    MLflowWriter,
    TensorBoardWriter,
    WandbWriter,
    histogram_edges,
    rich_writers,
)

from ._models import read_events

BINS = 8


def _histograms() -> dict[str, HistogramData]:
    """Device-built bins of a small model's gradients, as GradGuard makes them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model(torch.randn(16, 4)).square().mean().backward()
    stats = GradStats(model.named_parameters())
    ranges = stats.histogram_ranges()
    return stats.read_histograms(ranges, stats.histogram_counts(ranges, bins=BINS))


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)


def test_histogram_edges_match_numpy() -> None:
    values = np.array([-1.0, -0.2, 0.1, 0.4, 0.9, 1.0])
    counts, edges = np.histogram(values, bins=4)
    h = HistogramData(
        min=-1.0,
        max=1.0,
        num=6.0,
        sum=float(values.sum()),
        sum_squares=float((values**2).sum()),
        bucket_limits=list(edges[1:]),
        bucket_counts=list(counts.astype(float)),
    )
    got_counts, got_edges = histogram_edges(h)
    np.testing.assert_array_equal(got_counts, counts)
    np.testing.assert_allclose(got_edges, edges)


# ---------------------------------------------------------------- W&B


def _wandb_records(path: Path) -> Iterator[Any]:
    """Records of an offline ``run-*.wandb`` file (W&B header, then LevelDB-log-framed protobufs)."""
    from wandb.proto import wandb_internal_pb2

    block = 32768
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        pending += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _finish_wandb(run: Any) -> None:
    """Finish the run and shut W&B's service process down, so that the run file is complete on disk.

    ``run.finish()`` returns once the service has handled the run's exit record, but the service
    process writes the ``.wandb`` transaction log on its own schedule; read right after ``finish()`` on
    a loaded machine, the file could end before the last history rows. ``wandb.teardown()`` waits for
    the service process to exit, which closes (and so flushes) every file it writes.
    """
    import wandb

    try:
        run.finish()
    finally:
        wandb.teardown()


def _wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    kinds = []
    for record in _wandb_records(path):
        kinds.append(record.WhichOneof("record_type"))
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            node = row
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
        rows.append(row)
    assert "exit" in kinds, f"the run file ends before the run's exit record (records: {kinds})"
    return rows


def test_wandb_offline_run_holds_the_histograms_and_the_heatmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="gradguard-test", save_dir=str(tmp_path), offline=True)
    writers, notices = rich_writers([logger])
    assert [type(w) for w in writers] == [WandbWriter] and notices == []
    hists, image = _histograms(), _image()
    try:
        writers[0].histograms(0, 7, hists)
        writers[0].image("gradguard/heatmap", image, 7)
    finally:
        _finish_wandb(logger.experiment)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = _wandb_history(run_dir)
    hist_row = next(r for r in rows if "gradguard/hist/0" in r)
    assert hist_row["trainer/global_step"] == 7
    for layer, h in hists.items():
        logged = hist_row[f"gradguard/hist/{layer}"]
        assert logged["_type"] == "histogram"
        assert logged["values"] == pytest.approx(h.bucket_counts)
        assert logged["bins"] == pytest.approx([h.min, *h.bucket_limits])
        assert sum(logged["values"]) == h.num
    image_row = next(r for r in rows if "gradguard/heatmap" in r)
    meta = image_row["gradguard/heatmap"]
    assert meta["_type"] == "image-file" and (meta["height"], meta["width"]) == image.shape[:2]
    png = run_dir / "files" / meta["path"]
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), image)


def test_wandb_offline_run_of_a_trainer_fit_receives_gradguard_histograms_and_heatmap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    from lightning_gradguard import GradGuard

    from ._models import GradRecorder, TinyRegressor, make_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(project="gradguard-test", save_dir=str(tmp_path), offline=True)
    recorder = GradRecorder()
    guard = GradGuard(histogram_every_n_steps=3, histogram_bins=BINS, heatmap_every_n_steps=4, log_every_n_steps=2)
    trainer = make_trainer(tmp_path, [recorder, guard], max_steps=8, logger=logger)
    try:
        trainer.fit(TinyRegressor())
    finally:
        _finish_wandb(logger.experiment)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = _wandb_history(run_dir)
    hist_rows = [r for r in rows if "gradguard/hist/net.0" in r]
    assert [r["trainer/global_step"] for r in hist_rows] == [0, 3, 6]
    for row in hist_rows:
        step = row["trainer/global_step"]
        for layer in ("net.0", "net.2"):
            logged = row[f"gradguard/hist/{layer}"]
            assert logged["_type"] == "histogram" and len(logged["values"]) == BINS
            numel = 8 * 16 + 16 if layer == "net.0" else 16 + 1
            assert sum(logged["values"]) == numel  # every gradient element of the layer, binned on the device
            assert logged["bins"][0] <= logged["bins"][-1]
        assert step in recorder.steps
    heatmaps = [r for r in rows if "gradguard/heatmap" in r]
    assert [r["trainer/global_step"] for r in heatmaps] == [
        4,
        7,
    ]  # every 4 steps and at the end of fit (the last step, 7)
    for row in heatmaps:
        meta = row["gradguard/heatmap"]
        assert meta["_type"] == "image-file" and (run_dir / "files" / meta["path"]).is_file()
    scalar_rows = [r for r in rows if "gradguard/update_ratio/net.0" in r]
    assert [r["trainer/global_step"] for r in scalar_rows] == [0, 2, 4, 6]  # the scalars reach W&B too


# ---------------------------------------------------------------- MLflow


def test_mlflow_file_store_holds_the_heatmap_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    from lightning.pytorch.loggers import MLFlowLogger
    from PIL import Image

    logger = MLFlowLogger(experiment_name="gradguard-test", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    writers, notices = rich_writers([logger])
    assert [type(w) for w in writers] == [MLflowWriter]
    assert len(notices) == 1 and "MLflow has no histogram type" in notices[0]
    image = _image()
    writers[0].histograms(0, 3, _histograms())  # skipped: must not fail
    writers[0].image("gradguard/heatmap", image, 3)
    client = logger.experiment
    run_id = str(logger.run_id)
    listed = [a.path for a in client.list_artifacts(run_id, "gradguard/heatmap")]
    assert listed == ["gradguard/heatmap/step_00000003.png"]
    local = client.download_artifacts(run_id, listed[0], str(tmp_path / "download"))
    np.testing.assert_array_equal(np.asarray(Image.open(local).convert("RGB")), image)


# ---------------------------------------------------------------- TensorBoard and the rest


def test_tensorboard_writer_and_a_notice_for_csv(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    writers, notices = rich_writers([csv, tb])
    assert [type(w) for w in writers] == [TensorBoardWriter]
    assert notices == [
        "GradGuard: CSVLogger cannot take histograms or images; they are skipped for it "
        "(its scalars are logged as usual)."
    ]
    hists = _histograms()
    writers[0].histograms(1, 4, hists)
    writers[0].image("gradguard_opt1/heatmap", _image(), 4)
    tb.experiment.flush()
    acc = read_events(tb.log_dir)
    (event,) = acc.Histograms("gradguard_opt1/hist/0")
    assert event.step == 4 and list(event.histogram_value.bucket) == hists["0"].bucket_counts
    (img,) = acc.Images("gradguard_opt1/heatmap")
    assert (img.height, img.width) == (12, 20)

"""The real `tensorboard` server serves what GradGuard writes: scalars, histograms, custom-scalars layout, the
events of a step in one Text-tab entry; on hand-written event files and on a real GradGuard run.

The helpers take a run directory, so pointing the test at a directory written by a GradGuard run
is a one-line change: call :func:`served` on it.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from torch.utils.tensorboard import SummaryWriter

from lightning_gradguard import GradGuard
from lightning_gradguard.keys import tag

TENSORBOARD = Path(sys.executable).with_name("tensorboard")
LAYERS = ["encoder.0", "encoder.2", "head"]
STEPS = [0, 5, 10, 15]
WAIT_S = 90.0

pytestmark = pytest.mark.skipif(not TENSORBOARD.exists(), reason=f"{TENSORBOARD} not installed")


def layout() -> dict[str, dict[str, list[Any]]]:
    return {
        "GradGuard": {
            "global gradient norm": ["Multiline", [tag("global_norm"), tag("global_norm_max")]],
            "per-layer gradient norm": ["Multiline", [f"{tag('layer_norm')}/.*"]],
            "clipping": ["Multiline", [tag("clip_rate")]],
        }
    }


def write_run(run_dir: Path) -> None:
    """Scalars with GradGuard tags, raw histograms and a custom-scalars layout, as GradGuard writes them."""
    with SummaryWriter(str(run_dir)) as writer:
        writer.add_custom_scalars(layout())
        for k, step in enumerate(STEPS):
            writer.add_scalar(tag("global_norm"), 1.0 + k, step)
            writer.add_scalar(tag("global_norm_max"), 2.0 + k, step)
            writer.add_scalar(tag("clip_rate"), 0.25, step)
            for i, layer in enumerate(LAYERS):
                writer.add_scalar(tag("layer_norm/{layer}", layer=layer), 10.0 ** (i - 3), step)
                writer.add_histogram_raw(
                    tag("hist/{layer}", layer=layer),
                    min=-1.0,
                    max=1.0,
                    num=8,
                    sum=0.0,
                    sum_squares=2.0,
                    bucket_limits=[-0.5, 0.5, 1.0],
                    bucket_counts=[2, 4, 2],
                    global_step=step,
                )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as response:
        return json.loads(response.read().decode("utf-8"))


@contextmanager
def tensorboard_server(logdir: Path) -> Iterator[str]:
    """Start ``tensorboard --logdir logdir`` on a free loopback port; yield its base URL; stop it."""
    port = _free_port()
    log = (logdir.parent / f"tensorboard-{port}.log").open("w")
    proc = subprocess.Popen(
        [
            str(TENSORBOARD),
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast",
            "false",
            "--reload_interval",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        log.close()


def served(logdir: Path, run: str = ".", wait_s: float = WAIT_S) -> dict[str, Any]:
    """Start TensorBoard on ``logdir`` and return what its HTTP data API serves for ``run``.

    Keys: ``scalar_tags``, ``histogram_tags`` (tag lists), ``layout`` (custom-scalars layout),
    ``global_norm`` (``[step, value]`` pairs of the global-norm scalar), ``histogram`` (the first
    layer's histogram events). Waits (bounded) until the scalars and histograms have loaded.
    """
    with tensorboard_server(logdir) as base:
        deadline = time.monotonic() + wait_s
        scalars: dict[str, Any] = {}
        histograms: dict[str, Any] = {}
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                scalars = _get(base, "/data/plugin/scalars/tags").get(run, {})
                histograms = _get(base, "/data/plugin/histograms/tags").get(run, {})
                if scalars and histograms:
                    break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError) as exc:
                last_error = exc
            time.sleep(0.5)
        else:
            raise AssertionError(f"TensorBoard served nothing for run {run!r} within {wait_s}s ({last_error})")
        query = urllib.parse.urlencode({"run": run, "tag": tag("global_norm")})
        first_hist = next(t for t in histograms if t.startswith(tag("hist")))
        hquery = urllib.parse.urlencode({"run": run, "tag": first_hist})
        return {
            "scalar_tags": sorted(scalars),
            "histogram_tags": sorted(histograms),
            "layout": _get(base, "/data/plugin/custom_scalars/layout"),
            "global_norm": [[row[1], row[2]] for row in _get(base, f"/data/plugin/scalars/scalars?{query}")],
            "histogram": _get(base, f"/data/plugin/histograms/histograms?{hquery}"),
        }


def test_tensorboard_serves_gradguard_scalars_histograms_and_layout(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    write_run(logdir)
    data = served(logdir)

    expected_scalars = {tag("global_norm"), tag("global_norm_max"), tag("clip_rate")}
    expected_scalars |= {tag("layer_norm/{layer}", layer=layer) for layer in LAYERS}
    assert set(data["scalar_tags"]) == expected_scalars
    assert set(data["histogram_tags"]) == {tag("hist/{layer}", layer=layer) for layer in LAYERS}
    assert data["global_norm"] == [[step, 1.0 + k] for k, step in enumerate(STEPS)]

    # histogram events: one per step; bucket counts sum to num = 8
    assert [event[1] for event in data["histogram"]] == STEPS
    for event in data["histogram"]:
        assert math.isclose(sum(bucket[2] for bucket in event[2]), 8.0)

    categories = data["layout"]["category"]
    assert [c["title"] for c in categories] == ["GradGuard"]
    charts = {chart["title"]: chart["multiline"]["tag"] for chart in categories[0]["chart"]}
    assert charts["global gradient norm"] == [tag("global_norm"), tag("global_norm_max")]
    assert charts["per-layer gradient norm"] == ["gradguard/layer_norm/.*"]


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
        assert len(served["per_event"]) == 1  # TensorBoard shows one entry per step
    assert [step for step, _ in served["joined"]] == [0, 7]
    html = served["joined"][0][1]
    assert all(f"enc.{i}" in html for i in range(5)) and "5 events" in html
    # the report splits joined entries back into events
    section = next(s for s in build_report(tmp_path) if s["run"].endswith("joined"))
    assert [e["text"] for e in section["events"]] == [*verdicts, "skipped optimizer step 7"]


@pytest.mark.skipif(not TENSORBOARD.exists(), reason="tensorboard not installed")
def test_tensorboard_serves_a_real_gradguard_run(sigmoid_run: tuple[GradGuard, L.Trainer]) -> None:
    _, trainer = sigmoid_run
    logdir = Path(trainer.logger.log_dir)  # type: ignore[union-attr]
    data = served(logdir)
    assert tag("global_norm") in data["scalar_tags"] and tag("clip_rate") in data["scalar_tags"]
    assert tag("layer_norm/{layer}", layer="net.0") in data["scalar_tags"]
    assert tag("hist/{layer}", layer="net.0") in data["histogram_tags"]
    assert [c["title"] for c in data["layout"]["category"]] == [
        "GradGuard",
        "GradGuard: layers",
        "GradGuard: LR, clipping, skipped steps",
    ]
    assert len(data["global_norm"]) >= 6

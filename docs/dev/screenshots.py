"""Regenerate the TensorBoard screenshots in ``docs/img`` from a real run of ``examples/quickstart.py``.

    .venv/bin/python docs/dev/screenshots.py [--keep-logs DIR]

Needs a Chromium binary (``apt-get install chromium``). Steps: train the quickstart example into a
temporary log directory, start ``tensorboard --logdir`` on a free local port, load each view in
headless Chromium (``--screenshot``), crop the empty area away and save a palette PNG (each well under
300 KB). The heatmap image is fetched as TensorBoard serves it. Nothing is fetched from the network.
"""

from __future__ import annotations

import argparse
import http.server
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
IMG = ROOT / "docs" / "img"
RUN = "quickstart/version_0"
WIDTH = 1400

# file name -> (URL fragment, window height, crop height)
# Smoothing off (a URL setting); outlier clipping off is a browser-stored setting, see _untick_outliers.
VIEWS: dict[str, tuple[str, int, int]] = {
    "dashboard.png": ("#custom_scalars&_smoothingWeight=0", 1240, 1240),
    "scalars.png": (
        "#scalars&_smoothingWeight=0&tagFilter="
        + urllib.parse.quote("gradguard/(global_norm|threshold|clip_rate|lr_scale)$", safe=""),
        900,
        740,
    ),
    "histograms.png": ("#histograms", 900, 700),
    "events.png": ("#text", 900, 420),
}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=20000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: install it (apt-get install chromium)")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as resp:
        data: bytes = resp.read()
    return data


def _wait_for_run(base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(_get(f"{base}/data/runs")):
                time.sleep(3.0)  # let the reloader finish reading the event files
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"TensorBoard at {base} listed no run within {timeout:.0f} s")


def _save(png: bytes, path: Path, crop_height: int | None = None) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if crop_height is not None:
        image = image.crop((0, 0, image.width, min(crop_height, image.height)))
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size / 1024:.0f} KiB, {image.width}x{image.height})")


def _untick_outliers(chromium: str, port: int, tmp: Path) -> None:
    """Store TensorBoard's "Ignore outliers in chart scaling" as off in the browser profile.

    TensorBoard keeps that checkbox in the page origin's localStorage (key ``_ignoreYOutliers``), which no
    URL can set: serve a one-line page on the port TensorBoard will use (same origin), let the headless
    browser store the setting in its profile, then stop that server. Clipped outliers would hide exactly
    the spikes the dashboard exists to show.
    """
    page = b"<script>localStorage.setItem('_ignoreYOutliers', 'false')</script>ok"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        subprocess.run(
            [
                chromium,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp / 'chromium'}",
                "--dump-dom",
                f"http://127.0.0.1:{port}/",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    finally:
        server.shutdown()
        server.server_close()


def _shoot(
    chromium: str, logdir: Path, views: dict[str, tuple[str, int, int]], tmp: Path, heatmap: bool = False
) -> str:
    """Serve ``logdir`` with TensorBoard and screenshot each view; returns the base URL's run listing."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    _untick_outliers(chromium, port, tmp)
    tensorboard = Path(sys.executable).with_name("tensorboard")
    server = subprocess.Popen(
        [tensorboard, "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_run(base)
        for name, (fragment, height, crop) in views.items():
            shot = tmp / name
            subprocess.run(
                [
                    chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={tmp / 'chromium'}",
                    f"--window-size={WIDTH},{height}",
                    f"--screenshot={shot}",
                    f"{base}/{fragment}",
                ],
                check=True,
                capture_output=True,
                timeout=180,
            )
            _save(shot.read_bytes(), IMG / name, crop)
        if heatmap:
            query = urllib.parse.urlencode({"run": RUN, "tag": "gradguard/heatmap", "sample": 0})
            entries = json.loads(_get(f"{base}/data/plugin/images/images?{query}"))
            if entries:
                _save(_get(f"{base}/data/plugin/images/individualImage?{entries[-1]['query']}"), IMG / "heatmap.png")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-logs", type=Path, default=None, help="train into this folder and keep it")
    args = parser.parse_args()
    chromium = _chromium()
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        logdir = args.keep_logs or tmp / "runs"
        subprocess.run([sys.executable, ROOT / "examples" / "quickstart.py", "--logdir", logdir], check=True)
        run_views = {k: v for k, v in VIEWS.items() if k != "events.png"}
        _shoot(chromium, logdir, run_views, tmp, heatmap=True)
        # The quickstart is a healthy run with no events; the Text tab is shown on the too-high-LR example,
        # where the LR guard acts and explains why.
        events_dir = tmp / "events_runs"
        subprocess.run([sys.executable, ROOT / "examples" / "lr_too_high.py", "--logdir", events_dir], check=True)
        _shoot(chromium, events_dir, {"events.png": VIEWS["events.png"]}, tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

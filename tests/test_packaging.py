"""The package as users install it: an sdist and a wheel that pass ``twine check``, and the wheel (not the
editable install the test suite runs on) trains the quickstart and answers ``gradguard report``.

The clean environment is a fresh venv without pip whose only extra ``sys.path`` entry is the test venv's
site-packages (for torch, lightning, ... — a plain path entry, so the editable install's ``.pth`` hook there
does not run); the wheel is installed into it by pip with ``--python``, console script included.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None or importlib.util.find_spec("twine") is None,
    reason="needs the dev extra (build, twine)",
)


def _run(cmd: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_wheel_and_sdist_build_check_and_run_from_a_clean_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT], cwd=tmp_path)
    wheels = sorted(dist.glob("*.whl"))
    sdists = sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in dist.iterdir())
    check = _run([sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists])
    assert check.stdout.count("PASSED") == 2, check.stdout

    env_dir = tmp_path / "clean"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # without PYTHONPATH: a source checkout on it (with its .egg-info) would read as installed, and pip would skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", wheels[0]], env=env)

    where = _run([py, "-c", "import lightning_gradguard as g; print(g.__file__)"], env=env, cwd=tmp_path)
    where = where.stdout.strip()
    assert Path(where).is_relative_to(site), f"imported {where}, not the wheel in {site}"
    assert (Path(where).parent / "py.typed").exists()

    logdir = tmp_path / "runs"
    demo = _run([py, ROOT / "examples" / "quickstart.py", "--epochs", "1", "--logdir", logdir], env=env, cwd=tmp_path)
    assert "GradGuard" in demo.stdout + demo.stderr
    script = env_dir / "bin" / "gradguard"
    assert script.exists(), "the wheel's console script was not installed"
    report = _run([script, "report", logdir], env=env, cwd=tmp_path)
    assert all(layer in report.stdout for layer in ("net.0", "net.2", "net.4")), report.stdout

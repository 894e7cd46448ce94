#!/usr/bin/env python3
"""Project tasks that need nothing but Python 3.10+ on a fresh machine.

    python3 dev.py demo    # create .venv if needed, train a small model with GradGuard
    python3 dev.py test    # create .venv if needed, ruff + mypy + docs build + pytest
    python3 dev.py bench   # run the benchmarks (prints medians and ratios)

The virtual environment lives in ``.venv`` and is refreshed whenever
``pyproject.toml`` or ``requirements/pinned.txt`` change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".gradguard-stamp"
INPUTS = [ROOT / "pyproject.toml", ROOT / "requirements" / "pinned.txt"]


def _run(*cmd: str | Path, **kwargs: object) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kwargs)  # type: ignore[call-overload]


def _digest() -> str:
    h = hashlib.sha256()
    for path in INPUTS:
        h.update(path.read_bytes())
    return h.hexdigest()


def ensure_env() -> None:
    """Create or refresh ``.venv`` with the pinned CPU torch and the package's extras."""
    if STAMP.exists() and STAMP.read_text() == _digest() and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run(*pip, "--upgrade", "pip")
    _run(*pip, "-r", ROOT / "requirements" / "pinned.txt")
    _run(*pip, "-e", f"{ROOT}[dev,docs,report]")
    STAMP.write_text(_digest())


def demo(args: list[str]) -> None:
    ensure_env()
    _run(PY, ROOT / "examples" / "quickstart.py", *args)


def test(args: list[str]) -> None:
    ensure_env()
    _run(PY, "-m", "ruff", "format", "--check", ".")
    _run(PY, "-m", "ruff", "check", ".")
    _run(PY, "-m", "mypy")
    if (ROOT / "mkdocs.yml").exists():
        quiet = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # no banner about mkdocs' successor
        _run(PY, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", ROOT / "build" / "site", env=quiet)
    _run(PY, "-m", "pytest", "-q", *args)


def bench(args: list[str]) -> None:
    ensure_env()
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        _run(PY, script, *args)


COMMANDS = {"demo": demo, "test": test, "bench": bench, "env": lambda _args: ensure_env()}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python3 dev.py {{{','.join(COMMANDS)}}} [args...]", file=sys.stderr)
        raise SystemExit(2)
    try:
        COMMANDS[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as exc:
        raise SystemExit(exc.returncode) from None


if __name__ == "__main__":
    main()

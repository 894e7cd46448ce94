"""Every example, run in a reduced form, asserting what its README section claims; the commands the
quickstart prints run as printed."""

from __future__ import annotations

import importlib
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ._models import retry_on_exit_abort

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (the examples put their own folder on ``sys.path`` as well)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def test_quickstart_is_healthy_by_its_skips_and_update_ratios(tmp_path: Path) -> None:
    guard = load("quickstart").main(["--max-steps", "210", "--logdir", str(tmp_path)])  # five diagnose steps
    assert guard.threshold is not None  # past the 25-step warmup: the adaptive threshold is in force
    assert guard.skipped_steps == 0
    assert list((tmp_path / "quickstart").glob("version_*/events.out.tfevents.*"))
    engine = guard._first_engine()
    assert engine is not None and all(len(r) == 5 for r in engine.update_ratios.values())  # full windows judged
    assert engine.update_verdicts == []  # no "LR too high" / "not learning" on the healthy demo


def test_vanishing_sigmoid_flagged_bn_relu_not(tmp_path: Path) -> None:
    results = load("vanishing").main(["--max-steps", "30", "--logdir", str(tmp_path)])
    sigmoid, tanh, bn_relu = results["sigmoid"], results["tanh"], results["bn_relu"]
    # The textbook numbers: the first layer's weight gradient is ~1e-8 of the last layer's.
    assert sigmoid.first_layer_norm < 1e-6 * sigmoid.last_layer_norm
    vanishing = sigmoid.flagged("vanishing")
    assert vanishing[:2] == ["net.fc1", "net.fc2"]  # the early layers, named, in model order
    assert "net.fc10" not in vanishing
    assert "vanishing" in sigmoid.summary and "Remedies" in sigmoid.summary
    assert all("Remedy:" in v for v in sigmoid.verdicts)
    assert bn_relu.verdicts == []
    assert "no vanishing" in bn_relu.summary
    # Tanh: early layers get smaller gradients, but within the ratio GradGuard tolerates (1e4 per element).
    assert tanh.first_layer_rms < tanh.last_layer_rms
    assert tanh.first_layer_rms > 1e-4 * tanh.last_layer_rms
    assert tanh.flagged("vanishing") == []


def test_exploding_rnn_nonfinite_without_guard_finite_with_gradguard(tmp_path: Path) -> None:
    argv = ["--max-steps", "106", "--short-steps", "100", "--seq-len", "60", "--modes", "none,gradguard"]
    results = load("exploding_rnn").main([*argv, "--logdir", str(tmp_path)])
    unguarded, guarded = results["none"], results["gradguard"]
    assert unguarded.went_nonfinite
    assert unguarded.first_nonfinite_step is not None and unguarded.first_nonfinite_step >= 100  # after the switch
    assert all(math.isfinite(v) for v in unguarded.losses[:100])
    assert not guarded.went_nonfinite
    assert len(guarded.losses) == 106
    assert guarded.clipped_steps is not None and guarded.clipped_steps >= 1
    assert guarded.skipped_steps == 0


def test_lr_too_high_lr_guard_fires_and_loss_is_lower(tmp_path: Path) -> None:
    results = load("lr_too_high").main(["--max-steps", "200", "--logdir", str(tmp_path)])
    with_guard, without = results["lr_guard"], results["no_lr_guard"]
    # The clipping-only run diverges (its ceiling is relative to the first norms, which this LR already makes
    # too large); the LR guard sees the loss climb above twice its best level while the norms keep pressing the
    # clip threshold, and cuts the LR until the run trains.
    assert with_guard.lr_scale <= 0.5 and len(with_guard.reductions) >= 1
    assert all("The training loss is not improving" in r for r in with_guard.reductions)
    assert without.lr_scale == 1.0 and without.reductions == []
    assert with_guard.mean_loss(50) < 0.6 * without.mean_loss(50)
    # Same weights and batches until the guard acts: compare up to the first reduction.
    first = int(re.search(r"LR guard: step (\d+):", with_guard.reductions[0])[1])  # type: ignore[index]
    assert first >= 50
    assert with_guard.losses[: first + 1] == without.losses[: first + 1]


def test_ddp_cpu_two_ranks_same_decisions(tmp_path: Path) -> None:
    example = load("ddp_cpu")
    reports = retry_on_exit_abort(lambda: example.main(["--max-steps", "30", "--logdir", str(tmp_path)]))
    assert sorted(r["global_rank"] for r in reports) == [0, 1]
    assert {r["world_size"] for r in reports} == {2}
    assert {r["backend"] for r in reports} == {"gloo"}
    assert {r["steps"] for r in reports} == {30}
    assert reports[0]["threshold"] is not None
    assert reports[0]["threshold"] == reports[1]["threshold"]
    assert reports[0]["clipped_steps"] == reports[1]["clipped_steps"]
    assert reports[0]["weight_checksum"] == reports[1]["weight_checksum"]  # replicas stayed identical


def test_cli_yaml_configures_gradguard(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    import yaml

    from lightning_gradguard import GradGuard

    argv = [
        "fit",
        "--config",
        str(EXAMPLES / "cli_config.yaml"),
        "--trainer.max_steps",
        "30",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    ]
    cli = load("cli").main(argv)
    guards = [c for c in cli.trainer.callbacks if isinstance(c, GradGuard)]
    assert len(guards) == 1
    guard = guards[0]
    options = guard.options
    assert options.clip == "auto" and options.max_norm == 10.0 and options.histogram_every_n_steps == 50
    # the recovery and update-ratio options of the YAML reached the callback
    assert guard._recovery is not None and guard._recovery.trigger.max_rollbacks == 5
    assert guard._recovery.every_n_steps == 50 and options.log_update_ratios
    assert cli.trainer.global_step == 30
    (run,) = (tmp_path / "cli").glob("version_*")
    # The config LightningCLI saved next to the logs: the nested LRGuard came through with its init_args.
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (callback,) = saved["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_gradguard.GradGuard"
    lr_guard = callback["init_args"]["lr_guard"]
    assert lr_guard["class_path"] == "lightning_gradguard.LRGuard"
    assert lr_guard["init_args"]["patience"] == 10 and lr_guard["init_args"]["cooldown"] == 100
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"gradguard/global_norm", "gradguard/threshold", "gradguard/clip_rate"} <= scalars
    assert any(t.startswith("gradguard/layer_norm/") for t in scalars)
    assert any(t.startswith("gradguard/update_ratio/") for t in scalars)
    assert "gradguard/rollbacks_total" in scalars


def test_alerts_hook_forwards_structured_records(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    from dataclasses import dataclass, field
    from typing import Any

    alerts = load("alerts")

    @dataclass(frozen=True)
    class Event:  # the documented GuardEvent shape
        kind: str
        step: int
        message: str
        layers: tuple[str, ...] = ()
        evidence: dict[str, Any] = field(default_factory=dict)

    alerts.SENT.clear()
    alerts.to_slack(Event("skip", 12, "GradGuard: skipped step 12", ("fc1",), {"global_norm": math.inf, "lr": 0.1}))
    line = capsys.readouterr().out.strip()
    payload = json.loads(line)
    assert payload["gradguard"] == {
        "kind": "skip",
        "step": 12,
        "message": "GradGuard: skipped step 12",
        "layers": ["fc1"],
        "evidence": {"global_norm": "inf", "lr": 0.1},
    }
    assert payload["text"].startswith(":rotating_light: GradGuard skip at step 12 in fc1: ")


def test_alerts_example_run_reaches_the_hook(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    sent = load("alerts").main(["--max-steps", "200"])
    kinds = [p["gradguard"]["kind"] for p in sent]
    assert "lr_reduction" in kinds, "the LR guard fires in this run, and its event reaches the hook"
    assert all(isinstance(p["gradguard"]["step"], int) and p["gradguard"]["message"] for p in sent)
    reduction = next(p["gradguard"] for p in sent if p["gradguard"]["kind"] == "lr_reduction")
    evidence = reduction["evidence"]
    assert evidence["lr_scale"] == 0.5 and evidence["reason"] in ("approach", "rise", "stall")
    measured = "update_ratio" if evidence["reason"] == "stall" else "norm"
    assert float(evidence[measured]) > 0  # the number behind the cut
    too_fast = [p["gradguard"] for p in sent if p["gradguard"]["evidence"].get("verdict") == "lr_too_high"]
    assert too_fast and all(r["kind"] == "verdict" and len(r["layers"]) == 1 for r in too_fast)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert printed == sent  # what the fake webhook received is what the hook built, one JSON line each


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


def test_forensics_tells_data_from_a_transient_fault_and_skips_on_restart(tmp_path: Path) -> None:
    result = load("forensics").main(["--logdir", str(tmp_path)])
    poisoned, fault = result["guard"].incidents
    assert (poisoned.kind, poisoned.replay, poisoned.origin) == ("skipped", "reproducible", "net.0")
    assert 300 in (poisoned.sample_ids or ())
    assert (fault.kind, fault.step, fault.replay, fault.leader) == ("norm_spike", 40, "transient", "net.4")
    (dropped,) = result["dropped"]
    assert "is on the skip list (it holds 32 samples (288, 289, 290, ..., 319) of the list" in dropped
    assert result["restarted"].skip_list is not None and 300 in result["restarted"].skip_list.sample_ids
    assert (result["run_dir"] / "incidents.jsonl").is_file()

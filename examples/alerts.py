"""Alerts: forward every GradGuard event to a (fake) Slack webhook as it happens.

    python examples/alerts.py [--max-steps N] [--lr LR]

GradGuard hands each event (a skipped step, an LR reduction, a diagnostic verdict, a rollback) to the
``on_event`` callable as a ``GuardEvent(kind, step, message, layers, evidence)``; the events also keep
going to warnings and TensorBoard's Text tab. This example trains the LR-too-high regression of
``lr_too_high.py`` (SGD at LR 0.2) so that the LR guard fires, and posts each event to
:func:`slack_webhook`, which prints the JSON payload a real webhook would receive (swap its body for
``requests.post(WEBHOOK_URL, json=payload, timeout=5)``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import capture_gradguard_messages, quiet_lightning
from lr_too_high import Regressor, regression_data

from lightning_gradguard import GradGuard
from lightning_gradguard.outputs.alerts import EventLike, event_record

SENT: list[dict[str, Any]] = []


def slack_webhook(payload: dict[str, Any]) -> None:
    """Stands in for ``requests.post(WEBHOOK_URL, json=payload, timeout=5)``: one JSON line per post."""
    SENT.append(payload)
    print(json.dumps(payload, sort_keys=True))


def to_slack(event: EventLike) -> None:
    """The hook: five lines from a GradGuard event to a Slack message (text + the structured record)."""
    record = event_record(event)
    layers = f" in {', '.join(record['layers'])}" if record["layers"] else ""
    text = f":rotating_light: GradGuard {record['kind']} at step {record['step']}{layers}: {record['message']}"
    slack_webhook({"text": text, "gradguard": record})


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.2)
    args = parser.parse_args(argv)
    quiet_lightning()
    SENT.clear()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.max_steps,
        logger=False,
        callbacks=[GradGuard(on_event=to_slack, diagnose_every_n_steps=10)],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with capture_gradguard_messages():  # the same events as warnings; hidden here, the webhook prints them
        trainer.fit(Regressor(lr=args.lr), DataLoader(regression_data(), batch_size=64, shuffle=True))
    print(f"{len(SENT)} event(s) forwarded")
    return list(SENT)


if __name__ == "__main__":
    main()

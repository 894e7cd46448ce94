"""The docs' logged-keys table matches the tag registry, and every tag written is documented."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_gradguard import GradGuard
from lightning_gradguard.keys import KEYS

from ._models import TinyRegressor, make_trainer, read_events

DOC = Path(__file__).resolve().parents[1] / "docs" / "logged-keys.md"
ROW = re.compile(r"^\| `gradguard/(?P<name>[^`]+)` \| (?P<kind>\w+) \| (?P<meaning>[^|]+) \| (?P<cadence>[^|]+) \|$")


def _documented() -> dict[str, tuple[str, str, str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            rows[m["name"]] = (m["kind"], m["meaning"].strip(), m["cadence"].strip())
    return rows


def test_docs_table_equals_the_registry() -> None:
    assert _documented() == {k.name: (k.kind, k.meaning, k.cadence) for k in KEYS}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile("^gradguard/" + re.escape(name).replace(re.escape("{layer}"), ".+") + "$")


def test_every_written_tag_is_documented_and_the_core_ones_are_written(tmp_path: Path) -> None:
    guard = GradGuard(log_every_n_steps=2, histogram_every_n_steps=2, heatmap_every_n_steps=4)
    trainer = make_trainer(tmp_path, [guard], max_steps=9)
    trainer.fit(TinyRegressor(nan_at_steps=(3,)))
    acc = read_events(trainer.logger.log_dir)  # type: ignore[union-attr]
    tags = acc.Tags()
    written = {t for kind in ("scalars", "histograms", "images") for t in tags[kind] if t.startswith("gradguard")}
    written |= {t.rsplit("/text_summary", 1)[0] for t in tags["tensors"] if t.startswith("gradguard")}
    patterns = [_pattern(k.name) for k in KEYS]
    undocumented = [t for t in written if not any(p.match(t) for p in patterns)]
    assert undocumented == []
    for name in (
        "global_norm",
        "global_norm_max",
        "global_norm_mean",
        "steps",
        "clip_rate",
        "skipped",
        "lr_scale",
        "loss",
        "layer_norm_min",
        "layer_norm_median",
        "layer_norm_max",
        "weight_norm/net.0",
        "update_ratio/net.2",
    ):
        assert f"gradguard/{name}" in written
    assert "gradguard/hist/net.0" in written and "gradguard/layer_norm/net.2" in written
    assert "gradguard/events" in written  # the skipped step at 3

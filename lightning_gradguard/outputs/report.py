"""``gradguard report RUN_DIR``: a gradient-health report from TensorBoard event files.

Reads the event files with TensorBoard's own record reader
(:class:`tensorboard.backend.event_processing.event_file_loader.RawEventFileLoader`, then
``data_compat`` to the current summary format), and prints for every run and optimizer namespace:

* a summary: steps, global-norm percentiles, clip rate, skipped steps, LR reductions with their steps
  (from drops of the ``lr_scale`` scalar, else from the ``lr_reduction`` event records), rollbacks (the
  step of each, the step restored and the steps lost, from the ``rollback`` event records and the
  ``rollbacks_total`` / ``steps_lost`` scalars), the last events;
* a per-layer table: median/min/max L2 norm, median per-element RMS, and the verdicts of
  :class:`~lightning_gradguard.decide.diagnostics.GradientDiagnostics` replayed over the logged layer norms;
* with ``--png PATH`` the layer x step heatmap of log10 L2 norms (the quantity of the TensorBoard
  heatmap image); with ``--json`` one JSON document instead of text.

Events are read from their JSON records (the ``event_records`` text tag, one
:func:`~lightning_gradguard.outputs.alerts.event_json` record per event, beside the ``events`` text). Event
files written by GradGuard versions without that tag hold only the text: for the steps without records the
events come from the text, and the LR reductions and rollbacks among them are recognised by the fixed
beginning of their messages (:func:`_text_record`).

A directory holding several runs (sub-directories with event files) gets one section per run.
Bad input (missing path, no event files, no GradGuard tags, a truncated or corrupt event file) gets
a one-line error on stderr naming the path and the problem, and exit code 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_gradguard.decide.diagnostics import GradientDiagnostics, plural
from lightning_gradguard.errors import GradGuardError
from lightning_gradguard.forensics.incidents import INCIDENTS_FILE, Incident, read_incidents
from lightning_gradguard.forensics.postmortem import describe, render_postmortem
from lightning_gradguard.outputs.tensorboard import split_events

__all__ = ["ReportError", "RunData", "build_report", "find_runs", "main", "read_run"]

_NAMESPACE = re.compile(r"^(gradguard(?:_opt\d+)?)/(.+)$")
# Event files without `event_records` (older GradGuard versions): the text of an LR reduction
# (`LRReduction.message()`) and of a rollback (`Recovery`), the only events the report reads more than the text of.
_LR_EVENT = re.compile(r"^LR guard: step (\d+): LR scale (\S+) -> (\S+) \(reduction \d+\)")
_ROLLBACK_EVENT = re.compile(r"^rollback \d+/\d+: step (\d+): .*; restored step (\d+) \((\d+) step\(s\) lost\)")


class ReportError(GradGuardError):
    """Bad input for the report: ``path`` and a one-line ``problem``."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class RunData:
    """Everything the report uses from one run directory (tags in order of first appearance)."""

    path: Path
    files: list[Path] = field(default_factory=list)
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    hist_numel: dict[str, int] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)


def _is_event_file(name: str) -> bool:
    return "tfevents" in name


def find_runs(path: str | os.PathLike[str]) -> list[Path]:
    """Directories under ``path`` (itself included) that directly hold event files, sorted.

    Raises:
        ReportError: the path does not exist, is not a directory or event file, or holds no event files.
    """
    root = Path(path)
    if not root.exists():
        raise ReportError(root, "no such file or directory")
    if root.is_file():
        if not _is_event_file(root.name):
            raise ReportError(root, "not a directory or a TensorBoard event file (events.out.tfevents.*)")
        return [root]
    runs: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(_is_event_file(f) for f in filenames):
            runs.append(Path(dirpath))
    if not runs:
        raise ReportError(root, "no TensorBoard event files (events.out.tfevents.*) found")
    return sorted(runs)


def _read_file(path: Path, run: RunData) -> None:
    from tensorboard import data_compat
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    try:
        size = path.stat().st_size
        loader = RawEventFileLoader(str(path))
        consumed = 0
        records: list[bytes] = []
        for record in loader.Load():
            consumed += len(record) + 16  # 8-byte length, 4-byte length crc, data, 4-byte data crc
            records.append(record)
    except OSError as exc:
        raise ReportError(path, f"cannot read event file ({exc.strerror or exc})") from None
    except Exception as exc:
        raise ReportError(path, f"corrupt event file ({type(exc).__name__}: {exc})") from None
    if consumed != size:
        raise ReportError(
            path,
            f"truncated or corrupt event file: only the first {consumed} of {size} bytes are valid records",
        )
    for record in records:
        try:
            event = data_compat.migrate_event(event_pb2.Event.FromString(record))
        except Exception as exc:
            raise ReportError(path, f"corrupt event record ({type(exc).__name__}: {exc})") from None
        if not event.HasField("summary"):
            continue
        step = int(event.step)
        for value in event.summary.value:
            name = value.tag
            if not _NAMESPACE.match(name):
                continue
            plugin = value.metadata.plugin_data.plugin_name
            try:
                array = tensor_util.make_ndarray(value.tensor)
            except Exception as exc:
                raise ReportError(path, f"corrupt summary value {name!r} ({exc})") from None
            if plugin == "scalars":
                run.scalars.setdefault(name, {})[step] = float(array.item())
            elif plugin == "histograms":
                if array.ndim == 2 and array.shape[1] == 3:
                    run.hist_numel[name] = round(float(array[:, 2].sum()))
            elif plugin == "text":
                name = name.removesuffix("/text_summary")
                texts = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in array.flat]
                run.texts.setdefault(name, []).extend((step, t) for t in split_events("\n".join(texts)))
            else:
                continue
            if name not in run.tags:
                run.tags.append(name)


def read_run(path: str | os.PathLike[str]) -> RunData:
    """Read every event file of one run directory (or one event file), in file-name order.

    Raises:
        ReportError: a file cannot be read or is truncated or corrupt.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if _is_event_file(p.name))
    run = RunData(path=path, files=files)
    for file in files:
        _read_file(file, run)
    return run


# ---------------------------------------------------------------------------------------------- analysis
def _percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default; ``nan`` for no values).

    ``statistics.quantiles(method="inclusive")`` cuts at the same points but interpolates with a different
    formula (results can differ in the last bit) and needs two values under Python 3.10.
    """
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _text_record(step: int, text: str) -> dict[str, Any]:
    """An event read from its text alone (event files without ``event_records``), shaped like an event record.

    Only what the report uses is recovered: the LR scales of an LR reduction, the restored step and steps
    lost of a rollback; every other event keeps its text and no kind.
    """
    record: dict[str, Any] = {"kind": None, "step": step, "message": text, "layers": [], "evidence": {}}
    if (m := _LR_EVENT.match(text)) is not None:
        record.update(kind="lr_reduction", evidence={"lr_scale_before": m.group(2), "lr_scale": m.group(3)})
    elif (m := _ROLLBACK_EVENT.match(text)) is not None:
        record.update(kind="rollback", evidence={"restored_to": int(m.group(2)), "steps_lost": int(m.group(3))})
    return record


def _event_records(run: RunData, ns: str) -> list[dict[str, Any]]:
    """The events of namespace ``ns`` as records (:func:`~lightning_gradguard.outputs.alerts.event_record`), by step.

    From ``event_records`` where the run wrote it; the steps with text events but no records (an event file
    of an older version) are read from the text by :func:`_text_record`. Within a step the written order is kept.
    """
    records: list[tuple[int, dict[str, Any]]] = []
    for step, text in run.texts.get(f"{ns}/event_records", []):
        try:
            record = json.loads(text)
        except ValueError as exc:
            raise ReportError(run.path, f"corrupt event record at step {step} of {ns}/event_records ({exc})") from None
        if not (
            isinstance(record, dict)
            and {"kind", "message"} <= record.keys()
            and isinstance(record.get("evidence"), dict)
        ):
            raise ReportError(run.path, f"corrupt event record at step {step} of {ns}/event_records: {text[:80]!r}")
        records.append((step, {**record, "step": step}))
    recorded = {step for step, _ in records}
    records += [(s, _text_record(s, t)) for s, t in run.texts.get(f"{ns}/events", []) if s not in recorded]
    return [record for _, record in sorted(records, key=lambda r: r[0])]  # stable: in-step order kept


def _series(run: RunData, ns: str, name: str) -> list[tuple[int, float]]:
    return sorted(run.scalars.get(f"{ns}/{name}", {}).items())


def _namespaces(run: RunData) -> list[str]:
    found: list[str] = []
    for name in run.tags:
        match = _NAMESPACE.match(name)
        if match and match.group(1) not in found:
            found.append(match.group(1))
    return sorted(found, key=lambda ns: (ns != "gradguard", ns))


def _section(run: RunData, ns: str, label: str) -> dict[str, Any]:
    notes: list[str] = []
    steps_logged = sorted({s for name, d in run.scalars.items() if name.startswith(ns + "/") for s in d})
    interval_steps = _series(run, ns, "steps")
    optimizer_steps = int(sum(v for _, v in interval_steps)) if interval_steps else None

    global_norm = [v for _, v in _series(run, ns, "global_norm")]
    finite_norms = [v for v in global_norm if math.isfinite(v)]
    norm_max = [v for _, v in _series(run, ns, "global_norm_max") if math.isfinite(v)] or finite_norms
    global_stats: dict[str, Any] = {
        "count": len(global_norm),
        "nonfinite": len(global_norm) - len(finite_norms),
        "p50": _percentile(finite_norms, 50),
        "p90": _percentile(finite_norms, 90),
        "p99": _percentile(finite_norms, 99),
        "max": max(norm_max) if norm_max else math.nan,
    }

    clip_rate_series = _series(run, ns, "clip_rate")
    clipped_total = _series(run, ns, "clipped_total")
    clipping: dict[str, Any] | None = None
    if clip_rate_series or clipped_total:
        weights = dict(interval_steps)
        total_w = sum(weights.get(s, 1.0) for s, _ in clip_rate_series)
        rate = sum(r * weights.get(s, 1.0) for s, r in clip_rate_series) / total_w if total_w else math.nan
        thresholds = [v for _, v in _series(run, ns, "threshold") if math.isfinite(v)]
        clipping = {
            "clipped_steps": int(clipped_total[-1][1]) if clipped_total else None,
            "clip_rate": rate,
            "threshold_median": statistics.median(thresholds) if thresholds else None,
        }

    skipped_total = _series(run, ns, "skipped_total")
    skipped = _series(run, ns, "skipped")
    scaler = _series(run, ns, "scaler_skipped")
    skipped_steps = int(skipped_total[-1][1]) if skipped_total else int(sum(v for _, v in skipped)) if skipped else None

    lr_scale = _series(run, ns, "lr_scale")
    event_records = _event_records(run, ns)
    events: list[dict[str, Any]] = [{"step": r["step"], "text": r["message"]} for r in event_records]
    lr_records = [r for r in event_records if r["kind"] == "lr_reduction"]
    lr_events = [{"step": r["step"], "text": r["message"]} for r in lr_records]
    if lr_scale:
        reductions = [
            {"step": s, "from": prev, "to": cur, "source": "lr_scale"}
            for (_, prev), (s, cur) in itertools.pairwise(lr_scale)
            if cur < prev * (1 - 1e-9)
        ]
    else:  # lr_scale not logged: the LR guard's own events, one per reduction
        reductions = [
            {
                "step": r["step"],
                "from": _float(r["evidence"].get("lr_scale_before")),
                "to": _float(r["evidence"].get("lr_scale")),
                "source": "events",
            }
            for r in lr_records
        ]

    rollbacks_total = _series(run, ns, "rollbacks_total")
    steps_lost = _series(run, ns, "steps_lost")
    rollback_items = [  # the rollbacks taken (the records of a rollback declined have no restored step)
        {
            "step": r["step"],
            "restored_to": int(r["evidence"]["restored_to"]),
            "steps_lost": int(r["evidence"]["steps_lost"]),
        }
        for r in event_records
        if r["kind"] == "rollback" and "restored_to" in r["evidence"]
    ]
    rollbacks: dict[str, Any] | None = None
    if rollbacks_total or rollback_items:  # recovery on (its scalars) or its events
        rollbacks = {
            "total": int(rollbacks_total[-1][1]) if rollbacks_total else len(rollback_items),
            "steps_lost": int(steps_lost[-1][1]) if steps_lost else sum(r["steps_lost"] for r in rollback_items),
            "rollbacks": rollback_items,
        }

    layers = [t[len(ns) + len("/layer_norm/") :] for t in run.tags if t.startswith(f"{ns}/layer_norm/")]
    numels = {layer: run.hist_numel[f"{ns}/hist/{layer}"] for layer in layers if f"{ns}/hist/{layer}" in run.hist_numel}
    if layers and len(numels) < len(layers):
        missing = len(layers) - len(numels)
        notes.append(
            f"no gradient histogram for {missing} of {len(layers)} layers, so their element count is "
            "unknown: their vanishing verdicts compare L2 norms, which grow with layer size"
        )
    if not layers:
        notes.append("no per-layer norms logged (layer_norm/*): no per-layer table, verdicts or heatmap")

    diagnostics = GradientDiagnostics()
    layer_steps = sorted({s for layer in layers for s in run.scalars[f"{ns}/layer_norm/{layer}"]})
    for step in layer_steps:
        norms = {
            layer: run.scalars[f"{ns}/layer_norm/{layer}"][step]
            for layer in layers
            if step in run.scalars[f"{ns}/layer_norm/{layer}"]
        }
        diagnostics.observe(step, norms, numels)
    records = diagnostics.records()

    table = []
    for layer in layers:
        values = list(run.scalars[f"{ns}/layer_norm/{layer}"].values())
        finite = [v for v in values if math.isfinite(v)]
        numel = numels.get(layer)
        median = statistics.median(finite) if finite else math.nan
        table.append(
            {
                "layer": layer,
                "numel": numel,
                "median": median,
                "min": min(finite) if finite else math.nan,
                "max": max(finite) if finite else math.nan,
                "nonfinite": len(values) - len(finite),
                "median_rms": median / math.sqrt(numel) if numel else None,
                "verdicts": [{"kind": kind, **rec} for kind, rec in records.get(layer, {}).items()],
            }
        )
    return {
        "run": label,
        "namespace": ns,
        "steps": {
            "first": steps_logged[0] if steps_logged else None,
            "last": steps_logged[-1] if steps_logged else None,
            "log_steps": len(steps_logged),
            "optimizer_steps": optimizer_steps,
        },
        "global_norm": global_stats,
        "clipping": clipping,
        "skipped_steps": skipped_steps,
        "scaler_skipped_steps": int(sum(v for _, v in scaler)) if scaler else None,
        "lr_scale_final": lr_scale[-1][1] if lr_scale else None,
        "lr_reductions": reductions,
        "lr_events": lr_events,
        "rollbacks": rollbacks,
        "events": events,
        "measure": "rms" if numels else "l2",
        "layers": table,
        "diagnostics_summary": diagnostics.summary(),
        "notes": notes,
        "heatmap": None,
        "_layer_steps": layer_steps,
    }


def build_report(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One section per run and optimizer namespace under ``path``.

    Raises:
        ReportError: bad input (see the module docstring).
    """
    root = Path(path)
    runs = find_runs(root)
    sections: list[dict[str, Any]] = []
    without: list[Path] = []
    for run_path in runs:
        run = read_run(run_path)
        namespaces = _namespaces(run)
        if not namespaces:
            without.append(run_path)
            continue
        rel = run_path.relative_to(root) if root.is_dir() else Path(".")
        label = str(root if str(rel) == "." else root / rel)
        incidents = _incidents(run_path)
        for ns in namespaces:
            section = _section(run, ns, label)
            section["_run"] = run
            section["_rel"] = run_path.name if str(rel) == "." else str(rel)
            index = _optimizer_index(ns)
            mine = [i for i in incidents if i.optimizer == index]
            section["incidents"] = [i.to_json() for i in mine]
            section["_incidents"] = mine
            sections.append(section)
    if not sections:
        where = runs[0] if len(runs) == 1 else root
        raise ReportError(
            where,
            "event files hold no GradGuard tags (gradguard/...); was the run trained with GradGuard "
            "and a TensorBoard logger?",
        )
    for run_path in without:
        sections.append({"run": str(run_path), "namespace": None, "skipped": "no GradGuard tags"})
    return sections


def _incidents(run_path: Path) -> list[Incident]:
    """The incidents GradGuard wrote beside the event files of ``run_path`` (``incidents.jsonl``), if any."""
    path = run_path / INCIDENTS_FILE if run_path.is_dir() else run_path.parent / INCIDENTS_FILE
    if not path.is_file():
        return []
    try:
        return read_incidents(path)
    except ValueError as exc:
        raise ReportError(path, str(exc)) from None


def _optimizer_index(namespace: str) -> int:
    """``gradguard`` -> 0, ``gradguard_opt1`` -> 1 (the namespaces of :func:`~lightning_gradguard.keys.namespace`)."""
    match = re.search(r"(\d+)$", namespace)
    return int(match.group(1)) if match and namespace != "gradguard" else 0


# ---------------------------------------------------------------------------------------------- output
def _fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def _heatmap_grid(section: dict[str, Any]) -> tuple[list[str], list[int], Any]:
    """Layers, steps and log10 L2-norm grid of a section: the quantity of the TensorBoard heatmap."""
    from lightning_gradguard.outputs.heatmap import norm_grid

    run: RunData = section["_run"]
    ns = section["namespace"]
    layers = [row["layer"] for row in section["layers"]]
    steps: list[int] = section["_layer_steps"]
    norms = {layer: run.scalars[f"{ns}/layer_norm/{layer}"] for layer in layers}
    return layers, steps, norm_grid(layers, steps, norms)


def _heatmap(section: dict[str, Any], png: Path) -> None:
    from lightning_gradguard.outputs.heatmap import NORM_LABEL, render_heatmap

    layers, steps, grid = _heatmap_grid(section)
    title = f"{section['run']} ({section['namespace']})" if section["namespace"] != "gradguard" else section["run"]
    image = render_heatmap(layers, steps, grid, f"Gradient norm per layer: {title}", colorbar_label=NORM_LABEL)
    import matplotlib.image

    matplotlib.image.imsave(png, image)


def _png_path(base: Path, section: dict[str, Any], many: bool) -> Path:
    if not many:
        return base
    suffix = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{section['_rel']}-{section['namespace']}").strip("_")
    return base.with_name(f"{base.stem}.{suffix}{base.suffix or '.png'}")


def _text(section: dict[str, Any]) -> str:
    if section.get("skipped"):
        return f"== {section['run']} ==\n(skipped: {section['skipped']})\n"
    out: list[str] = []
    ns = section["namespace"]
    out.append(f"== {section['run']} ({ns}) ==" if ns != "gradguard" else f"== {section['run']} ==")
    st = section["steps"]
    opt = f", {plural(st['optimizer_steps'], 'optimizer step')}" if st["optimizer_steps"] is not None else ""
    if st["log_steps"]:
        out.append(f"steps           {st['first']} .. {st['last']} ({plural(st['log_steps'], 'log step')}{opt})")
    else:
        out.append("steps           no GradGuard scalars logged")
    g = section["global_norm"]
    if g["count"]:
        nonfinite = f", {g['nonfinite']} non-finite" if g["nonfinite"] else ""
        out.append(
            f"global norm     p50 {_fmt(g['p50'])}  p90 {_fmt(g['p90'])}  p99 {_fmt(g['p99'])}  "
            f"max {_fmt(g['max'])}{nonfinite}"
        )
    c = section["clipping"]
    if c is not None:
        clipped = "" if c["clipped_steps"] is None else f"{plural(c['clipped_steps'], 'clipped step')}, "
        thr = "" if c["threshold_median"] is None else f", median threshold {_fmt(c['threshold_median'])}"
        out.append(f"clipping        {clipped}clip rate {_fmt(100 * c['clip_rate'], '.1f')}%{thr}")
    else:
        out.append("clipping        not logged (monitoring only)")
    if section["skipped_steps"] is not None:
        scaler = section["scaler_skipped_steps"]
        extra = f"; {scaler} skipped by the AMP GradScaler" if scaler is not None else ""
        out.append(f"skipped steps   {section['skipped_steps']} (non-finite gradients){extra}")
    reductions = section["lr_reductions"]
    if reductions:
        source = " (from events)" if reductions[0]["source"] == "events" else ""
        items = ", ".join(f"step {r['step']} (lr_scale {_fmt(r['from'])} -> {_fmt(r['to'])})" for r in reductions)
        out.append(f"LR reductions   {len(reductions)}{source}: {items}")
    elif section["lr_scale_final"] is not None:
        out.append("LR reductions   none")
    rb = section["rollbacks"]
    if rb is not None and rb["total"]:
        items = ", ".join(f"step {r['step']} -> step {r['restored_to']}" for r in rb["rollbacks"])
        out.append(
            f"rollbacks       {rb['total']} ({plural(rb['steps_lost'], 'step')} lost)" + (f": {items}" if items else "")
        )
    elif rb is not None:
        out.append("rollbacks       none")
    if section["events"]:
        out.append(f"events          {len(section['events'])}")
        for e in section["events"][-5:]:
            first_line = e["text"].splitlines()[0] if e["text"] else ""
            out.append(f"  step {e['step']}: {first_line[:160]}")
    if section["layers"]:
        measure = (
            "per-element RMS (element counts from the gradient histograms)"
            if section["measure"] == "rms"
            else "L2 norm (no histograms, element counts unknown)"
        )
        out.append(f"verdict measure {measure}")
        out.append("")
        rows = [["layer", "numel", "median", "min", "max", "median RMS", "verdict"]]
        for row in section["layers"]:
            verdict = ", ".join(f"{v['kind']} (step {v['first_step']})" for v in row["verdicts"]) or "ok"
            rows.append(
                [
                    row["layer"],
                    "-" if row["numel"] is None else str(row["numel"]),
                    _fmt(row["median"], ".3e"),
                    _fmt(row["min"], ".3e"),
                    _fmt(row["max"], ".3e"),
                    _fmt(row["median_rms"], ".3e"),
                    verdict,
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        for r in rows:
            cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(widths))]
            out.append("  ".join(cells) + "  " + r[-1])
        out.append("")
        out.append(section["diagnostics_summary"])
    for note in section["notes"]:
        out.append(f"note: {note}")
    if section["heatmap"]:
        out.append(f"heatmap written to {section['heatmap']}")
    incidents = section.get("_incidents") or []
    if incidents:
        out.append("")
        out.append(f"incidents       {len(incidents)} (post-mortems: gradguard report RUN_DIR --postmortem DIR)")
        for number, incident in enumerate(incidents, start=1):
            lines = describe(incident)
            out.append(f"  {number}. {lines[0]}")
            out.extend(f"     {line}" for line in lines[1:])
    for png in section.get("postmortems", []):
        out.append(f"post-mortem written to {png}")
    return "\n".join(out) + "\n"


def _postmortems(folder: Path, sections: list[dict[str, Any]]) -> None:
    """One PNG per incident of every section into ``folder``."""
    found = [(s, i) for s in sections for i in s.get("_incidents") or []]
    if not found:
        raise ReportError(folder, "no incidents to draw (no incidents.jsonl beside the event files)")
    for section, incident in found:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{section['_rel']}-{section['namespace']}").strip("_")
        png = folder / f"postmortem.{stem}.step{incident.step}.{incident.kind}.png"
        try:
            render_postmortem(incident, png)
        except ImportError as exc:
            raise ReportError(png, str(exc)) from None
        except OSError as exc:
            raise ReportError(png, f"cannot write the post-mortem ({exc.strerror or exc})") from None
        section.setdefault("postmortems", []).append(str(png))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradguard", description="lightning_gradguard tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser(
        "report",
        help="gradient-health report of a run directory",
        description="Summarise the GradGuard tags of TensorBoard event files: global-norm percentiles, "
        "clip rate, skipped steps, LR reductions, a per-layer table with verdicts, and a heatmap.",
    )
    rep.add_argument("run_dir", metavar="RUN_DIR", help="run directory, directory of runs, or event file")
    rep.add_argument("--png", metavar="PATH", type=Path, help="write the layer x step heatmap PNG here")
    rep.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    rep.add_argument(
        "--postmortem",
        metavar="DIR",
        type=Path,
        help="write one post-mortem PNG per incident (incidents.jsonl beside the event files) into DIR",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradguard`` console script; returns the exit code.

    Exit codes: 0 success, 2 bad input or usage (one line on stderr, no traceback).
    """
    parser = _parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        sections = build_report(args.run_dir)
        if args.png is not None:
            drawable = [s for s in sections if s.get("layers")]
            if not drawable:
                raise ReportError(args.run_dir, "no per-layer norms (layer_norm/*) to draw a heatmap from")
            for section in drawable:
                png = _png_path(args.png, section, len(drawable) > 1)
                try:
                    _heatmap(section, png)
                except ImportError as exc:
                    raise ReportError(png, str(exc)) from None
                except OSError as exc:
                    raise ReportError(png, f"cannot write the heatmap ({exc.strerror or exc})") from None
                section["heatmap"] = str(png)
        if args.postmortem is not None:
            _postmortems(args.postmortem, sections)
    except ReportError as exc:
        print(f"gradguard report: error: {exc}", file=sys.stderr)
        return 2
    text = (
        json.dumps({"runs": _jsonable(sections)}, indent=2, allow_nan=False) + "\n"
        if args.json
        else "\n".join(_text(s) for s in sections)
    )
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `gradguard report ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

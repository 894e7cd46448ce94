"""Data skipping that lasts: the batches an incident blamed, in a file a resumed run honours.

A :class:`SkipList` is a small JSON file (``skip_list.json`` beside the logs) of entries, each naming a batch by
its epoch and index and, when the user gave ``batch_ids=``, by its sample identifiers. Two ways to honour it:

* **by sample** (best, when the identifiers are dataset indices): wrap the dataset in :class:`SkipSamples`;
  the listed samples are left out of every epoch and the batches around them are built from the rest;
* **by batch**: GradGuard, given ``skip_list=`` (or :meth:`SkipList.skips` in a plain loop), drops the
  optimizer step of a listed ``(epoch, batch_idx)``; the forward and backward pass of that batch are spent
  but its gradients never reach the weights.

Nothing here imports Lightning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["SkipEntry", "SkipList", "SkipSamples"]

SKIP_LIST_VERSION = 1


@dataclass(frozen=True)
class SkipEntry:
    """One batch to skip.

    Attributes:
        epoch: the epoch it was met in (``None``: any epoch).
        batch_idx: its index within the epoch (``None``: known by its samples only).
        sample_ids: its sample identifiers, when known.
        reason: why (the incident's kind and verdict).
        step: the optimizer step it was met at.
    """

    epoch: int | None
    batch_idx: int | None
    sample_ids: tuple[Any, ...] = ()
    reason: str = ""
    step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (the file's and the checkpoint state's form)."""
        return {**asdict(self), "sample_ids": list(self.sample_ids)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SkipEntry:
        """The inverse of :meth:`to_dict` (missing keys: ``None`` / empty)."""
        return cls(
            epoch=raw.get("epoch"),
            batch_idx=raw.get("batch_idx"),
            sample_ids=tuple(raw.get("sample_ids") or ()),
            reason=str(raw.get("reason", "")),
            step=raw.get("step"),
        )

    @property
    def key(self) -> tuple[int | None, int | None, tuple[Any, ...]]:
        """What makes two entries the same batch."""
        return self.epoch, self.batch_idx, self.sample_ids


class SkipList:
    """The batches and samples to leave out, persisted as JSON.

    Args:
        path: the file (read if it exists, written on every :meth:`add`); ``None`` keeps it in memory.

    Raises:
        ValueError: the file exists but is not a skip list (names the file; nothing is overwritten).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: list[SkipEntry] = []
        if self.path is not None and self.path.exists():
            self.entries = _read(self.path)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: SkipEntry) -> bool:
        """Add ``entry`` (unless the same batch is already listed) and save; returns whether it was new."""
        if not self.merge([entry]):
            return False
        self.save()
        return True

    def merge(self, entries: Iterable[SkipEntry]) -> int:
        """Add the entries not listed yet, without saving; returns how many were new."""
        known = {e.key for e in self.entries}
        new = [e for e in entries if e.key not in known]
        self.entries += new
        return len(new)

    def save(self) -> None:
        """Write the file atomically (a crash mid-write leaves the previous version)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": SKIP_LIST_VERSION, "entries": [e.to_dict() for e in self.entries]}
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)

    def skips(self, epoch: int | None, batch_idx: int | None) -> bool:
        """Whether the batch ``batch_idx`` of ``epoch`` is listed (an entry without an epoch matches every epoch)."""
        return self.entry_for(epoch, batch_idx) is not None

    def entry_for(self, epoch: int | None, batch_idx: int | None) -> SkipEntry | None:
        """The entry that lists the batch ``batch_idx`` of ``epoch``, if one does."""
        if batch_idx is None:
            return None
        return next((e for e in self.entries if e.batch_idx == batch_idx and e.epoch in (None, epoch)), None)

    @property
    def sample_ids(self) -> set[Any]:
        """Every listed sample identifier."""
        return {i for e in self.entries for i in e.sample_ids}


class SkipSamples:
    """A map-style dataset without the samples a :class:`SkipList` names.

    Args:
        dataset: the dataset (``__getitem__`` and ``__len__``).
        skip: the skip list, or the identifiers themselves.
        id_of: ``index -> identifier`` when the identifiers ``batch_ids`` returns are not the dataset indices.
    """

    def __init__(self, dataset: Any, skip: SkipList | Iterable[Any], id_of: Any = None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"`dataset` must be a map-style dataset (__getitem__ and __len__), got {type(dataset).__name__}"
            )
        skipped = skip.sample_ids if isinstance(skip, SkipList) else set(skip)
        ident = id_of if id_of is not None else (lambda i: i)
        self.dataset = dataset
        self.indices: list[int] = [i for i in range(len(dataset)) if ident(i) not in skipped]
        self.skipped = len(dataset) - len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]


def _read(path: Path) -> list[SkipEntry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, Mapping) or not isinstance(data.get("entries"), Sequence):
            raise ValueError("no 'entries' list")
        return [SkipEntry.from_dict(raw) for raw in data["entries"]]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path} is not a GradGuard skip list ({exc}); move it away or pass another path (nothing was overwritten)"
        ) from exc

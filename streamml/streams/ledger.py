"""What a produce run had acknowledged, by input record, kept so a later run resumes.

A :class:`Ledger` holds the indices of the records (and labels) Kafka acknowledged; a
:class:`FileProgress` keeps one per (input file, pipeline) under ``<state_dir>/produce/``,
with a fingerprint of the file so a changed file is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamml.config import Settings


@dataclass
class Acked:
    """Which indices are done: all below ``prefix`` plus the few in ``beyond``.

    >>> a = Acked(); a.add(1); a.add(0); a.add(3); (a.prefix, sorted(a.beyond), 3 in a)
    (2, [3], True)
    """

    prefix: int = 0
    beyond: set[int] = field(default_factory=set)

    def add(self, i: int) -> None:
        if i == self.prefix and not self.beyond:  # the usual case: acks in order
            self.prefix += 1
        elif i >= self.prefix:
            self.beyond.add(i)
            while self.prefix in self.beyond:
                self.beyond.remove(self.prefix)
                self.prefix += 1

    def __contains__(self, i: int) -> bool:
        return i < self.prefix or i in self.beyond

    def __len__(self) -> int:
        return self.prefix + len(self.beyond)


@dataclass
class Ledger:
    """What Kafka acknowledged of one input, by record index: the records, and the labels
    (a record without a label to send counts as label-done)."""

    records: Acked = field(default_factory=Acked)
    labels: Acked = field(default_factory=Acked)

    @property
    def next_index(self) -> int:
        """The first record that is not delivered together with its label."""
        return min(self.records.prefix, self.labels.prefix)

    def to_json(self) -> dict[str, Any]:
        return {
            name: {"prefix": acked.prefix, "beyond": sorted(acked.beyond)}
            for name, acked in (("records", self.records), ("labels", self.labels))
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        def acked(part: dict[str, Any]) -> Acked:
            return Acked(int(part["prefix"]), {int(i) for i in part["beyond"]})

        return cls(acked(data["records"]), acked(data["labels"]))


@dataclass(frozen=True)
class SavedProgress:
    """What a progress file holds, and whether the input still is the file it describes."""

    ledger: Ledger
    complete: bool
    same_file: bool


@dataclass(frozen=True)
class FileProgress:
    """How far `streamml produce` got through one file for one pipeline, kept under
    ``<state_dir>/produce/`` so ``--resume`` can skip what Kafka acknowledged."""

    path: Path  # the progress file
    source: Path  # the input file
    pipeline: str
    fingerprint: dict[str, Any]  # size, mtime and a hash of the first MiB of the input

    @classmethod
    def of(cls, settings: Settings, pipeline: str, source: Path) -> FileProgress:
        source = source.resolve()
        digest = hashlib.sha256(f"{source}\0{pipeline}".encode()).hexdigest()[:24]
        stat = source.stat()
        with source.open("rb") as handle:
            head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
        fingerprint = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_sha256": head}
        return cls(settings.state_dir / "produce" / f"{digest}.json", source, pipeline, fingerprint)

    def load(self) -> SavedProgress | None:
        """The saved progress, or None when there is none (or it is unreadable)."""
        try:
            data = json.loads(self.path.read_text("utf-8"))
            ledger = Ledger.from_json(data["ledger"])
            return SavedProgress(ledger, bool(data["complete"]), data["file"] == self.fingerprint)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, ledger: Ledger, complete: bool) -> None:
        data = {
            "source": str(self.source),
            "pipeline": self.pipeline,
            "file": self.fingerprint,
            "complete": complete,
            "next_index": ledger.next_index,
            "ledger": ledger.to_json(),
            "updated_at": time.time(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), "utf-8")
        os.replace(tmp, self.path)

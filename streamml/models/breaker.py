"""A per-pipeline circuit breaker over failed records, by cause (pure, no I/O).

Every record a pipeline handles is counted, and every failed one (a dead letter) under its
cause (the dead letter's error class). At the end of each window of ``window_s`` seconds,
a cause whose share of the window's records is over ``ratio`` (in a window of at least
``min_records``) opens the breaker for that cause; a later window below it closes it
again. Opening and closing are alerts; the pipeline never stops for them: a flood of bad
records becomes dead letters and an alert, not a crash loop.

>>> b = Breaker(window_s=60, ratio=0.2, min_records=10)
>>> for i in range(100):
...     b.count(now=float(i % 60), cause="malformed_json" if i % 3 == 0 else None)
>>> b.roll(now=61.0)
[Trip(cause='malformed_json', state='firing', failed=34, total=100)]
>>> for i in range(50):
...     b.count(now=70.0, cause=None)
>>> b.roll(now=131.0)
[Trip(cause='malformed_json', state='resolved', failed=0, total=50)]
>>> b.roll(now=190.0)  # an empty window changes nothing
[]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Trip:
    cause: str
    state: str  # firing | resolved
    failed: int
    total: int

    @property
    def share(self) -> float:
        return self.failed / self.total if self.total else 0.0


@dataclass
class Breaker:
    window_s: float
    ratio: float
    min_records: int
    started: float | None = None
    total: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    open: set[str] = field(default_factory=set)

    def count(self, now: float, cause: str | None = None, n: int = 1) -> None:
        """``n`` records handled at ``now``; ``cause`` when they failed."""
        if self.started is None:
            self.started = now
        self.total += n
        if cause is not None:
            self.failed[cause] += n

    def roll(self, now: float) -> list[Trip]:
        """Close the window if ``window_s`` has passed; the breaker changes it brings."""
        if self.started is None or now - self.started < self.window_s:
            return []
        trips: list[Trip] = []
        if self.total >= self.min_records:
            for cause, n in sorted(self.failed.items()):
                if n > self.ratio * self.total and cause not in self.open:
                    self.open.add(cause)
                    trips.append(Trip(cause, "firing", n, self.total))
        if self.total:
            for cause in sorted(self.open):
                n = self.failed.get(cause, 0)
                if n <= self.ratio * self.total:
                    self.open.discard(cause)
                    trips.append(Trip(cause, "resolved", n, self.total))
        self.started, self.total, self.failed = None, 0, Counter()
        return trips

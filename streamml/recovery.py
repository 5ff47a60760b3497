"""How the served model fared around a change, from what ClickHouse logged.

For a run of the demo stream (event ids ``<prefix><i>``, the change at index ``change``):
served accuracy per phase beside the majority-class baseline and the best shadow *on the
same events*, the rolling served accuracy, and how many events after the change it took
until the rolling accuracy over ``window`` labelled events was back at a target. Used by
``streamml demo`` (its table and chart) and ``bench/loop.py``, on the rows of
:func:`streamml.sql.served_rows`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Phase:
    name: str
    first: int  # event index range [first, last)
    last: int
    events: int  # labelled events served in it
    served: float
    baseline: float  # the majority class of these very events
    best_shadow: str  # version of the best model not serving, on the events it scored
    best_shadow_accuracy: float


@dataclass
class Recovery:
    change: int
    phases: list[Phase] = field(default_factory=list)
    recovery_events: int | None = None  # None: never back at the target
    rolling: list[tuple[int, float]] = field(default_factory=list)  # (index, served acc)
    baseline_rolling: list[tuple[int, float]] = field(default_factory=list)

    def phase(self, name: str) -> Phase:
        return next(p for p in self.phases if p.name == name)


def served_frame(
    rows: list[tuple[int, str, int, str, str]],
) -> tuple[dict[int, tuple[str, str]], dict[str, dict[int, bool]]]:
    """rows of (index, version, served, predicted class, label) -> the served answer per
    event (version, correct?) and every version's correctness per event."""
    served: dict[int, tuple[str, str]] = {}
    correct: dict[str, dict[int, bool]] = {}
    for i, version, is_served, predicted, label in rows:
        correct.setdefault(version, {})[i] = predicted == label
        if is_served:
            served[i] = (version, label)
    return served, correct


def analyse(
    rows: list[tuple[int, str, int, str, str]],
    n: int,
    change: int,
    window: int = 500,
    target: float = 0.85,
    after_span: int = 2_000,
) -> Recovery:
    """Phases before the change, right after it (``after_span`` events) and the last
    quarter; recovery = events from the change until the served accuracy over the last
    ``window`` labelled events is at least ``target``.

    >>> rows = [(i, "m", 1, "a" if i < 50 or i > 80 else "b", "a") for i in range(100)]
    >>> r = analyse(rows, 100, 50, window=10, target=0.9, after_span=20)
    >>> r.recovery_events, r.phase("last quarter").served
    (39, 0.76)
    """
    served, correct = served_frame(rows)
    result = Recovery(change)
    phases = [
        ("before the change", 0, change),
        ("right after it", change, min(n, change + after_span)),
        ("last quarter", (3 * n) // 4, n),
    ]
    for name, first, last in phases:
        idx = [i for i in range(first, last) if i in served]
        if not idx:
            continue
        hits = [correct[served[i][0]][i] for i in idx]
        labels = [served[i][1] for i in idx]
        _, counts = np.unique(labels, return_counts=True)
        baseline = float(counts.max() / len(labels))
        best, best_acc = "", float("nan")
        for version, by_event in correct.items():
            if all(served[i][0] == version for i in idx):
                continue  # the model that served all of it is not a shadow here
            scored = [by_event[i] for i in idx if i in by_event]
            if len(scored) < len(idx) // 2:
                continue  # deployed for too little of the phase to compare
            acc = float(np.mean(scored))
            if not best or acc > best_acc:
                best, best_acc = version, acc
        result.phases.append(
            Phase(name, first, last, len(idx), float(np.mean(hits)), baseline, best, best_acc)
        )
    order = sorted(served)
    hits_all = np.array([correct[served[i][0]][i] for i in order], dtype=np.float64)
    labels_all = [served[i][1] for i in order]
    for k in range(window, len(order) + 1, max(1, window // 5)):
        result.rolling.append((order[k - 1], float(hits_all[k - window : k].mean())))
        _, counts = np.unique(labels_all[k - window : k], return_counts=True)
        result.baseline_rolling.append((order[k - 1], float(counts.max() / window)))
    after = [k for k, i in enumerate(order) if i >= change]
    for pos in after:
        if pos + 1 < window:
            continue
        if order[pos - window + 1] < change:
            continue  # the window must hold only events after the change
        if hits_all[pos - window + 1 : pos + 1].mean() >= target:
            result.recovery_events = order[pos] - change
            break
    return result

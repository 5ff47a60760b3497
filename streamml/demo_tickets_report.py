"""The report of ``streamml demo tickets``, from ClickHouse, and its PNG.

Served accuracy of the online model that learns on the embeddings, per bucket of tickets,
against the majority baseline; weak-label accuracy against the true labels and the
labeller's own metrics rows; the clusters and where the new product's tickets went; the
drift events; flags and summaries.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamml import sql
from streamml.demo import _ask, save_chart
from streamml.devstack.worker import WorkerProcess
from streamml.models.synthetic import Example
from streamml.models.text import labeller_source
from streamml.models.tickets import NEW_PRODUCT
from streamml.schemas.spec import ClusterFeature, PipelineSpec

PIPELINE = "tickets"


@dataclass
class Bucket:
    """The labelled events among events ``first``..``last``: served, baseline, weak."""

    first: int
    last: int
    labelled: int
    served: float
    baseline: float  # the share of the bucket's most common true class
    weak: float | None  # accuracy of the weak labels given (the confident ones)
    weak_share: float  # of the labelled events, how many got a weak label


@dataclass
class Cluster:
    """One cluster of one partition's online clustering, from the features logged."""

    partition: int
    cluster: int
    events: int
    first: int  # event index of its first ticket
    new_product: int  # of its tickets, how many are about the new product
    top_class: str  # its most common true label
    top_share: float
    reported_at: int | None = None  # event index of its new_cluster drift event


@dataclass
class TicketsReport:
    events: int
    good: int
    bad: int
    labelled: int
    rate: float  # events/s
    seconds: float = 0.0
    run_prefix: str = ""
    new_product_at: int = 0  # index of the first ticket about the new product
    buckets: list[Bucket] = field(default_factory=list)
    rolling: list[tuple[int, float]] = field(default_factory=list)  # served, last 250
    served_accuracy: float = 0.0
    baseline: float = 0.0
    weak_accuracy: float = 0.0
    model: str = ""  # what the online model learns on
    weak_judged: int = 0  # labelled events with a weak label
    weak_min_confidence: float = 0.0  # the spec's: less sure weak labels are not written
    roles: list[list[Any]] = field(default_factory=list)  # incl. the labeller's rows
    clusters: list[Cluster] = field(default_factory=list)
    new_clusters: list[tuple[str, int, int]] = field(default_factory=list)  # target, part, i
    drift: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    flags: list[tuple[str, str, float, str, float, str]] = field(default_factory=list)
    flag_count: int = 0
    flags_served_right: int = 0
    flags_weak_right: int = 0
    flags_labelled: int = 0
    summaries: list[tuple[str, str, str]] = field(default_factory=list)  # id, summary, body
    summary_count: int = 0
    dead_letters: list[list[Any]] = field(default_factory=list)
    audit: list[list[Any]] = field(default_factory=list)
    ask: tuple[str, str] = ("", "")  # command, output
    ask_rows: int = 0
    png: Path | None = None
    state_dir: Path | None = None
    stopped: list[str] = field(default_factory=list)
    left_running: list[str] = field(default_factory=list)


def is_new(example: Example) -> bool:
    return isinstance(example.record, dict) and example.record.get("product") == NEW_PRODUCT


def _body(example: Example) -> str:
    return str(example.record.get("body", "")) if isinstance(example.record, dict) else ""


def since(run_start: dt.datetime) -> int:
    return int(run_start.timestamp() * 1000)


def analyse(
    spec: PipelineSpec,
    worker: WorkerProcess,
    report: TicketsReport,
    examples: list[Example],
    run_start: dt.datetime,
    partitions: int,
) -> None:
    """Fill ``report`` from ClickHouse (through the worker's /query), with the true
    labels and texts of ``examples`` beside the rows where the warehouse has none."""
    since_ms = since(run_start)
    prefix = report.run_prefix
    source = labeller_source(spec) or ""
    report.model = _model_line(spec)
    if spec.annotate.weak_labels is not None:
        report.weak_min_confidence = spec.annotate.weak_labels.min_confidence
    rows = _ask(worker, sql.tickets_labelled(PIPELINE, prefix, source))
    _accuracy(report, [(int(i), str(s), str(w), str(t)) for i, s, w, t in rows])
    report.roles = _ask(worker, sql.role_accuracy(PIPELINE, since_ms))
    step_ms = 1000 / report.rate
    first_ms = since_ms  # the first ticket's event time is the run's start

    def index(ts_ms: Any) -> int:
        return round((int(ts_ms) - first_ms) / step_ms)

    found = _ask(worker, sql.tickets_drift(PIPELINE, since_ms))
    for kind, detector, target, n, first, partition in found:
        if detector == "new_cluster":
            report.new_clusters.append((str(target), int(partition), index(first)))
        else:
            report.drift.append((str(kind), str(detector), str(target), int(n), index(first)))
    report.new_clusters.sort(key=lambda c: c[2])
    cluster = next((f for f in spec.text_features if isinstance(f, ClusterFeature)), None)
    if cluster is not None:
        query = sql.tickets_clusters(PIPELINE, prefix, cluster.name)
        assigned = [(int(i), str(k), str(c)) for i, k, c in _ask(worker, query)]
        _clusters(report, partitions, examples, assigned, cluster.name)
    truth = {i: e for i, e in enumerate(examples) if isinstance(e.record, dict)}
    flags = _ask(worker, sql.tickets_flags(PIPELINE, prefix))
    report.flag_count = len(flags)
    for i, served, served_conf, weak, weak_conf in flags:
        label = truth[int(i)].label
        if label is not None:
            report.flags_labelled += 1
            report.flags_served_right += served == label
            report.flags_weak_right += weak == label
        if len(report.flags) < 5:
            body = _body(truth[int(i)])
            report.flags.append(
                (body, str(served), float(served_conf), str(weak), float(weak_conf), label or "-")
            )
    summaries = _ask(worker, sql.tickets_summaries(PIPELINE, prefix))
    report.summary_count = len(summaries)
    for i, summary in summaries[:: max(1, len(summaries) // 3)][:3]:
        body = _body(truth[int(i)])
        report.summaries.append((f"{report.run_prefix}{i}", str(summary), body))
    report.dead_letters = _ask(worker, sql.dead_letter_causes(PIPELINE, since_ms))
    report.audit = _ask(worker, sql.audit_trail(PIPELINE, since_ms))


def _model_line(spec: PipelineSpec) -> str:
    """The served model and the features it learns on, e.g. ``embedding body_vec (32
    dims)``."""
    parts = []
    for f in spec.features:
        dims = getattr(f, "dims", None)
        parts.append(f"{f.kind} {f.name}" + (f" ({dims} dims)" if dims else ""))
    return f"{spec.online_model.kind} on " + ", ".join(parts)


def _accuracy(report: TicketsReport, rows: list[tuple[int, str, str, str]]) -> None:
    """Served and weak-label accuracy per bucket of events, overall, and rolling."""
    if not rows:
        return
    size = max(100, report.events // 800 * 100)  # 500 for 4,000 events
    for first in range(0, report.events, size):
        part = [r for r in rows if first <= r[0] < first + size]
        if not part:
            continue
        top = Counter(t for *_, t in part).most_common(1)[0][1]
        weak = [w == t for _, _, w, t in part if w]
        report.buckets.append(
            Bucket(
                first,
                min(first + size, report.events) - 1,
                len(part),
                sum(s == t for _, s, _, t in part) / len(part),
                top / len(part),
                sum(weak) / len(weak) if weak else None,
                len(weak) / len(part),
            )
        )
    report.served_accuracy = sum(s == t for _, s, _, t in rows) / len(rows)
    report.baseline = Counter(t for *_, t in rows).most_common(1)[0][1] / len(rows)
    judged = [(w, t) for _, _, w, t in rows if w]
    report.weak_judged = len(judged)
    report.weak_accuracy = sum(w == t for w, t in judged) / max(len(judged), 1)
    window = 250
    right = [s == t for _, s, _, t in rows]
    for k in range(window, len(rows) + 1, 25):
        report.rolling.append((rows[k - 1][0], sum(right[k - window : k]) / window))


def _clusters(
    report: TicketsReport,
    n_partitions: int,
    examples: list[Example],
    assigned: list[tuple[int, str, str]],
    feature: str,
) -> None:
    """Group the events by (partition, cluster): each partition clusters on its own (the
    partition of an event is its key's, by Kafka's default partitioner)."""
    from aiokafka.partitioner import DefaultPartitioner

    partitions = list(range(n_partitions))
    partitioner = DefaultPartitioner()
    groups: dict[tuple[int, int], list[int]] = {}
    for i, key, cluster in sorted(assigned):
        if not cluster:
            continue
        part = int(partitioner(key.encode(), partitions, partitions))
        groups.setdefault((part, int(cluster.split("#", 1)[1])), []).append(i)
    reported = {
        (part, int(target.split("#", 1)[1])): at
        for target, part, at in report.new_clusters
        if target.startswith(f"{feature}#")
    }
    for (part, cid), members in sorted(groups.items()):
        labels = Counter(str(examples[i].label) for i in members if examples[i].label is not None)
        top, n = labels.most_common(1)[0] if labels else ("-", 0)
        report.clusters.append(
            Cluster(
                part,
                cid,
                len(members),
                members[0],
                sum(is_new(examples[i]) for i in members),
                top,
                n / max(sum(labels.values()), 1),
                reported.get((part, cid)),
            )
        )


def plot(report: TicketsReport, path: Path) -> Path | None:
    if not report.buckets:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    mid = [(b.first + b.last) / 2 for b in report.buckets]
    ax.plot(mid, [b.served for b in report.buckets], "o-", label="served accuracy (online model)")
    weak = [(m, b.weak) for m, b in zip(mid, report.buckets, strict=True) if b.weak is not None]
    ax.plot(
        [m for m, _ in weak],
        [w for _, w in weak],
        "s-",
        label=f"weak-label accuracy (zero-shot, confidence >= {report.weak_min_confidence:g})",
    )
    ax.plot(mid, [b.baseline for b in report.buckets], "--", label="majority-class baseline")
    if report.rolling:
        xs, ys = zip(*report.rolling, strict=True)
        ax.plot(xs, ys, "-k", alpha=0.35, label="served accuracy, last 250 labelled events")
    ax.axvline(report.new_product_at, color="red", linestyle="--", label=f"{NEW_PRODUCT} appears")
    for n, (_, _, at) in enumerate(report.new_clusters):
        ax.axvline(at, color="purple", linestyle=":", label="new cluster" if n == 0 else None)
    for kind, color in (("concept", "orange"), ("data", "saddlebrown")):
        found = [d[4] for d in report.drift if d[0] == kind]
        if found:
            ax.axvline(min(found), color=color, linestyle="-.", label=f"first {kind} drift")
    ax.set_xlabel("event (ticket) index")
    ax.set_ylabel("accuracy on the labelled tickets")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"streamml demo tickets: {report.events} tickets, text -> embeddings -> online model"
    )
    return save_chart(fig, ax, path)

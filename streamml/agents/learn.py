"""learn: a ``<p>.labels`` record joins its stored features by event_id -> learn_one + metrics.

Labels are keyed like the raw records (entity key, or event_id when the spec has no
entity key), so they arrive in the partition that scored their event. A label whose
features are not there yet waits (early label); features whose label never comes, and
early labels whose event never comes, expire after ``label.ttl_s``. Every case is
counted. Prequential metrics go to ``<p>.metrics`` per partition and wall-clock minute.
"""

from __future__ import annotations

import time
from typing import Any

from aiokafka import ConsumerRecord

from streamml.agents.expiry import expire_entities
from streamml.agents.ingest import dead_letter, source_of
from streamml.agents.runtime import (
    EARLY,
    FRESH,
    JOIN,
    MODEL,
    Made,
    MinuteMetrics,
    PartitionState,
    PipelineRuntime,
)
from streamml.models.online import Prediction, coerce_label, metric_values, new_metrics
from streamml.schemas.records import DeadLetter, validate_label
from streamml.streams.outbox import Outbox
from streamml.streams.topics import dumps

MINUTE_MS = 60_000
METRICS_EVERY_LABELS = 50
METRICS_EVERY_S = 5.0


def on_label(
    rt: PipelineRuntime,
    state: PartitionState,
    message: ConsumerRecord[bytes, bytes],
    out: Outbox,
) -> str:
    """Handle one label record; returns its outcome (learned, early or dead_letter).

    A label that does not fit the spec (not JSON, no event_id, a value outside the class
    set or not a finite number in range) is a dead letter, never learned or stored."""
    checked = validate_label(rt.spec, message.value or b"", source_of(message))
    if isinstance(checked, DeadLetter):
        rt.counters["labels_invalid"] += 1
        dead_letter(rt, checked, message.partition, message.headers or (), out)
        return "dead_letter"
    event_id, label = checked.event_id, checked.value
    stored = state.joins.pop(event_id, None)
    ident = event_id.encode()
    if stored is None:  # the score step learns it when the features arrive
        state.early[event_id] = (int(time.time() * 1000), label)
        out.add(rt.topics["state"], state.partition, EARLY + ident, dumps({"label": label}))
        rt.counters["labels_early"] += 1
        return "early"
    out.add(rt.topics["state"], state.partition, JOIN + ident, None)
    learn_one(rt, state, stored[1], label, stored[3], out, stored[2])
    return "learned"


def learn_one(
    rt: PipelineRuntime,
    state: PartitionState,
    features: dict[str, float],
    label: Any,
    made: list[Made],
    out: Outbox,
    event_ts_ms: int = 0,
) -> None:
    """Train the online model on one labelled event, and score the label against what each
    model predicted when the event arrived (``made``, kept with the join state): the open
    minute of each model's metrics, the online model's prequential metrics, and the concept
    drift monitor on the served model's error. Nothing is predicted again here."""
    learner, fresh = state.learner, state.fresh
    target = coerce_label(label, learner.classification)
    own = fresh_own = served = None
    for m in made:
        _account(rt, state, m.version, m.role, m.prediction, target, out)
        if m.version == learner.version:
            own = m.prediction
        elif fresh is not None and m.version == fresh.version:
            fresh_own = m.prediction
        if m.served:
            served = m.prediction
    learner.learn(features, target, own)
    if fresh is not None:
        fresh.learn(features, target, fresh_own)
    rt.counters["learned"] += 1
    if state.monitor is not None and served is not None:
        error = _error(served, target, learner.classification)
        monitor = state.monitor
        for d in monitor.observe_error(error, event_ts_ms):
            state.detections.append((d, event_ts_ms, monitor.change_ts_ms(d)))
    if learner.learned % rt.spec.online_model.snapshot_every == 0:
        snapshot(rt, state, out)


def _error(prediction: Prediction, target: Any, classification: bool) -> float:
    """The prequential error: 0/1 for a class, the absolute error for a number."""
    if classification:
        return 0.0 if prediction.predicted_class == str(target) else 1.0
    return abs(float(target) - prediction.score)


def _account(
    rt: PipelineRuntime,
    state: PartitionState,
    version: str,
    role: str,
    prediction: Prediction,
    target: Any,
    out: Outbox,
) -> None:
    now_ms = int(time.time() * 1000)
    start = now_ms - now_ms % MINUTE_MS
    window = state.minutes.get((version, role))
    if window is None or window.start_ms != start:
        if window is not None and window.n:  # the closing minute's last word
            emit_metrics(rt, state, window, out)
        window = state.minutes[version, role] = MinuteMetrics(
            version, role, start, new_metrics(rt.spec)
        )
    state.learner.score_into(window.metrics, prediction, target)
    window.n += 1
    if window.n % METRICS_EVERY_LABELS == 0:
        emit_metrics(rt, state, window, out)


def snapshot(rt: PipelineRuntime, state: PartitionState, out: Outbox) -> None:
    """Log the partition's online model, so its next owner resumes it."""
    out.add(rt.topics["state"], state.partition, MODEL, state.learner.snapshot())
    if state.fresh is not None:
        out.add(rt.topics["state"], state.partition, FRESH, state.fresh.snapshot())
    state.snapshot_at = time.monotonic()
    state.snapshot_learned = state.learner.learned


def emit_metrics(
    rt: PipelineRuntime, state: PartitionState, window: MinuteMetrics, out: Outbox
) -> None:
    state.metrics_sent_at = time.monotonic()
    for metric_name, value in metric_values(window.metrics).items():
        out.add(
            rt.topics["metrics"],
            state.partition,
            f"{rt.name}:{state.partition}".encode(),
            dumps(
                {
                    "pipeline": rt.name,
                    "model_version": window.version,
                    "role": window.role,
                    "metric": metric_name,
                    "window_start_ms": window.start_ms,
                    "partition": state.partition,
                    "value": value,
                    "n": window.n,
                }
            ),
        )


def housekeeping(rt: PipelineRuntime, state: PartitionState, out: Outbox) -> None:
    """Timed duties between batches: the open minute's metrics every few seconds (so
    dashboards do not wait for the minute to end), model snapshots every
    ``snapshot_interval_s``, expiry of joins and early labels past ``label.ttl_s`` (wall
    clock since they were stored, kept through a restore), and of entity windows past
    the entity TTL (event time, :mod:`streamml.agents.expiry`)."""
    now = time.monotonic()
    if now - state.metrics_sent_at >= METRICS_EVERY_S:
        for window in state.minutes.values():
            if window.n:
                emit_metrics(rt, state, window, out)
    learned = state.learner.learned
    if learned != state.snapshot_learned and (
        now - state.snapshot_at >= rt.spec.online_model.snapshot_interval_s
    ):
        snapshot(rt, state, out)
    cutoff_ms = time.time() * 1000 - rt.spec.label.ttl_s * 1000
    for kind, table, counter in (
        (JOIN, state.joins, "features_expired"),
        (EARLY, state.early, "labels_expired"),
    ):
        expired = []
        for k, entry in table.items():  # insertion order is arrival order
            if entry[0] >= cutoff_ms:
                break
            expired.append(k)
        for k in expired:
            del table[k]
            out.add(rt.topics["state"], state.partition, kind + k.encode(), None)
        rt.counters[counter] += len(expired)
    expire_entities(rt, state, out)

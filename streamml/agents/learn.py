"""learn: ``<p>.labels`` join the stored features by event_id -> learn_one + metrics.

Labels are keyed like the raw records (entity key, or event_id when the spec has no
entity key), so they arrive in the partition that scored their event. A label whose
features are not there yet waits (early label); features whose label never comes, and
early labels whose event never comes, expire after ``label.ttl_s``. Every case is counted.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TableT

from streamml.agents.runtime import PipelineRuntime, run_step
from streamml.models.online import coerce_label, metric_values, new_metrics
from streamml.streams.topics import dumps, loads, table_name

MINUTE_MS = 60_000


@dataclass
class _Window:
    """One partition's metrics over the labels of one wall-clock minute."""

    start: int
    metrics: dict[str, Any]
    n: int = 0


LearnHook = Callable[[int, str, Any, dict[str, Any]], Awaitable[None]]


def register(
    app: faust.App, rt: PipelineRuntime, joins: TableT[str, Any], models: TableT[str, Any]
) -> tuple[TableT[str, Any], LearnHook]:
    """Register the learn agent; return the early-label table and the learn step for score."""
    name = rt.name
    labels = app.topic(rt.topics["labels"], value_serializer="raw", key_serializer="raw")
    metrics_topic = app.topic(rt.topics["metrics"], value_serializer="raw", key_serializer="raw")
    early = app.Table(table_name(name, "early-labels"), default=dict, partitions=rt.partitions)
    label_field = rt.spec.label.field
    ttl_ms = rt.spec.label.ttl_s * 1000
    every = rt.spec.online_model.snapshot_every
    interval_s = rt.spec.online_model.snapshot_interval_s
    snapshot_at: dict[int, float] = {}
    minute: dict[int, _Window] = {}  # partition -> the open minute's metrics

    async def learn_one(partition: int, event_id: str, label: Any, stored: dict[str, Any]) -> None:
        learner = rt.learner(partition, lambda: models.get(str(partition)))
        before = learner.learn(stored["features"], label)
        rt.counters["learned"] += 1
        now_ms = int(time.time() * 1000)
        start = now_ms - now_ms % MINUTE_MS
        window = minute.get(partition)
        if window is None or window.start != start:
            if window is not None and window.n:  # the closing minute's last word
                await emit_metrics(partition, learner.version, window)
            window = minute[partition] = _Window(start, new_metrics(rt.spec))
        learner.score_into(window.metrics, before, coerce_label(label, learner.classification))
        window.n += 1
        last = snapshot_at.get(partition, 0.0)
        if learner.learned % every == 0 or time.monotonic() - last >= interval_s:
            models[str(partition)] = base64.b64encode(learner.snapshot()).decode()
            snapshot_at[partition] = time.monotonic()
        if window.n % 50 == 0:
            await emit_metrics(partition, learner.version, window)

    async def emit_metrics(partition: int, version: str, window: _Window) -> None:
        for metric_name, value in metric_values(window.metrics).items():
            await metrics_topic.send(
                key=f"{name}:{partition}".encode(),
                value=dumps(
                    {
                        "pipeline": name,
                        "model_version": version,
                        "role": "champion",
                        "metric": metric_name,
                        "window_start_ms": window.start,
                        "partition": partition,
                        "value": value,
                        "n": window.n,
                    }
                ),
            )

    @app.agent(labels, name=f"{name}.learn")
    async def learn(stream: faust.StreamT[Any]) -> None:
        await run_step(stream, rt, "learn", handle)

    async def handle(message: Any) -> str | None:
        try:
            value = loads(message.value)
            event_id = str(value["event_id"])
            label = value[label_field] if label_field in value else value["label"]
        except (ValueError, KeyError, TypeError):
            rt.counters["labels_malformed"] += 1
            return "malformed"
        key = event_id
        # not .get(): a faust table's get() returns the default, not None
        stored = joins[key] if key in joins else None  # noqa: SIM401
        if stored is None:  # the score step learns it when the features arrive
            early[key] = {"label": label, "stored_ms": int(time.time() * 1000)}
            rt.counters["labels_early"] += 1
            return "early"
        del joins[key]
        await learn_one(message.partition, event_id, label, stored)
        return "learned"

    @app.timer(interval=5.0, name=f"{name}.metrics")  # type: ignore[untyped-decorator]
    async def flush_metrics() -> None:
        """The open minute's metrics, so dashboards do not wait for the minute to end."""
        for partition, window in list(minute.items()):
            learner = rt.learners.get(partition)
            if window.n and learner is not None:
                await emit_metrics(partition, learner.version, window)

    @app.timer(  # type: ignore[untyped-decorator]
        interval=max(1.0, rt.spec.label.ttl_s / 10), name=f"{name}.expire"
    )
    async def expire() -> None:
        now_ms = time.time() * 1000
        for table, counter in ((joins, "features_expired"), (early, "labels_expired")):
            for key, value in list(table.items()):
                if now_ms - float(value.get("stored_ms", now_ms)) > ttl_ms:
                    table.pop(key, None)
                    rt.counters[counter] += 1

    return early, learn_one

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
from typing import Any

import faust
from faust.types import TableT

from streamml.agents.runtime import PipelineRuntime, run_step
from streamml.streams.topics import dumps, loads, table_name

MINUTE_MS = 60_000


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
    minute: dict[int, tuple[int, Any]] = {}  # partition -> (window start, per-minute metrics)

    async def learn_one(partition: int, event_id: str, label: Any, stored: dict[str, Any]) -> None:
        from streamml.models.online import new_metrics

        learner = rt.learner(partition, models.get(str(partition)))
        x = stored["features"]
        before = learner.learn(x, label)
        rt.counters["learned"] += 1
        now_ms = int(time.time() * 1000)
        start = now_ms - now_ms % MINUTE_MS
        window_start, window_metrics = minute.get(partition, (start, None))
        if window_metrics is None or window_start != start:
            if window_metrics is not None and window_metrics.get("n"):  # the minute's last word
                await emit_metrics(partition, learner.version, window_start, window_metrics)
            window_start, window_metrics = start, new_metrics(rt.spec)
            minute[partition] = (window_start, window_metrics)
        _update(window_metrics, learner, before, label)
        last = snapshot_at.get(partition, 0.0)
        if learner.learned % every == 0 or time.monotonic() - last >= interval_s:
            models[str(partition)] = base64.b64encode(learner.snapshot()).decode()
            snapshot_at[partition] = time.monotonic()
        n = int(window_metrics.get("n", 0))
        window_metrics["n"] = n + 1
        if (n + 1) % 50 == 0:
            await emit_metrics(partition, learner.version, window_start, window_metrics)

    async def emit_metrics(
        partition: int, version: str, start: int, window: dict[str, Any]
    ) -> None:
        for metric_name, metric in window.items():
            if metric_name == "n":
                continue
            await metrics_topic.send(
                key=f"{name}:{partition}".encode(),
                value=dumps(
                    {
                        "pipeline": name,
                        "model_version": version,
                        "role": "champion",
                        "metric": metric_name,
                        "window_start_ms": start,
                        "partition": partition,
                        "value": _finite(metric.get()),
                        "n": window["n"],
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
        for partition, (start, window) in list(minute.items()):
            learner = rt.learners.get(partition)
            if window is not None and window.get("n") and learner is not None:
                await emit_metrics(partition, learner.version, start, window)

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


def _update(window: dict[str, Any], learner: Any, before: Any, label: Any) -> None:
    """Update the per-minute metrics with the prediction made just before learning."""
    from streamml.models.online import _is_positive, _like, coerce_label

    target = coerce_label(label, learner.classification)
    for metric_name, metric in window.items():
        if metric_name == "n":
            continue
        if not learner.classification:
            metric.update(target, before.score)
        elif metric_name == "roc_auc":
            metric.update(
                _is_positive(target, learner.positive),
                {True: before.score, False: 1 - before.score},
            )
        elif before.predicted_class:
            metric.update(target, _like(before.predicted_class, target))


def _finite(value: float) -> float:
    import math

    return float(value) if math.isfinite(value) else 0.0

"""alerting: the spec's threshold rules over the metrics -> alert events.

Every ``alerts.interval_s`` each rule's metric is measured over its window -- served
accuracy/F1/AUC or RMSE/MAE from ClickHouse ``metrics``, the dead-letter rate, the p99
event-to-prediction latency, and the pipeline consumer group's lag from Kafka. A rule
that starts or stops breaching becomes an ``alert`` event on ``streamml.control`` (so a
row in ClickHouse ``alerts`` and ``audit_events``), a log line, and a POST to the spec's
webhook when it has one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from streamml import sql
from streamml.config import Settings
from streamml.models.alerts import AlertBook, AlertTransition
from streamml.schemas.control import ControlEvent
from streamml.schemas.operations import AlertRule
from streamml.schemas.spec import PipelineSpec
from streamml.streams import control
from streamml.streams.kafka import bounded, client_options, close_quietly

log = logging.getLogger("streamml.alerts")
Query = sql.Runner


async def consumer_lag(settings: Settings, spec: PipelineSpec, group_id: str) -> int:
    """Records on ``<p>.raw`` and ``<p>.labels`` the pipeline's group has not committed."""
    boot = settings.bootstrap_servers
    consumer = AIOKafkaConsumer(
        bootstrap_servers=boot,
        group_id=group_id,
        enable_auto_commit=False,
        **client_options(settings),
    )
    await bounded("measure consumer lag", boot, consumer.start(), settings.request_timeout_s)
    try:
        tps = [
            TopicPartition(topic, p)
            for topic in (spec.topic("raw"), spec.topic("labels"))
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        ends = await consumer.end_offsets(tps)
        lag = 0
        for tp in tps:
            committed = await consumer.committed(tp)
            lag += max(0, ends[tp] - (committed or 0))
        return lag
    finally:
        await close_quietly(consumer.stop(), settings.request_timeout_s)


class Alerting:
    def __init__(self, settings: Settings, specs: Sequence[PipelineSpec], query: Query) -> None:
        self.settings = settings
        self.specs = [s for s in specs if s.alerts.rules]
        self.query = query
        self.books = {s.name: AlertBook(s.alerts.rules) for s in self.specs}
        self.last: dict[str, dict[str, float | None]] = {s.name: {} for s in self.specs}

    async def run(self) -> None:
        if not self.specs:
            return
        interval = min(s.alerts.interval_s for s in self.specs)
        while True:
            await asyncio.sleep(interval)
            for spec in self.specs:
                try:
                    await self.check(spec)
                except Exception as exc:  # a monitoring hiccup must not stop the worker
                    log.warning("%s: alert evaluation failed: %s", spec.name, exc)

    async def check(self, spec: PipelineSpec) -> list[AlertTransition]:
        book, changes = self.books[spec.name], []
        for rule in spec.alerts.rules:
            value, n = await self._measure(spec, rule)
            self.last[spec.name][rule.name] = value
            change = book.update(rule.name, value, n)
            if change is not None:
                changes.append(change)
        for change in changes:
            await self._announce(spec, change)
        return changes

    async def _measure(self, spec: PipelineSpec, rule: AlertRule) -> tuple[float | None, int]:
        query = sql.alert_metric(spec.name, rule.metric, rule.window_s)
        if query is None:  # consumer lag, from Kafka
            lag = await consumer_lag(self.settings, spec, f"{self.settings.app_id}-{spec.name}")
            return float(lag), rule.min_events
        rows = (await asyncio.to_thread(sql.run, self.query, query)).rows
        if not rows or rows[0][0] is None:
            return None, 0
        value, n = float(rows[0][0]), int(rows[0][1] or 0)
        return (value if value == value else None), n  # NaN: nothing measured

    async def _announce(self, spec: PipelineSpec, change: AlertTransition) -> None:
        level = logging.WARNING if change.state == "firing" else logging.INFO
        log.log(level, "%s: alert %s %s: %s", spec.name, change.rule, change.state, change.message)
        event = ControlEvent.new(
            spec.name,
            "alert",
            reason=change.message,
            details={
                "rule": change.rule,
                "state": change.state,
                "metric": change.metric,
                "value": change.value,
                "threshold": change.threshold,
                "op": change.op,
                "window_s": change.window_s,
            },
        )
        await control.publish(self.settings, event)
        if spec.alerts.webhook:
            await asyncio.to_thread(_post, spec.alerts.webhook, json.loads(event.to_json()))


def _post(url: str, body: dict[str, object]) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            response.read()
    except OSError as exc:  # the alert is already on the topic and in the table
        log.warning("alert webhook %s failed after %.1f s: %s", url, time.monotonic() - t0, exc)

"""The main job. Until the streaming pipeline lands this is the smoke flow of the stack:

broker up -> topic -> produce a record -> read it back -> write a row to ClickHouse ->
query it back -> stop what it started. Every step is timed and reported.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from streamml.config import Settings
from streamml.devstack import LocalBroker
from streamml.streams import kafka
from streamml.streams.warehouse import Warehouse

SMOKE_TOPIC = "streamml.smoke"
SMOKE_PIPELINE = "smoke"


@dataclass
class SmokeReport:
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    started_broker: bool = False
    broker_left_running: bool = False

    def add(self, name: str, started: float, detail: str) -> None:
        self.steps.append((name, (time.perf_counter() - started) * 1000, detail))


def run_smoke(
    settings: Settings, say: Callable[[str], None], keep_broker: bool = False
) -> SmokeReport:
    """Run the smoke flow end to end; raise a StreamMLError on the first failing step."""
    report = SmokeReport()
    broker = LocalBroker(settings, progress=say)
    t = time.perf_counter()
    before = broker.status()
    status = broker.up()
    report.started_broker = before.state != "running" and status.state == "running"
    report.add("broker", t, f"{status.state} at {status.bootstrap}")
    try:
        _kafka_and_warehouse(settings, say, report)
    finally:
        if report.started_broker and not keep_broker:
            say(broker.down())
        report.broker_left_running = status.state == "running" and (
            keep_broker or not report.started_broker
        )
    return report


def _kafka_and_warehouse(
    settings: Settings, say: Callable[[str], None], report: SmokeReport
) -> None:
    t = time.perf_counter()
    created = asyncio.run(kafka.ensure_topics(settings, [SMOKE_TOPIC]))
    report.add("topic", t, f"{SMOKE_TOPIC} ({'created' if created else 'exists'})")

    event_id = uuid.uuid4().hex
    sent = {"event_id": event_id, "ts": dt.datetime.now(dt.UTC).isoformat(), "x": 1.5}
    t = time.perf_counter()
    [(partition, offset)] = asyncio.run(
        kafka.produce(settings, SMOKE_TOPIC, [(event_id.encode(), json.dumps(sent).encode())])
    )
    message = asyncio.run(kafka.fetch_at(settings, SMOKE_TOPIC, partition, offset))
    received = json.loads(message.value or b"null")
    if received != sent:
        raise RuntimeError(f"round trip changed the record: sent {sent}, got {received}")
    roundtrip_ms = (time.perf_counter() - t) * 1000
    report.add("round trip", t, f"{SMOKE_TOPIC}[{partition}]@{offset} event {event_id[:8]}")
    say(f"record {event_id[:8]} went through Kafka and back in {roundtrip_ms:.0f} ms")

    t = time.perf_counter()
    with Warehouse.connect(settings) as warehouse:
        minute = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
        warehouse.insert(
            "metrics",
            [(SMOKE_PIPELINE, "smoke", "smoke", "kafka_roundtrip_ms", minute, roundtrip_ms, 1)],
            ["pipeline", "model_version", "role", "metric", "window_start", "value", "n"],
        )
        rows = warehouse.query(
            "SELECT count(), round(avg(value), 1) FROM metrics FINAL "
            "WHERE pipeline = {p:String} AND metric = 'kafka_roundtrip_ms'",
            {"p": SMOKE_PIPELINE},
        ).rows
    count, avg_ms = rows[0]
    report.add(
        "warehouse", t, f"metrics row written; {count} smoke minute(s) on record, avg {avg_ms} ms"
    )

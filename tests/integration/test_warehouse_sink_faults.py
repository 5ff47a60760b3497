"""The warehouse sink on a real broker and real chDB, fed what used to wedge or poison it:
a backfill of thirty years, rows ClickHouse refuses, records that are no rows, and invalid
labels. (Named test_warehouse_*: in-process chDB runs after the other modules.)"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from streamml.config import Settings
from streamml.devstack import LocalBroker
from streamml.schemas.control import ControlEvent
from streamml.schemas.records import DeadLetter, Source
from streamml.schemas.spec import PipelineSpec, parse_spec
from streamml.streams import kafka
from streamml.streams.sink import WarehouseSink
from streamml.streams.topics import CONTROL_TOPIC
from streamml.streams.warehouse import Warehouse
from streamml.testing import isolated_settings, temporary_warehouse

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo.yaml"


@dataclasses.dataclass
class Rig:
    settings: Settings
    spec: PipelineSpec
    warehouse: Warehouse

    @property
    def name(self) -> str:
        return self.spec.name

    def produce(self, role: str, values: list[dict[str, Any] | bytes]) -> list[int]:
        topic = CONTROL_TOPIC if role == "control" else self.spec.topic(role)
        records = [(b"k", v if isinstance(v, bytes) else orjson.dumps(v)) for v in values]
        return [offset for _, offset in asyncio.run(kafka.produce(self.settings, topic, records))]

    def count(self, sql: str) -> int:
        return int(self.warehouse.query(sql.format(p=self.name)).rows[0][0])


@pytest.fixture
def rig(stack_settings: Settings, session_warehouse: Warehouse) -> Iterator[Rig]:
    """A pipeline of its own (topics, sink group and ClickHouse database) on the session's
    broker and chDB path."""
    tag = uuid.uuid4().hex[:8]
    data = yaml.safe_load(DEMO.read_text())
    data["name"] = f"sinkfault_{tag}"
    spec = parse_spec(data)
    settings = stack_settings.model_copy(update={"app_id": f"sinkfault_{tag}"})
    with temporary_warehouse(stack_settings, f"t_sinkfault_{tag}") as warehouse:
        rig = Rig(settings, spec, warehouse)
        topics = WarehouseSink(settings, [spec], warehouse).topics
        asyncio.run(kafka.ensure_topics(settings, topics, partitions=1))
        yield rig


def run_sink_until(rig: Rig, done: Callable[[], bool], timeout_s: float = 90.0) -> WarehouseSink:
    """Run a sink until ``done()`` holds (checked while it runs), then stop it."""
    sink = WarehouseSink(rig.settings, [rig.spec], rig.warehouse, flush_interval_ms=300)

    async def main() -> None:
        task = asyncio.create_task(sink.run())
        try:
            await _until(done, task, timeout_s)
        finally:
            sink.stop()
            await asyncio.wait_for(task, 30)

    asyncio.run(main())
    return sink


def _ms(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


MONTHS = [dt.datetime(y, m, 15, tzinfo=dt.UTC) for y in range(1995, 2026) for m in range(1, 13)]


def test_a_backfill_of_thirty_years_reaches_every_table(rig: Rig) -> None:
    """372 months in one batch: each table gets more than ClickHouse's 100 partitions per
    INSERT, which used to wedge the sink (it retried the refused batch forever)."""
    name = rig.name
    rig.produce("predictions", [_prediction(name, f"e{i}", _ms(t)) for i, t in enumerate(MONTHS)])
    rig.produce(
        "labels",
        [{"event_id": f"e{i}", "is_fraud": i % 2, "ts_ms": _ms(t)} for i, t in enumerate(MONTHS)],
    )
    rig.produce(
        "features",
        [
            {"event_id": f"e{i}", "ts_ms": _ms(t), "features": {"x": 1.0}}
            for i, t in enumerate(MONTHS)
        ],
    )
    rig.produce("metrics", [_metric(name, _ms(t)) for t in MONTHS])
    rig.produce("dlq", [_dead_letter(name, i, _ms(t)) for i, t in enumerate(MONTHS)])
    rig.produce("control", [_control(name, i, _ms(t)) for i, t in enumerate(MONTHS)])
    tables = ["predictions", "labels", "features", "metrics", "dead_letters", "audit_events"]
    wanted = {t: len(MONTHS) for t in tables} | {"drift_events": 186, "alerts": 186}

    def counts() -> dict[str, int]:
        return {
            t: rig.count(f"SELECT count() FROM {t} FINAL WHERE pipeline = '{{p}}'") for t in wanted
        }

    sink = run_sink_until(rig, lambda: counts() == wanted)
    assert counts() == wanted
    for table in wanted:
        column = "window_start" if table == "metrics" else "ts"
        years = rig.warehouse.query(
            f"SELECT min(toYear({column})), max(toYear({column})) FROM {table} "
            f"WHERE pipeline = '{name}'"
        ).rows
        assert years == [(1995, 2025)], table
    assert sink.stats.failed_flushes == 0 and sink.stats.dead_lettered == 0


def test_a_refused_row_is_dead_lettered_and_the_rest_of_its_batch_is_written(rig: Rig) -> None:
    name, t0 = rig.name, _ms(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    good = [_prediction(name, f"e{i}", t0 + i) for i in range(40)]
    poison = {**_prediction(name, "poison", t0), "trace_id": None}  # a null in a String column
    (poison_at,) = rig.produce("predictions", [*good[:20], poison, *good[20:]])[20:21]
    # A dead letter from the engine whose partition does not fit UInt32.
    (bad_letter_at,) = rig.produce(
        "dlq", [{**orjson.loads(_dead_letter(name, 1, t0)), "partition": -1}]
    )
    (unreadable_at,) = rig.produce("metrics", [b'{"pipeline": "not json'])

    def dead_letters() -> list[tuple[Any, ...]]:
        return rig.warehouse.query(
            "SELECT topic, offset, error_class, reason, payload FROM dead_letters FINAL "
            f"WHERE pipeline = '{name}' ORDER BY topic"
        ).rows

    def done() -> bool:
        predictions = rig.count("SELECT count() FROM predictions FINAL WHERE pipeline = '{p}'")
        return predictions == 40 and len(dead_letters()) == 3

    sink = run_sink_until(rig, done)
    letters = {row[0]: row for row in dead_letters()}
    _, offset, error_class, reason, payload = letters[rig.spec.topic("predictions")]
    assert (offset, error_class) == (poison_at, "warehouse_refused")
    assert reason.startswith("predictions: ") and "trace_id" in reason
    assert orjson.loads(payload) == poison  # the original record, as produced
    _, offset, error_class, reason, _ = letters[rig.spec.topic("dlq")]
    assert (offset, error_class) == (bad_letter_at, "warehouse_refused") and "partition" in reason
    _, offset, error_class, reason, payload = letters[rig.spec.topic("metrics")]
    assert (offset, error_class, payload) == (
        unreadable_at,
        "sink_unreadable",
        '{"pipeline": "not json',
    )
    assert "unreadable metrics record" in reason
    assert "poison" not in {r[0] for r in rig.warehouse.query(
        f"SELECT event_id FROM predictions WHERE pipeline = '{name}'").rows}  # fmt: skip
    assert sink.stats.failed_flushes == 0 and sink.stats.dead_lettered == 3


def test_invalid_labels_do_not_reach_the_labels_table(rig: Rig) -> None:
    t0 = _ms(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    labels: list[dict[str, Any] | bytes] = [
        {"event_id": "ok-1", "is_fraud": True, "ts_ms": t0},
        {"event_id": "bad-1", "is_fraud": "banana", "ts_ms": t0},
        {"event_id": "ok-2", "is_fraud": 0, "ts_ms": t0},
        {"event_id": "bad-2", "is_fraud": None, "ts_ms": t0},
        {"event_id": "bad-3", "is_fraud": [1], "ts_ms": t0},
        {"is_fraud": True, "ts_ms": t0},
        b"[]",
        {"event_id": "ok-3", "is_fraud": "true", "ts_ms": t0},
    ]
    rig.produce("labels", labels)

    def rows() -> list[tuple[Any, ...]]:
        return rig.warehouse.query(
            f"SELECT event_id, label, label_value FROM labels FINAL WHERE pipeline = '{rig.name}' "
            "ORDER BY event_id"
        ).rows

    sink = run_sink_until(rig, lambda: len(rows()) >= 3)
    time.sleep(0.5)
    assert rows() == [("ok-1", "True", 1.0), ("ok-2", "False", 0.0), ("ok-3", "True", 1.0)]
    assert sink.stats.invalid_labels == 5
    assert rig.count("SELECT count() FROM dead_letters WHERE pipeline = '{p}'") == 0


def test_the_sink_waits_out_a_broker_that_is_down_and_restarts(
    tmp_path: Path, stack_settings: Settings, session_warehouse: Warehouse
) -> None:
    """Started before its broker, and the broker restarted under it: the sink neither
    dies nor loses rows, and /health says degraded (with why) while Kafka is away."""
    if not stack_settings.uses_local_broker:
        pytest.skip("needs a local broker of its own to stop and start")
    tag = uuid.uuid4().hex[:8]
    settings = isolated_settings(tmp_path, request_timeout_s=5.0, app_id=f"sinkrestart_{tag}")
    data = yaml.safe_load(DEMO.read_text())
    data["name"] = f"sinkrestart_{tag}"
    spec, broker = parse_spec(data), LocalBroker(settings)
    t0 = _ms(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    with temporary_warehouse(stack_settings, f"t_sinkrestart_{tag}") as warehouse:
        sink = WarehouseSink(settings, [spec], warehouse, flush_interval_ms=300)
        sql = f"SELECT count() FROM predictions FINAL WHERE pipeline = '{spec.name}'"

        def written() -> int:
            return int(warehouse.query(sql).rows[0][0])

        async def produce(first: int) -> None:
            values = [_prediction(spec.name, f"e{i}", t0 + i) for i in range(first, first + 10)]
            topic = spec.topic("predictions")
            await kafka.produce(settings, topic, [(b"k", orjson.dumps(v)) for v in values])

        async def main() -> None:
            task = asyncio.create_task(sink.run())
            try:
                await _until(lambda: sink.health()["last_error"] is not None, task)
                assert sink.health()["status"] == "degraded"
                await asyncio.to_thread(broker.up)
                await kafka.ensure_topics(settings, sink.topics, partitions=1)
                await produce(0)
                await _until(lambda: written() == 10, task)
                await asyncio.to_thread(broker.down)
                await asyncio.sleep(3)  # polling and committing against no broker
                await asyncio.to_thread(broker.up)
                await produce(10)
                await _until(lambda: written() == 20, task)
                await _until(lambda: sink.health()["status"] == "ok", task)
                assert sink.health()["lag"] == 0
            finally:
                sink.stop()
                await asyncio.wait_for(task, 60)

        try:
            asyncio.run(main())
        finally:
            broker.down()
    assert sink.stats.written["predictions"] == 20  # nothing lost, nothing written twice


async def _until(done: Callable[[], bool], task: asyncio.Task[None], timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(done):
        if task.done():
            task.result()
            raise AssertionError("the sink stopped by itself")
        assert time.monotonic() < deadline, f"not done within {timeout_s} s: {task}"
        await asyncio.sleep(0.3)


# --- records as the engine writes them -----------------------------------------------------
def _prediction(pipeline: str, event_id: str, ts_ms: int) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "event_id": event_id,
        "entity_key": "u1",
        "ts_ms": ts_ms,
        "model_name": "online",
        "model_version": "v1",
        "role": "champion",
        "served": True,
        "score": 0.25,
        "predicted_class": "False",
        "probabilities": {"True": 0.25, "False": 0.75},
        "latency_ms": 0.2,
        "trace_id": "",
    }


def _metric(pipeline: str, ts_ms: int) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "model_version": "v1",
        "role": "champion",
        "metric": "accuracy",
        "window_start_ms": ts_ms,
        "partition": 0,
        "value": 0.9,
        "n": 10,
    }


def _dead_letter(pipeline: str, offset: int, ts_ms: int) -> bytes:
    source = Source(f"{pipeline}.raw", 0, offset, ts_ms, b"k")
    return DeadLetter("malformed_json", "not valid JSON", b"{", source).to_json(pipeline)


def _control(pipeline: str, i: int, ts_ms: int) -> bytes:
    if i % 2:
        event = ControlEvent.new(
            pipeline, "alert", reason="r", details={"rule": "acc", "state": "firing"}
        )
    else:
        event = ControlEvent.new(
            pipeline, "drift_detected", details={"detector": "psi", "statistic": 0.3}
        )
    return dataclasses.replace(event, ts_ms=ts_ms).to_json()

"""The sink's batching core, with the real Warehouse over a stand-in ClickHouse client that
refuses or fails on demand (no broker, no chDB)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, NodeNotReadyError
from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError

from streamml.config import load_settings
from streamml.errors import WarehouseError
from streamml.schemas.control import ControlEvent
from streamml.schemas.records import DLQ_PAYLOAD_BYTES
from streamml.schemas.spec import load_spec
from streamml.streams.rows import DLQ_COLUMNS, LABEL_COLUMNS, PREDICTION_COLUMNS, prediction_row
from streamml.streams.sink import (
    Entry,
    Origin,
    WarehouseSink,
)
from streamml.streams.warehouse import Warehouse

SPEC = load_spec(Path(__file__).resolve().parents[3] / "pipelines" / "demo.yaml")


class FakeClickHouse:
    """Accepts rows into lists; refuses a block holding a row with ``None`` (as
    clickhouse-connect does for a non-Nullable column); fails ``outages`` inserts first."""

    def __init__(self, outages: int = 0, refuse_tables: tuple[str, ...] = ()) -> None:
        self.outages = outages
        self.refuse_tables = refuse_tables
        self.rows: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        self.inserts = 0

    def insert(self, table: str, block: list[tuple[Any, ...]], column_names: list[str]) -> None:
        self.inserts += 1
        assert all(len(r) == len(column_names) for r in block)
        if self.outages:
            self.outages -= 1
            raise OperationalError("Error HTTPConnectionPool(host='ch'): Connection refused")
        if table in self.refuse_tables or any(None in row for row in block):
            raise DataError("Invalid None value in non-Nullable column, column name: `trace_id`")
        self.rows[table].extend(block)


def _warehouse(client: FakeClickHouse) -> Warehouse:
    return Warehouse(client, "streamml", "chdb://memory")  # type: ignore[arg-type]


def _sink(client: FakeClickHouse, **settings: Any) -> WarehouseSink:
    return WarehouseSink(load_settings(**settings), [SPEC], _warehouse(client))


PREDICTION = {
    "pipeline": "demo",
    "event_id": "e1",
    "entity_key": "u1",
    "ts_ms": 1_767_225_600_000,
    "model_name": "m",
    "model_version": "v",
    "role": "champion",
    "served": True,
    "score": 0.7,
    "predicted_class": "True",
    "probabilities": {"True": 0.7, "False": 0.3},
    "latency_ms": 0.1,
    "ingest_ms": 1_767_225_600_000,
    "emitted_ms": 1_767_225_600_040,
}


def _record(topic: str, offset: int, value: dict[str, Any] | bytes) -> ConsumerRecord[bytes, bytes]:
    data = value if isinstance(value, bytes) else orjson.dumps(value)
    return ConsumerRecord(
        topic, 1, offset, 1_767_225_600_000, 0, b"k", data, None, 1, len(data), []
    )


def _predictions(n: int, bad: set[int] = frozenset()) -> list[Entry]:  # type: ignore[assignment]
    entries = []
    for i in range(n):
        value = {**PREDICTION, "event_id": f"e{i}", "trace_id": None if i in bad else ""}
        origin = Origin("demo", _record("demo.predictions", i, b""))
        entries.append((prediction_row(value), origin))
    return entries


def _dead_letters(client: FakeClickHouse) -> list[dict[str, Any]]:
    return [dict(zip(DLQ_COLUMNS, r, strict=True)) for r in client.rows["dead_letters"]]


def test_a_failed_write_is_retried_and_nothing_is_written_twice() -> None:
    client = FakeClickHouse(outages=2)
    sink = _sink(client)
    buffers = {"predictions": _predictions(3)}
    asyncio.run(sink._flush_until_written(buffers))
    assert sink.stats.failed_flushes == 2
    assert len(client.rows["predictions"]) == 3
    assert client.rows["dead_letters"] == []  # an outage is retried, never dead-lettered
    assert buffers == {}


def test_a_refused_row_is_dead_lettered_and_the_rest_of_its_batch_is_written() -> None:
    client = FakeClickHouse()
    sink = _sink(client)
    asyncio.run(sink._flush_until_written({"predictions": _predictions(64, bad={17, 40})}))
    written = sorted(r[1] for r in client.rows["predictions"])
    assert written == sorted(f"e{i}" for i in range(64) if i not in {17, 40})
    letters = _dead_letters(client)
    assert [(d["topic"], d["offset"], d["error_class"]) for d in letters] == [
        ("demo.predictions", 17, "warehouse_refused"),
        ("demo.predictions", 40, "warehouse_refused"),
    ]
    assert "predictions: Invalid None value" in letters[0]["reason"]
    assert "trace_id" in letters[0]["reason"]
    assert sink.health()["dead_lettered"] == 2 and sink.health()["rows_written"] == 64
    assert client.inserts < 2 * 2 * 7 + 4  # bisection: about k * log2(n) extra inserts


def test_refused_rows_keep_their_original_record_cut_to_the_dead_letter_limit() -> None:
    client = FakeClickHouse()
    sink = _sink(client)
    huge = {**PREDICTION, "trace_id": None, "pad": "x" * (DLQ_PAYLOAD_BYTES + 10)}
    buffers: dict[str, list[Entry]] = defaultdict(list)
    sink._buffer(_record("demo.predictions", 5, huge), buffers)
    asyncio.run(sink._flush_until_written(buffers))
    (letter,) = _dead_letters(client)
    assert len(letter["payload"]) == DLQ_PAYLOAD_BYTES
    assert letter["payload"].startswith('{"pipeline":"demo"')
    assert "payload truncated" in letter["reason"] and letter["key"] == "k"


def test_a_dead_letter_the_warehouse_refuses_becomes_one_about_its_record() -> None:
    client = FakeClickHouse()
    sink = _sink(client)
    broken = {"pipeline": "demo", "topic": "demo.raw", "partition": 0, "offset": 3,
              "ts_ms": 1_767_225_600_000, "error_class": "malformed_json", "reason": "bad",
              "payload": None, "key": ""}  # fmt: skip
    buffers: dict[str, list[Entry]] = defaultdict(list)
    sink._buffer(_record("demo.dlq", 9, broken), buffers)
    asyncio.run(sink._flush_until_written(buffers))
    (letter,) = _dead_letters(client)
    assert (letter["topic"], letter["offset"], letter["error_class"]) == (
        "demo.dlq",
        9,
        "warehouse_refused",
    )


def test_a_dead_letter_of_the_sink_that_is_refused_too_is_dropped_not_looped() -> None:
    client = FakeClickHouse(refuse_tables=("dead_letters",))
    sink = _sink(client)
    asyncio.run(sink._flush_until_written({"predictions": _predictions(4, bad={2})}))
    assert len(client.rows["predictions"]) == 3
    assert sink.stats.dropped == 1 and sink.stats.dead_lettered == 0


def test_an_unreadable_record_becomes_a_dead_letter() -> None:
    client = FakeClickHouse()
    sink = _sink(client)
    buffers: dict[str, list[Entry]] = defaultdict(list)
    sink._buffer(_record("demo.metrics", 4, b"[1, 2"), buffers)
    sink._buffer(_record("demo.predictions", 5, {"event_id": "no-score"}), buffers)
    asyncio.run(sink._flush_until_written(buffers))
    letters = _dead_letters(client)
    assert [(d["topic"], d["error_class"]) for d in letters] == [
        ("demo.metrics", "sink_unreadable"),
        ("demo.predictions", "sink_unreadable"),
    ]
    assert letters[0]["payload"] == "[1, 2"
    assert "KeyError" in letters[1]["reason"]
    assert sink.stats.bad_messages == 2


def test_the_sinks_own_dead_letters_keep_no_pii_value_in_clear(tmp_path: Path) -> None:
    """A spec marking the entity key pii: a record of it that makes no row (its Kafka key
    the entity key, its payload holding it) is dead-lettered with both protected."""
    spec = SPEC.model_copy(
        update={
            "schema_": SPEC.schema_.model_copy(
                update={
                    "fields": {
                        **SPEC.schema_.fields,
                        "user_id": SPEC.schema_.fields["user_id"].model_copy(
                            update={"pii": "hash"}
                        ),
                    }
                }
            )
        }
    )
    client = FakeClickHouse()
    settings = load_settings(state_dir=tmp_path, pii_key="k-3f9a")
    sink = WarehouseSink(settings, [spec], _warehouse(client))
    planted = b"PLANTED-77ab"
    payload = b'{"user_id": "PLANTED-77ab", "event_id": 1'  # no row: cut short
    record = ConsumerRecord(
        "demo.predictions", 1, 3, 1_767_225_600_000, 0, planted, payload, None, 1, 20, []
    )
    buffers: dict[str, list[Entry]] = defaultdict(list)
    sink._buffer(record, buffers)
    asyncio.run(sink._flush_until_written(buffers))
    [letter] = _dead_letters(client)
    assert letter["error_class"] == "sink_unreadable"
    assert planted.decode() not in repr(letter)


def test_invalid_labels_are_skipped_and_valid_ones_keep_the_validated_value() -> None:
    client = FakeClickHouse()
    sink = _sink(client)
    buffers: dict[str, list[Entry]] = defaultdict(list)
    values = [
        {"event_id": "a", "is_fraud": 1},
        {"event_id": "b", "is_fraud": "banana"},
        {"event_id": "c", "is_fraud": "false"},
        {"is_fraud": True},
        {"event_id": "d", "is_fraud": None},
    ]
    for offset, value in enumerate(values):
        sink._buffer(_record("demo.labels", offset, value), buffers)
    asyncio.run(sink._flush_until_written(buffers))
    rows = [dict(zip(LABEL_COLUMNS, r, strict=True)) for r in client.rows["labels"]]
    assert [(r["event_id"], r["label"], r["label_value"]) for r in rows] == [
        ("a", "True", 1.0),
        ("c", "False", 0.0),
    ]
    assert sink.stats.invalid_labels == 3
    assert client.rows["dead_letters"] == []  # the engine dead-letters invalid labels


def test_lasting_write_failures_fire_one_alert_and_resolve_it() -> None:
    client = FakeClickHouse(outages=2)
    events: list[ControlEvent] = []
    health: list[dict[str, Any]] = []

    async def announce(event: ControlEvent) -> None:
        health.append(sink.health())
        events.append(event)

    sink = WarehouseSink(
        load_settings(sink_alert_after_s=0.2), [SPEC], _warehouse(client), announce=announce
    )
    asyncio.run(sink._flush_until_written({"predictions": _predictions(2)}))
    assert [(e.action, e.details["rule"], e.details["state"]) for e in events] == [
        ("alert", "sink_write_failing", "firing"),
        ("alert", "sink_write_failing", "resolved"),
    ]
    assert health[0]["status"] == "degraded" and health[0]["failing_since_ms"] is not None
    assert "Connection refused" in health[0]["last_error"]
    after = sink.health()
    assert after["status"] == "ok" and after["failing_since_ms"] is None
    assert after["last_error_ms"] is not None and after["lag"] is None  # never started


def test_an_alert_that_cannot_be_published_does_not_stop_the_writes() -> None:
    client = FakeClickHouse(outages=2)

    async def announce(event: ControlEvent) -> None:
        raise WarehouseError("Kafka is down too")

    sink = WarehouseSink(
        load_settings(sink_alert_after_s=0.1), [SPEC], _warehouse(client), announce=announce
    )
    asyncio.run(sink._flush_until_written({"predictions": _predictions(2)}))
    assert len(client.rows["predictions"]) == 2
    assert sink._trouble.alert_firing is False  # not published: it will be tried again


def test_a_backfill_over_many_days_is_split_by_partition_in_the_isolating_insert() -> None:
    client = FakeClickHouse()
    entries = _predictions(450)
    t0 = dt.datetime(1995, 1, 1, tzinfo=dt.UTC)
    rows = [(*r[:3], t0 + dt.timedelta(days=31 * i), *r[4:]) for i, (r, _) in enumerate(entries)]
    warehouse = _warehouse(client)
    assert warehouse.insert_isolating("predictions", rows, PREDICTION_COLUMNS) == []
    assert client.inserts == 5 and len(client.rows["predictions"]) == 450


class StubConsumer:
    """Stands in for the aiokafka consumer: an assignment, and commits/polls that fail."""

    def __init__(self, assigned: set[TopicPartition], failures: list[Exception]) -> None:
        self.assigned = assigned
        self.failures = failures
        self.committed: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.committed.append(offsets)

    async def getmany(self, **_: Any) -> dict[TopicPartition, list[Any]]:
        if self.failures:
            raise self.failures.pop(0)
        return {}


def test_a_failed_commit_keeps_the_offsets_of_partitions_still_assigned() -> None:
    tp0, tp1 = TopicPartition("demo.predictions", 0), TopicPartition("demo.predictions", 1)
    consumer = StubConsumer({tp0}, [CommitFailedError("rebalanced")])
    sink = _sink(FakeClickHouse())
    offsets = {tp0: 5, tp1: 7}  # tp1 was taken away: its new owner re-reads written rows
    asyncio.run(sink._commit(consumer, offsets))  # type: ignore[arg-type]
    assert offsets == {tp0: 5} and consumer.committed == []
    assert sink.health()["status"] == "degraded" and "rebalanced" in sink.health()["last_error"]
    asyncio.run(sink._commit(consumer, offsets))  # type: ignore[arg-type]
    assert consumer.committed == [{tp0: 5}] and offsets == {}


def test_a_poll_that_fails_while_the_broker_restarts_does_not_stop_the_sink() -> None:
    consumer = StubConsumer(set(), [NodeNotReadyError("node 1 not ready")])
    sink = _sink(FakeClickHouse())
    assert asyncio.run(sink._poll(consumer, 10)) == {}  # type: ignore[arg-type]
    assert sink.health()["status"] == "degraded"
    assert asyncio.run(sink._poll(consumer, 10)) == {}  # type: ignore[arg-type]
    assert sink.health()["status"] == "ok"


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (DataError("Unable to create native array for column `served`"), True),
        (DatabaseError("Code: 349. DB::Exception: Cannot insert NULL value"), True),
        (
            DatabaseError("Code: 252. DB::Exception: Too many partitions for single INSERT block"),
            True,
        ),
        (DatabaseError("Code: 252. DB::Exception: Too many parts (300). Merges are slow"), False),
        (DatabaseError("Code: 241. DB::Exception: Memory limit (total) exceeded"), False),
        (OperationalError("Error HTTPConnectionPool: Connection refused"), False),
        (RuntimeError("chDB session closed"), False),
    ],
)
def test_refusals_are_told_apart_from_outages(error: Exception, refused: bool) -> None:
    class Client:
        def insert(self, *_: object, **__: object) -> None:
            raise error

    warehouse = Warehouse(Client(), "streamml", "chdb://memory")  # type: ignore[arg-type]
    with pytest.raises(WarehouseError) as caught:
        warehouse.insert("predictions", [("x",)], ["x"])
    assert (type(caught.value).__name__ == "WarehouseRefusedError") is refused
    assert caught.value.retriable is not refused


def test_prediction_row_carries_end_to_end_latency() -> None:
    row = dict(zip(PREDICTION_COLUMNS, prediction_row(PREDICTION), strict=True))
    assert row["e2e_latency_ms"] == 40.0  # emitted - ingested, ms
    assert row["probabilities"] == {"True": 0.7, "False": 0.3}
    assert row["served"] == 1


def test_a_large_fetched_batch_is_buffered_in_slices_between_which_the_loop_runs() -> None:
    """Thousands of records are buffered with turns of the event loop between slices, so
    an engine in the same worker keeps scoring meanwhile."""
    sink = _sink(FakeClickHouse())
    tp = TopicPartition("demo.predictions", 1)
    records = [_record(tp.topic, i, {**PREDICTION, "event_id": f"e{i}"}) for i in range(2000)]
    buffers: dict[str, list[Entry]] = defaultdict(list)
    offsets: dict[TopicPartition, int] = {}
    turns = 0

    async def go() -> None:
        nonlocal turns
        stop = asyncio.Event()

        async def other() -> None:
            nonlocal turns
            while not stop.is_set():
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        await asyncio.sleep(0)
        turns = 0
        await sink._take({tp: records}, buffers, offsets)
        stop.set()
        await task

    asyncio.run(go())
    assert len(buffers["predictions"]) == 2000 and offsets[tp] == 2000
    assert turns >= 2000 // 256 - 1  # the other task ran between the slices
    [(_, origin)] = buffers["predictions"][:1]
    assert origin.source.offset == 0 and origin.payload == records[0].value

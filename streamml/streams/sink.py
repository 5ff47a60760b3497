"""The warehouse sink: pipeline topics -> ClickHouse in batches, offsets committed after.

A plain aiokafka consumer group (``<app_id>-sink``) reads the predictions, labels,
metrics, features, dead-letter and control topics, buffers rows per table, and writes a
batch when it reaches ``max_rows`` or ``flush_interval_ms``. Offsets are committed only
after the rows are written, so a crash re-delivers instead of losing; ReplacingMergeTree
keys collapse the re-delivered rows.

It never wedges: a row ClickHouse refuses for itself, and a record that is no row at all,
become ``dead_letters`` rows with the reason while the rest of the batch is written; a
warehouse or broker that is down is retried with backoff (nothing committed meanwhile),
:meth:`WarehouseSink.health` says so, and an alert fires once writes have failed for
``sink_alert_after_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from streamml.config import Settings
from streamml.errors import WarehouseError
from streamml.schemas.control import ControlEvent
from streamml.schemas.pii import Protector, marked
from streamml.schemas.records import DeadLetter, Source, validate_label
from streamml.schemas.spec import PipelineSpec
from streamml.secrets import pii_key
from streamml.streams import control
from streamml.streams.kafka import client_options, close_quietly
from streamml.streams.rows import (
    COLUMNS,
    annotation_rows,
    control_rows,
    dlq_row,
    feature_row,
    label_row,
    metric_row,
    prediction_row,
)
from streamml.streams.topics import CONTROL_TOPIC, loads, pipeline_topics
from streamml.streams.warehouse import Warehouse

log = logging.getLogger("streamml.sink")

REFUSED = "warehouse_refused"  # error_class of a row ClickHouse refused
UNREADABLE = "sink_unreadable"  # error_class of a record the sink could not make a row of
ALERT_RULE = "sink_write_failing"

Rows = list[tuple[str, tuple[Any, ...]]]
Route = Callable[[ConsumerRecord[bytes, bytes]], Rows]


@dataclass(slots=True)
class Origin:
    """Where a buffered row came from, so that a row the warehouse refuses can become a
    dead letter carrying the original record. One is made per row, so it keeps the
    Kafka record and makes its :class:`Source` only when a refusal needs it (a frozen
    dataclass and a Source per row were 3% of a worker's main thread at 1,000 events/s)."""

    pipeline: str
    record: ConsumerRecord[bytes, bytes] | None  # None: a dead letter the sink made
    letter_source: Source | None = None
    letter_payload: bytes = b""

    @property
    def made_here(self) -> bool:
        """A dead letter the sink made itself: nothing to fall back to."""
        return self.record is None

    @property
    def source(self) -> Source:
        if self.record is not None:
            return _source(self.record)
        assert self.letter_source is not None
        return self.letter_source

    @property
    def payload(self) -> bytes:
        return (self.record.value or b"") if self.record is not None else self.letter_payload


Entry = tuple[tuple[Any, ...], Origin]
TAKE_SLICE = 256  # records buffered between two turns of the event loop


@dataclass(frozen=True)
class _Route:
    what: str  # what its records are called in logs
    pipeline: str  # "" for the control topic, whose rows lead with their own pipeline
    to_rows: Route


def _one(table: str, to_row: Callable[[dict[str, Any]], tuple[Any, ...]]) -> Route:
    return lambda r: [(table, to_row(loads(r.value)))]


def _source(record: ConsumerRecord[bytes, bytes]) -> Source:
    return Source(record.topic, record.partition, record.offset, record.timestamp, record.key)


@dataclass
class SinkStats:
    written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    flushes: int = 0
    failed_flushes: int = 0
    bad_messages: int = 0  # records that made no row (each is dead-lettered)
    invalid_labels: int = 0  # skipped: the engine already dead-lettered them
    dead_lettered: int = 0  # dead letters the sink made (refused rows, unreadable records)
    dropped: int = 0  # dead letters the sink made that the warehouse refused too
    last_flush_ms: float = 0.0


@dataclass
class _Trouble:
    """The sink's failures as /health reports them (epoch ms)."""

    last_error: str | None = None
    last_error_ms: int | None = None
    failing_since_ms: int | None = None  # warehouse writes failing since
    kafka_failing_since_ms: int | None = None
    alert_firing: bool = False  # the firing alert is published, its resolution is not
    alert_retry_at: float = 0.0  # monotonic; a failed publish waits until then

    def note(self, exc: BaseException) -> int:
        now = _now_ms()
        self.last_error, self.last_error_ms = (str(exc) or type(exc).__name__)[:500], now
        return now


def _now_ms() -> int:
    return int(time.time() * 1000)


Announce = Callable[[ControlEvent], Awaitable[None]]


class WarehouseSink:
    """Consumes the pipelines' output topics and writes them to the warehouse."""

    def __init__(
        self,
        settings: Settings,
        specs: Sequence[PipelineSpec],
        warehouse: Warehouse,
        max_rows: int = 10_000,
        flush_interval_ms: int = 1000,
        announce: Announce | None = None,
    ) -> None:
        self.settings = settings
        self.warehouse = warehouse
        self.max_rows = max_rows
        self.flush_interval_ms = flush_interval_ms
        self.stats = SinkStats()
        self._announce = announce or functools.partial(control.publish, settings)
        self._routes = {
            CONTROL_TOPIC: _Route("control", "", lambda r: control_rows(loads(r.value)))
        }
        # the dead letters the sink makes itself are protected like the engine's
        self._pii = {
            spec.name: Protector.for_spec(spec, pii_key(settings)) for spec in specs if marked(spec)
        }
        for spec in specs:
            self._add_routes(spec)
        self._stopping = asyncio.Event()
        self._trouble = _Trouble()
        self._consumer: AIOKafkaConsumer | None = None
        self._positions: dict[TopicPartition, int] = {}  # next offset the sink reads

    def _add_routes(self, spec: PipelineSpec) -> None:
        topics, name = pipeline_topics(spec), spec.name
        routes: dict[str, Route] = {
            "predictions": _one("predictions", prediction_row),
            "labels": functools.partial(self._label_rows, spec),
            "metrics": _one("metrics", metric_row),
            "dlq": _one("dead_letters", dlq_row),
            "features": _one("features", functools.partial(feature_row, name)),
        }
        if "annotations" in topics:
            routes["annotations"] = lambda r: annotation_rows(name, loads(r.value))
        for role, to_rows in routes.items():
            self._routes[topics[role]] = _Route(role, name, to_rows)

    def _label_rows(self, spec: PipelineSpec, record: ConsumerRecord[bytes, bytes]) -> Rows:
        """A valid label's row; an invalid one is skipped (the engine dead-letters it)."""
        label = validate_label(spec, record.value or b"", _source(record))
        if isinstance(label, DeadLetter):
            self.stats.invalid_labels += 1
            return []
        return [("labels", label_row(spec.name, label, loads(record.value), record.timestamp))]

    @property
    def topics(self) -> list[str]:
        return sorted(self._routes)

    # --- health -------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """What /health shows of the sink: ``degraded`` while writes (or the broker) fail."""
        trouble = self._trouble
        failing = (trouble.failing_since_ms, trouble.kafka_failing_since_ms) != (None, None)
        return {
            "status": "degraded" if failing else "ok",
            "lag": self._lag(),
            "last_error": trouble.last_error,
            "last_error_ms": trouble.last_error_ms,
            "failing_since_ms": trouble.failing_since_ms,
            "rows_written": sum(self.stats.written.values()),
            "dead_lettered": self.stats.dead_lettered,
        }

    def _lag(self) -> int | None:
        """Records on the assigned partitions the sink has not read yet (None before start)."""
        consumer = self._consumer
        if consumer is None:
            return None
        lag = 0
        for tp in consumer.assignment():
            high, position = consumer.highwater(tp), self._positions.get(tp)
            if high is not None and position is not None:
                lag += max(0, high - position)
        return lag

    # --- the consumer loop --------------------------------------------------------------
    async def run(self) -> None:
        consumer = await self._connect()
        if consumer is None:
            return
        self._consumer = consumer
        buffers: dict[str, list[Entry]] = defaultdict(list)
        offsets: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + self.flush_interval_ms / 1000
        try:
            while not self._stopping.is_set():
                left_ms = max(1, int((deadline - time.monotonic()) * 1000))
                await self._take(await self._poll(consumer, min(left_ms, 200)), buffers, offsets)
                pending = sum(len(b) for b in buffers.values())
                if offsets and (pending >= self.max_rows or time.monotonic() >= deadline):
                    await self._flush_until_written(buffers)
                    await self._commit(consumer, offsets)
                if time.monotonic() >= deadline:
                    deadline = time.monotonic() + self.flush_interval_ms / 1000
                await self._sync_alert()
        finally:
            await self._close(consumer, buffers, offsets)

    def stop(self) -> None:
        self._stopping.set()

    async def _connect(self) -> AIOKafkaConsumer | None:
        """A started consumer; a broker that is not there yet is waited for (None: stopped)."""
        while not self._stopping.is_set():
            consumer = self._new_consumer()
            try:
                await consumer.start()
                self._kafka_ok()
                return consumer
            except (KafkaError, OSError) as exc:
                delay_s = self._kafka_backoff_s()
                self._kafka_failed("start on", exc, f"in {delay_s:.1f} s")
                await close_quietly(consumer.stop(), self.settings.request_timeout_s)
            await self._pause(delay_s)
        return None

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=f"{self.settings.app_id}-sink",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_rows,
            session_timeout_ms=int(self.settings.session_timeout_s * 1000),
            heartbeat_interval_ms=int(self.settings.heartbeat_interval_s * 1000),
            fetch_max_wait_ms=100,
            **client_options(self.settings),
        )

    async def _poll(
        self, consumer: AIOKafkaConsumer, timeout_ms: int
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        """The next records; none while the broker is away (logged, backed off)."""
        try:
            batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
            batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=self.max_rows)
        except (KafkaError, OSError) as exc:
            delay_s = self._kafka_backoff_s()
            self._kafka_failed("read from", exc, f"in {delay_s:.1f} s")
            await self._pause(delay_s)
            return {}
        self._kafka_ok()
        return batch

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """Commit the offsets of written rows. On failure they stay, to be committed with
        the next batch; those of partitions taken away meanwhile are dropped (their new
        owner re-reads rows already written, and the table keys collapse them)."""
        assigned = consumer.assignment()
        try:
            await consumer.commit({tp: o for tp, o in offsets.items() if tp in assigned})
        except (KafkaError, OSError) as exc:
            self._kafka_failed("commit offsets to", exc, "with the next batch")
            for tp in [tp for tp in offsets if tp not in consumer.assignment()]:
                del offsets[tp]
            return
        self._kafka_ok()
        offsets.clear()

    async def _close(
        self,
        consumer: AIOKafkaConsumer,
        buffers: dict[str, list[Entry]],
        offsets: dict[TopicPartition, int],
    ) -> None:
        if offsets:
            try:
                await self._flush(buffers)
            except Exception as exc:  # the rows will be re-delivered to the next sink
                now = self._trouble.note(exc)
                self._trouble.failing_since_ms = self._trouble.failing_since_ms or now
                log.exception("final flush failed; uncommitted rows will be re-delivered")
            else:
                await self._commit(consumer, offsets)
        self._consumer = None
        await close_quietly(consumer.stop(), self.settings.request_timeout_s)

    async def _take(
        self,
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        buffers: dict[str, list[Entry]],
        offsets: dict[TopicPartition, int],
    ) -> None:
        """Buffer a fetched batch, letting the event loop run between slices of it: a
        batch of thousands of records would otherwise hold the engines' scoring up for
        tens of milliseconds at a time."""
        done = 0
        for tp, records in batch.items():
            for record in records:
                self._buffer(record, buffers)
                offsets[tp] = self._positions[tp] = record.offset + 1
                done += 1
                if done % TAKE_SLICE == 0:
                    await asyncio.sleep(0)

    def _buffer(
        self, record: ConsumerRecord[bytes, bytes], buffers: dict[str, list[Entry]]
    ) -> None:
        """The record's rows into the buffers; a record that makes no row, as a dead letter."""
        route = self._routes[record.topic]
        try:
            rows = route.to_rows(record)
        except Exception as exc:  # whatever is wrong with one record must not stop the sink
            self.stats.bad_messages += 1
            log.warning(
                "dead-lettering a malformed %s record at %s@%d: %s",
                route.what,
                record.topic,
                record.offset,
                exc,
            )
            reason = f"unreadable {route.what} record: {type(exc).__name__}: {exc}"
            buffers["dead_letters"].append(
                self._dead_letter(
                    route.pipeline,
                    UNREADABLE,
                    reason,
                    Origin(route.pipeline, record),
                )
            )
            return
        for table, row in rows:
            pipeline = route.pipeline or (row[0] if isinstance(row[0], str) else "")
            buffers[table].append((row, Origin(pipeline, record)))

    def _dead_letter(self, pipeline: str, error_class: str, reason: str, origin: Origin) -> Entry:
        letter = DeadLetter(error_class, reason, origin.payload, origin.source)
        protector = self._pii.get(pipeline)
        if protector is not None:  # its payload, key and reason: never a pii value in clear
            letter = protector.letter(letter)
        row = dlq_row(loads(letter.to_json(pipeline)))
        return row, Origin(pipeline, None, letter.source, letter.payload)

    # --- writing ------------------------------------------------------------------------
    async def _flush_until_written(self, buffers: dict[str, list[Entry]]) -> None:
        """Retry a failed write (server restart, disk full) instead of dropping the batch;
        nothing is committed meanwhile, so a crash here re-delivers rather than loses."""
        delay_s = 0.5
        while True:
            try:
                await self._flush(buffers)
            except WarehouseError as exc:
                self.stats.failed_flushes += 1
                now = self._trouble.note(exc)
                self._trouble.failing_since_ms = self._trouble.failing_since_ms or now
                log.error("warehouse write failed, retrying in %.1f s: %s", delay_s, exc)
                await self._sync_alert()
                if self._stopping.is_set():
                    raise
                await self._pause(delay_s)
                delay_s = min(delay_s * 2, 30.0)
                continue
            self._trouble.failing_since_ms = None
            await self._sync_alert()
            return

    async def _flush(self, buffers: dict[str, list[Entry]]) -> None:
        t0 = time.perf_counter()
        while buffers:  # dead letters last: the rows refused before them join them
            table = min(buffers, key=lambda t: t == "dead_letters")
            more = await self._write(table, buffers[table])
            del buffers[table]  # written: a retry must not write it again
            if more:
                buffers["dead_letters"] = buffers.get("dead_letters", []) + more
        self.stats.flushes += 1
        self.stats.last_flush_ms = (time.perf_counter() - t0) * 1000

    async def _write(self, table: str, entries: list[Entry]) -> list[Entry]:
        """Write a table's rows; return dead letters for the rows ClickHouse refused."""
        rows = [row for row, _ in entries]
        refused = await asyncio.to_thread(
            self.warehouse.insert_isolating, table, rows, COLUMNS[table]
        )
        self.stats.written[table] += len(entries) - len(refused)
        if table == "dead_letters":
            lost = {r.index for r in refused}
            self.stats.dead_lettered += sum(
                1 for i, (_, o) in enumerate(entries) if o.made_here and i not in lost
            )
        letters = []
        for refusal in refused:
            origin = entries[refusal.index][1]
            where = f"{origin.source.topic}@{origin.source.partition}:{origin.source.offset}"
            if origin.made_here:
                self.stats.dropped += 1
                log.error(
                    "dropping a dead letter for %s the warehouse refused: %s", where, refusal.reason
                )
                continue
            log.warning(
                "the warehouse refused a %s row from %s; dead-lettered: %s",
                table,
                where,
                refusal.reason,
            )
            reason = f"{table}: {refusal.reason}"
            letters.append(self._dead_letter(origin.pipeline, REFUSED, reason, origin))
        return letters

    # --- failures and the alert ---------------------------------------------------------
    async def _pause(self, delay_s: float) -> None:
        """Sleep, unless the sink is asked to stop meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay_s)

    def _kafka_backoff_s(self) -> float:
        """0.5 s, growing with the time Kafka has been away, to at most 5 s (a restarted
        broker is picked up within seconds)."""
        since = self._trouble.kafka_failing_since_ms
        failing_s = 0.0 if since is None else (_now_ms() - since) / 1000
        return min(max(0.5, failing_s / 2), 5.0)

    def _kafka_failed(self, what: str, exc: BaseException, retry: str) -> None:
        now = self._trouble.note(exc)
        self._trouble.kafka_failing_since_ms = self._trouble.kafka_failing_since_ms or now
        log.warning(
            "sink could not %s Kafka (%s: %s); retrying %s", what, type(exc).__name__, exc, retry
        )

    def _kafka_ok(self) -> None:
        self._trouble.kafka_failing_since_ms = None

    async def _sync_alert(self) -> None:
        """Publish the alert once writes have failed for ``sink_alert_after_s``, and its
        resolution once they succeed; a publish that fails is tried again later."""
        trouble, threshold_s = self._trouble, self.settings.sink_alert_after_s
        since = trouble.failing_since_ms
        failing_s = 0.0 if since is None else (_now_ms() - since) / 1000
        firing = since is not None and failing_s >= threshold_s
        if firing == trouble.alert_firing or time.monotonic() < trouble.alert_retry_at:
            return
        state = "firing" if firing else "resolved"
        message = (
            f"warehouse writes failing for {failing_s:.0f} s: {trouble.last_error}"
            if firing
            else "warehouse writes succeed again"
        )
        event = ControlEvent.new(
            f"{self.settings.app_id}-sink",
            "alert",
            reason=message,
            details={
                "rule": ALERT_RULE,
                "state": state,
                "metric": "sink_failing_s",
                "value": failing_s,
                "threshold": threshold_s,
            },
        )
        try:
            await self._announce(event)
        except Exception as exc:  # Kafka may be down too: try again later, keep writing
            trouble.alert_retry_at = time.monotonic() + 5.0
            log.warning("could not publish the sink alert (%s), will retry: %s", state, exc)
            return
        trouble.alert_firing = firing
        log.log(logging.WARNING if firing else logging.INFO, "sink alert %s: %s", state, message)

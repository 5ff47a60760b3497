"""The warehouse sink: pipeline topics -> ClickHouse in batches, offsets committed after.

A plain aiokafka consumer group (``<app_id>-sink``) reads the predictions, labels,
metrics and dead-letter topics, buffers rows per table, and writes a batch when it
reaches ``max_rows`` or ``flush_interval_ms``. Offsets are committed only after the
rows are written, so a crash re-delivers instead of losing; ReplacingMergeTree keys
collapse the re-delivered rows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from streamml.config import Settings
from streamml.errors import WarehouseError
from streamml.schemas.spec import PipelineSpec
from streamml.streams.topics import CONTROL_TOPIC, loads, pipeline_topics
from streamml.streams.warehouse import Warehouse

log = logging.getLogger("streamml.sink")

PREDICTION_COLUMNS = [
    "pipeline",
    "event_id",
    "entity_key",
    "ts",
    "model_name",
    "model_version",
    "role",
    "served",
    "score",
    "predicted_class",
    "probabilities",
    "latency_ms",
    "e2e_latency_ms",
    "trace_id",
]
LABEL_COLUMNS = ["pipeline", "event_id", "entity_key", "ts", "label", "label_value"]
METRIC_COLUMNS = [
    "pipeline",
    "model_version",
    "role",
    "metric",
    "window_start",
    "source_partition",
    "value",
    "n",
]
DLQ_COLUMNS = [
    "pipeline",
    "topic",
    "partition",
    "offset",
    "ts",
    "error_class",
    "reason",
    "payload",
    "key",
]
FEATURE_COLUMNS = ["pipeline", "event_id", "entity_key", "ts", "features"]
AUDIT_COLUMNS = [
    "pipeline",
    "event_id",
    "ts",
    "action",
    "version",
    "previous",
    "reason",
    "actor",
    "details",
]
MODEL_COLUMNS = [
    "pipeline",
    "model_name",
    "version",
    "stage",
    "kind",
    "artifact_uri",
    "sha256",
    "spec_hash",
    "features",
    "train_start",
    "train_end",
    "metrics",
    "parent_version",
    "traffic_share",
    "created_at",
    "updated_at",
    "mode",
    "task",
    "classes",
    "train_rows",
    "params",
]
DRIFT_COLUMNS = [
    "pipeline",
    "model_version",
    "detector",
    "kind",
    "target",
    "statistic",
    "threshold",
    "window_size",
    "ts",
    "drift_id",
    "details",
]
ALERT_COLUMNS = [
    "pipeline",
    "event_id",
    "ts",
    "rule",
    "state",
    "metric",
    "value",
    "threshold",
    "message",
]
COLUMNS = {
    "drift_events": DRIFT_COLUMNS,
    "alerts": ALERT_COLUMNS,
    "features": FEATURE_COLUMNS,
    "audit_events": AUDIT_COLUMNS,
    "model_versions": MODEL_COLUMNS,
    "predictions": PREDICTION_COLUMNS,
    "labels": LABEL_COLUMNS,
    "metrics": METRIC_COLUMNS,
    "dead_letters": DLQ_COLUMNS,
}


def _ts(ms: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _label_value(label: Any) -> float:
    if isinstance(label, bool):
        return 1.0 if label else 0.0
    if isinstance(label, int | float):
        return float(label)
    return 0.0


def prediction_row(v: dict[str, Any]) -> tuple[Any, ...]:
    return (
        v["pipeline"],
        v["event_id"],
        v.get("entity_key", ""),
        _ts(v["ts_ms"]),
        v["model_name"],
        v["model_version"],
        v["role"],
        1 if v.get("served", True) else 0,
        float(v["score"]),
        str(v.get("predicted_class", "")),
        {str(k): float(p) for k, p in (v.get("probabilities") or {}).items()},
        float(v.get("latency_ms", 0.0)),
        float(v["emitted_ms"] - v["ingest_ms"]) if v.get("ingest_ms") else 0.0,
        v.get("trace_id", ""),
    )


def label_row(
    pipeline: str, label_field: str, v: dict[str, Any], fallback_ms: int
) -> tuple[Any, ...]:
    label = v[label_field] if label_field in v else v["label"]
    return (
        pipeline,
        str(v["event_id"]),
        str(v.get("entity_key", "")),
        _ts(v.get("ts_ms") or fallback_ms),
        str(label),
        _label_value(label),
    )


def metric_row(v: dict[str, Any]) -> tuple[Any, ...]:
    return (
        v["pipeline"],
        v["model_version"],
        v["role"],
        v["metric"],
        _ts(v["window_start_ms"]).replace(microsecond=0),
        int(v.get("partition", 0)),
        float(v["value"]),
        int(v["n"]),
    )


def dlq_row(v: dict[str, Any]) -> tuple[Any, ...]:
    return (
        v["pipeline"],
        v["topic"],
        int(v["partition"]),
        int(v["offset"]),
        _ts(v["ts_ms"]),
        v["error_class"],
        v["reason"],
        v["payload"],
        v.get("key", ""),
    )


def feature_row(pipeline: str, v: dict[str, Any]) -> tuple[Any, ...]:
    return (
        pipeline,
        str(v["event_id"]),
        str(v.get("entity_key", "")),
        _ts(v["ts_ms"]),
        {str(k): float(x) for k, x in v["features"].items()},
    )


def _when(value: Any) -> dt.datetime | None:
    """A registry timestamp (ISO text or epoch ms) as a UTC datetime."""
    if value in (None, ""):
        return None
    if isinstance(value, int | float):
        return _ts(value)
    moment = dt.datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def control_rows(v: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """An event of streamml.control -> its audit row, and its model_versions row if any."""
    rows: list[tuple[str, tuple[Any, ...]]] = [
        (
            "audit_events",
            (
                v["pipeline"],
                v["event_id"],
                _ts(v["ts_ms"]),
                v["action"],
                v.get("version", ""),
                v.get("previous", ""),
                v.get("reason", ""),
                v.get("actor", ""),
                json.dumps(v.get("details") or {}, sort_keys=True, default=str),
            ),
        )
    ]
    details = v.get("details") or {}
    if v["action"] == "drift_detected":
        rows.append(
            (
                "drift_events",
                (
                    v["pipeline"],
                    v.get("version", ""),
                    str(details.get("detector", "")),
                    str(details.get("kind", "")),
                    str(details.get("target", "")),
                    float(details.get("statistic", 0.0)),
                    float(details.get("threshold", 0.0)),
                    int(details.get("window", 0)),
                    _ts(v["ts_ms"]),
                    v["event_id"],
                    json.dumps(details, sort_keys=True, default=str),
                ),
            )
        )
    elif v["action"] == "alert":
        rows.append(
            (
                "alerts",
                (
                    v["pipeline"],
                    v["event_id"],
                    _ts(v["ts_ms"]),
                    str(details.get("rule", "")),
                    str(details.get("state", "")),
                    str(details.get("metric", "")),
                    float(details.get("value", 0.0)),
                    float(details.get("threshold", 0.0)),
                    v.get("reason", ""),
                ),
            )
        )
    model = v.get("model")
    if model:
        row = dict(model)
        for key in ("train_start", "train_end", "created_at", "updated_at"):
            row[key] = _when(row.get(key))
        row["updated_at"] = row["updated_at"] or _ts(v["ts_ms"])
        rows.append(("model_versions", tuple(row.get(c) for c in MODEL_COLUMNS)))
    return rows


Route = Callable[[ConsumerRecord[bytes, bytes]], list[tuple[str, tuple[Any, ...]]]]


def _one(table: str, to_row: Callable[[dict[str, Any]], tuple[Any, ...]]) -> tuple[str, Route]:
    return table, lambda r: [(table, to_row(loads(r.value)))]


def _label_parser(pipeline: str, label_field: str) -> Route:
    def parse(record: ConsumerRecord[bytes, bytes]) -> list[tuple[str, tuple[Any, ...]]]:
        return [("labels", label_row(pipeline, label_field, loads(record.value), record.timestamp))]

    return parse


@dataclass
class SinkStats:
    written: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    flushes: int = 0
    failed_flushes: int = 0
    bad_messages: int = 0
    last_flush_ms: float = 0.0


class WarehouseSink:
    """Consumes the pipelines' output topics and writes them to the warehouse."""

    def __init__(
        self,
        settings: Settings,
        specs: Sequence[PipelineSpec],
        warehouse: Warehouse,
        max_rows: int = 10_000,
        flush_interval_ms: int = 1000,
    ) -> None:
        self.settings = settings
        self.warehouse = warehouse
        self.max_rows = max_rows
        self.flush_interval_ms = flush_interval_ms
        self.stats = SinkStats()
        # topic -> what it is called in logs, and its record -> [(table, row), ...]
        self._routes: dict[str, tuple[str, Route]] = {
            CONTROL_TOPIC: ("control", lambda r: control_rows(loads(r.value)))
        }
        for spec in specs:
            topics = pipeline_topics(spec)
            self._routes[topics["predictions"]] = _one("predictions", prediction_row)
            self._routes[topics["labels"]] = (
                "labels",
                _label_parser(spec.name, spec.label.field),
            )
            self._routes[topics["metrics"]] = _one("metrics", metric_row)
            self._routes[topics["dlq"]] = _one("dead_letters", dlq_row)
            self._routes[topics["features"]] = _one(
                "features", functools.partial(feature_row, spec.name)
            )
        self._stopping = asyncio.Event()

    @property
    def topics(self) -> list[str]:
        return sorted(self._routes)

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            *self.topics,
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=f"{self.settings.app_id}-sink",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.max_rows,
            session_timeout_ms=int(self.settings.session_timeout_s * 1000),
            heartbeat_interval_ms=int(self.settings.heartbeat_interval_s * 1000),
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        buffers: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        offsets: dict[TopicPartition, int] = {}
        deadline = time.monotonic() + self.flush_interval_ms / 1000
        try:
            while not self._stopping.is_set():
                left_ms = max(1, int((deadline - time.monotonic()) * 1000))
                batch = await consumer.getmany(
                    timeout_ms=min(left_ms, 200), max_records=self.max_rows
                )
                for tp, records in batch.items():
                    for record in records:
                        what, to_rows = self._routes[record.topic]
                        try:
                            for table, row in to_rows(record):
                                buffers[table].append(row)
                        except (ValueError, KeyError, TypeError) as exc:
                            self.stats.bad_messages += 1
                            log.warning(
                                "skipping malformed %s record at %s@%d: %s",
                                what,
                                tp,
                                record.offset,
                                exc,
                            )
                        offsets[tp] = record.offset + 1
                pending = sum(len(b) for b in buffers.values())
                if offsets and (pending >= self.max_rows or time.monotonic() >= deadline):
                    await self._flush_until_written(buffers)
                    await consumer.commit(dict(offsets))
                    offsets.clear()
                if time.monotonic() >= deadline:
                    deadline = time.monotonic() + self.flush_interval_ms / 1000
        finally:
            if offsets:
                try:
                    await self._flush(buffers)
                    await consumer.commit(dict(offsets))
                except Exception:  # the rows will be re-delivered to the next sink
                    log.exception("final flush failed; uncommitted rows will be re-delivered")
            await consumer.stop()

    def stop(self) -> None:
        self._stopping.set()

    async def _flush_until_written(self, buffers: dict[str, list[tuple[Any, ...]]]) -> None:
        """Retry a failed write (server restart, disk full) instead of dropping the batch;
        nothing is committed meanwhile, so a crash here re-delivers rather than loses."""
        delay_s = 0.5
        while True:
            try:
                await self._flush(buffers)
                return
            except WarehouseError as exc:
                self.stats.failed_flushes += 1
                log.error("warehouse write failed, retrying in %.1f s: %s", delay_s, exc)
                if self._stopping.is_set():
                    raise
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 30.0)

    async def _flush(self, buffers: dict[str, list[tuple[Any, ...]]]) -> None:
        t0 = time.perf_counter()
        for table, rows in list(buffers.items()):
            if rows:
                await asyncio.to_thread(self.warehouse.insert, table, rows, COLUMNS[table])
                self.stats.written[table] += len(rows)
                del buffers[table]  # written: a retry must not write it again
        self.stats.flushes += 1
        self.stats.last_flush_ms = (time.perf_counter() - t0) * 1000

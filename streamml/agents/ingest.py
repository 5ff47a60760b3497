"""validate + featurize: ``<p>.raw`` -> ``<p>.features`` (valid) or ``<p>.dlq`` (invalid).

One agent does both steps of the flow, so a record costs one Kafka hop, not two. Window
state lives in a table keyed by entity (raw records are keyed by entity, so the table
is partitioned like the topic) and running statistics in a table keyed by partition.
"""

from __future__ import annotations

import time
from typing import Any

import faust

from streamml import telemetry
from streamml.agents.runtime import PipelineRuntime, run_step
from streamml.schemas.records import DeadLetter, Source, validate
from streamml.streams.topics import dumps, table_name

STATS_SNAPSHOT_EVERY = 200


def register(app: faust.App, rt: PipelineRuntime) -> None:
    name = rt.name
    raw = app.topic(
        rt.topics["raw"],
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
        key_serializer="raw",
    )
    dlq = app.topic(rt.topics["dlq"], value_serializer="raw", key_serializer="raw")
    features = app.topic(rt.topics["features"], value_serializer="raw", key_serializer="raw")
    entities = app.Table(table_name(name, "windows"), default=dict, partitions=rt.partitions)
    stats = app.Table(table_name(name, "featstats"), default=dict, partitions=rt.partitions)

    @app.agent(raw, name=f"{name}.ingest")
    async def ingest(stream: faust.StreamT[Any]) -> None:
        await run_step(stream, rt, "ingest", handle)

    async def handle(message: Any) -> str:
        source = Source(
            message.topic,
            message.partition,
            message.offset,
            int((message.timestamp or time.time()) * 1000),
            message.key,
        )
        result = validate(rt.spec, message.value or b"", source)
        if isinstance(result, DeadLetter):
            rt.counters["dead_letters"] += 1
            rt.counters[f"dead_letters.{result.error_class}"] += 1
            await dlq.send(
                key=message.key,
                value=result.to_json(name),
                partition=message.partition,
                headers=telemetry.inject(),
            )
            return "dead_letter"
        partition = message.partition
        state = rt.feature_state(partition, lambda: stats.get(str(partition)))
        entity_key = result.entity_key or result.event_id
        window_state: dict[str, Any] = (
            dict(entities[entity_key]) if rt.featurizer.needs_entity_state else {}
        )
        vector = rt.featurizer.transform(result, state, window_state)
        if rt.featurizer.needs_entity_state:
            entities[entity_key] = window_state
        rt.counters["featurized"] += 1
        await features.send(
            key=message.key if message.key is not None else result.event_id.encode(),
            partition=partition,  # co-partitioned by construction, whatever the key
            value=dumps(
                {
                    "event_id": result.event_id,
                    "ts_ms": result.ts_ms,
                    "entity_key": result.entity_key,
                    "ingest_ms": source.timestamp_ms,
                    "features": vector,
                }
            ),
            headers=telemetry.inject(),
        )
        if rt.counters["featurized"] % STATS_SNAPSHOT_EVERY == 0:
            stats[str(partition)] = state.data
        return "ok"

"""validate + featurize: a ``<p>.raw`` record -> a feature vector, or ``<p>.dlq``.

A bad record becomes a dead letter with the original bytes, an error class, a reason and
its source partition/offset; it never stops the worker. A good one updates its entity's
windows and the partition's running statistics (both logged to the state changelog by
the engine at the end of the batch) and goes on to scoring in the same pass.
"""

from __future__ import annotations

from typing import Any

from aiokafka import ConsumerRecord

from streamml.agents.runtime import PartitionState, PipelineRuntime
from streamml.schemas.records import DLQ_KEY_BYTES, DeadLetter, Record, Source, validate
from streamml.streams.outbox import Headers, Outbox


def ingest(
    rt: PipelineRuntime,
    state: PartitionState,
    message: ConsumerRecord[bytes, bytes],
    headers: Headers,
    out: Outbox,
) -> tuple[Record, dict[str, float]] | None:
    """Validate and featurize one raw record; ``None`` when it went to the dead letters."""
    source = Source(
        message.topic, message.partition, message.offset, message.timestamp, message.key
    )
    result = validate(rt.spec, message.value or b"", source)
    if isinstance(result, DeadLetter):
        rt.counters["dead_letters"] += 1
        rt.counters[f"dead_letters.{result.error_class}"] += 1
        key = message.key[:DLQ_KEY_BYTES] if message.key is not None else None  # must fit
        out.add(rt.topics["dlq"], message.partition, key, result.to_json(rt.name), headers)
        return None
    window: dict[str, Any] = {}
    if rt.featurizer.needs_entity_state:
        entity = result.entity_key or result.event_id
        window = state.windows.get(entity) or {}
        state.windows[entity] = window
        state.dirty_windows.add(entity)
    vector = rt.featurizer.transform(result, state.stats, window)
    state.stats_dirty = True
    rt.counters["featurized"] += 1
    return result, vector

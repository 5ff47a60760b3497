"""validate + featurize: a ``<p>.raw`` record -> a feature vector, or ``<p>.dlq``.

A bad record becomes a dead letter with the original bytes, an error class, a reason and
its source partition/offset; it never stops the worker. A good one updates its entity's
windows and the partition's running statistics (both logged to the state changelog by
the engine at the end of the batch) and goes on to scoring in the same pass.

The spec's pii fields are protected right after validation (``rt.pii``): every later
step sees only the protected record. Every dead letter is protected on its way out
(payload, key and reason), and a failing step is logged without the exception's text.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from aiokafka import ConsumerRecord

from streamml.agents.runtime import PartitionState, PipelineRuntime
from streamml.schemas.records import DLQ_KEY_BYTES, DeadLetter, Record, Source, validate
from streamml.streams.outbox import Headers, Outbox

log = logging.getLogger("streamml.engine")


def source_of(message: ConsumerRecord[bytes, bytes]) -> Source:
    return Source(message.topic, message.partition, message.offset, message.timestamp, message.key)


def failed(
    rt: PipelineRuntime,
    message: ConsumerRecord[bytes, bytes],
    step: str,
    exc: BaseException,
    out: Outbox,
    headers: Headers = (),
) -> None:
    """A record whose step raised: a dead letter naming the step and the exception, so the
    worker goes on (and the record is not lost)."""
    error_class = f"{step}_failed"
    if rt.counters[f"dead_letters.{error_class}"] == 0:  # the first one with its traceback
        if rt.pii.active:  # the exception's text may quote a record's value: frames only
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error(
                "%s: %s failed on a record with %s (its message is not logged: the spec has "
                "pii fields; more are counted, not logged)\n%s",
                rt.name,
                step,
                type(exc).__name__,
                frames,
            )
        else:
            log.exception("%s: %s failed on a record (more are counted, not logged)", rt.name, step)
    reason = f"{step} raised {type(exc).__name__}: {exc}"
    letter = DeadLetter(error_class, reason, message.value or b"", source_of(message))
    dead_letter(rt, letter, message.partition, headers, out)


def dead_letter(
    rt: PipelineRuntime, letter: DeadLetter, partition: int, headers: Headers, out: Outbox
) -> None:
    """Send a dead letter to ``<p>.dlq`` (it always fits: see DeadLetter.to_json), with
    the spec's pii fields protected in its payload, key and reason."""
    letter = rt.pii.letter(letter)
    rt.counters["dead_letters"] += 1
    rt.counters[f"dead_letters.{letter.error_class}"] += 1
    rt.failures[letter.error_class] += 1  # the engine's circuit breaker reads them
    key = letter.source.key[:DLQ_KEY_BYTES] if letter.source.key is not None else None
    out.add(rt.topics["dlq"], partition, key, letter.to_json(rt.name), headers)


def ingest(
    rt: PipelineRuntime,
    state: PartitionState,
    message: ConsumerRecord[bytes, bytes],
    headers: Headers,
    out: Outbox,
) -> tuple[Record, dict[str, float]] | None:
    """Validate and featurize one raw record; ``None`` when it went to the dead letters."""
    result = validate(rt.spec, message.value or b"", source_of(message))
    if isinstance(result, DeadLetter):
        dead_letter(rt, result, message.partition, headers, out)
        return None
    result = rt.pii.record(result)
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

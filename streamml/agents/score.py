"""score: a feature vector -> ``<p>.features`` and ``<p>.predictions``.

The partition's online model scores the vector. The features are kept, keyed by
event_id, until the label arrives (or their TTL passes) for the learn step; a label that
came first is learned at once.
"""

from __future__ import annotations

import time

from aiokafka import ConsumerRecord

from streamml.agents.learn import learn_one
from streamml.agents.runtime import EARLY, JOIN, PartitionState, PipelineRuntime
from streamml.schemas.records import Record
from streamml.streams.outbox import Headers, Outbox
from streamml.streams.topics import dumps


def score(
    rt: PipelineRuntime,
    state: PartitionState,
    message: ConsumerRecord[bytes, bytes],
    record: Record,
    vector: dict[str, float],
    headers: Headers,
    trace_id: str,
    out: Outbox,
) -> None:
    partition = message.partition
    key = message.key if message.key is not None else record.event_id.encode()
    now_ms = int(time.time() * 1000)
    features = dumps(
        {
            "event_id": record.event_id,
            "ts_ms": record.ts_ms,
            "entity_key": record.entity_key,
            "ingest_ms": message.timestamp,
            "features": vector,
        }
    )
    out.add(rt.topics["features"], partition, key, features, headers)
    learner = state.learner
    t0 = time.perf_counter()
    prediction = learner.predict(vector)
    latency_ms = (time.perf_counter() - t0) * 1000
    event_id = record.event_id
    waiting = state.early.pop(event_id, None)
    if waiting is not None:  # its label came first: learn now
        rt.counters["labels_early_matched"] += 1
        out.add(rt.topics["state"], partition, EARLY + event_id.encode(), None)
        learn_one(rt, state, vector, waiting[1], out)
    else:
        state.joins[event_id] = (now_ms, vector)
        out.add(rt.topics["state"], partition, JOIN + event_id.encode(), features)
    rt.counters["scored"] += 1
    out.add(
        rt.topics["predictions"],
        partition,
        key,
        dumps(
            {
                "pipeline": rt.name,
                "event_id": event_id,
                "entity_key": record.entity_key,
                "ts_ms": record.ts_ms,
                "ingest_ms": message.timestamp,
                "model_name": rt.spec.online_model.kind,
                "model_version": learner.version,
                "role": "champion",
                "served": True,
                "score": prediction.score,
                "predicted_class": prediction.predicted_class,
                "probabilities": prediction.probabilities,
                "latency_ms": latency_ms,
                "emitted_ms": now_ms,
                "trace_id": trace_id,
            }
        ),
        headers,
    )

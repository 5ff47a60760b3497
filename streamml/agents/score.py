"""score: the feature vectors of a batch -> ``<p>.features`` and ``<p>.predictions``.

Every model of the deployment scores the whole batch at once (one onnxruntime call per
batch model): the champion's prediction answers, unless the entity is routed to a canary;
shadow challengers are logged with ``served = false``. The features of each event are
kept, keyed by event_id, until its label arrives (or their TTL passes) for the learn step;
a label that came first is learned at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord

from streamml.agents.learn import learn_one
from streamml.agents.runtime import EARLY, JOIN, PartitionState, PipelineRuntime
from streamml.models.online import Prediction
from streamml.models.serving import Deployment, Slot
from streamml.schemas.records import Record
from streamml.streams.outbox import Headers, Outbox
from streamml.streams.topics import dumps


@dataclass
class Scored:
    """One featurized event waiting for its predictions."""

    message: ConsumerRecord[bytes, bytes]
    record: Record
    vector: dict[str, float]
    headers: Headers
    trace_id: str


def predict(
    slot: Slot, state: PartitionState, vectors: Sequence[dict[str, float]]
) -> list[Prediction]:
    if slot.scorer is not None:
        return slot.scorer.predict_many(vectors)
    return [state.learner.predict(v) for v in vectors]


def score_batch(
    rt: PipelineRuntime,
    state: PartitionState,
    items: Sequence[Scored],
    deployment: Deployment,
    out: Outbox,
) -> None:
    if not items:
        return
    vectors = [it.vector for it in items]
    runs: list[tuple[Slot, list[Prediction], float]] = []
    for slot in (deployment.champion, *deployment.challengers):
        t0 = time.perf_counter()
        predictions = predict(slot, state, vectors)
        runs.append((slot, predictions, (time.perf_counter() - t0) * 1000 / len(items)))
    any_canary = any(s.role == "canary" for s in deployment.challengers)
    topics = rt.topics
    partition = state.partition
    now_ms = int(time.time() * 1000)
    monitor = state.monitor
    for i, it in enumerate(items):
        record, message = it.record, it.message
        key = message.key if message.key is not None else record.event_id.encode()
        features = dumps(
            {
                "event_id": record.event_id,
                "ts_ms": record.ts_ms,
                "entity_key": record.entity_key,
                "ingest_ms": message.timestamp,
                "features": it.vector,
            }
        )
        out.add(topics["features"], partition, key, features, it.headers)
        canary = deployment.canary_for(record.entity_key) if any_canary else None
        if monitor is not None:  # data and prediction drift, on what was served
            found = monitor.observe_features(it.vector)
            served_score = runs[0][1][i].score if canary is None else None
            if served_score is not None:
                found += monitor.observe_score(served_score)
            state.detections.extend((d, record.ts_ms) for d in found)
        for slot, predictions, latency_ms in runs:
            if slot.role == "canary" and slot is not canary:
                continue
            served = slot is canary if canary is not None else slot.role == "champion"
            value = _prediction(rt, it, slot, predictions[i], served, latency_ms, now_ms)
            out.add(topics["predictions"], partition, key, value, it.headers)
        event_id = record.event_id
        waiting = state.early.pop(event_id, None)
        if waiting is not None:  # its label came first: learn now
            rt.counters["labels_early_matched"] += 1
            out.add(topics["state"], partition, EARLY + event_id.encode(), None)
            learn_one(rt, state, it.vector, waiting[1], deployment, out, record.ts_ms)
        else:
            state.joins[event_id] = (now_ms, it.vector, record.ts_ms)
            out.add(topics["state"], partition, JOIN + event_id.encode(), features)
    rt.counters["scored"] += len(items)


def _prediction(
    rt: PipelineRuntime,
    it: Scored,
    slot: Slot,
    prediction: Prediction,
    served: bool,
    latency_ms: float,
    now_ms: int,
) -> bytes:
    value: dict[str, Any] = {
        "pipeline": rt.name,
        "event_id": it.record.event_id,
        "entity_key": it.record.entity_key,
        "ts_ms": it.record.ts_ms,
        "ingest_ms": it.message.timestamp,
        "model_name": slot.name,
        "model_version": slot.version,
        "role": slot.role,
        "served": served,
        "score": prediction.score,
        "predicted_class": prediction.predicted_class,
        "probabilities": prediction.probabilities,
        "latency_ms": latency_ms,
        "emitted_ms": now_ms,
        "trace_id": it.trace_id,
    }
    return dumps(value)

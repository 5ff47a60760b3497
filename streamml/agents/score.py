"""score: feature vectors -> ``<p>.features`` and ``<p>.predictions``, in event order.

Batch (ONNX) models do not learn from labels, so each scores a partition's whole batch
at once (:func:`batch_outputs`, one onnxruntime call). The online model does learn, so it
predicts each event when the engine reaches it in produced order (:func:`serve`), after
every label produced before the event and before every label produced after it: the
prediction a live stream would have served. The champion's prediction answers, unless the
entity is routed to a canary; shadow challengers are logged with ``served = false``.

Every model's prediction is kept with the event's features, keyed by event_id, until its
label arrives (or their TTL passes): the learn step scores those predictions, the ones
that were made when the event arrived. A label that came first is learned at once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import ConsumerRecord

from streamml.agents.learn import learn_one
from streamml.agents.runtime import EARLY, JOIN, Made, PartitionState, PipelineRuntime
from streamml.models.online import Prediction
from streamml.models.serving import Deployment, Slot
from streamml.schemas.records import Record
from streamml.streams.outbox import Headers, Outbox
from streamml.streams.topics import dumps

# version -> (one prediction per item of the batch, scoring time per item in ms)
BatchOutputs = dict[str, tuple[list[Prediction], float]]


@dataclass
class Scored:
    """One featurized event waiting for its predictions."""

    message: ConsumerRecord[bytes, bytes]
    record: Record
    vector: dict[str, float]
    headers: Headers
    trace_id: str
    weak: tuple[str, float] | None = None  # the weak label (class, confidence), if any


LABELLER_ROLE = "labeller"


def labeller_made(source: str, weak: tuple[str, float]) -> Made:
    """The weak label as one more model's prediction of the event (role ``labeller``,
    never served), so the learn step scores it against the true label like any model."""
    label, confidence = weak
    return Made(source, LABELLER_ROLE, False, Prediction(confidence, label, {}))


def batch_outputs(deployment: Deployment, items: Sequence[Scored]) -> BatchOutputs:
    """Every batch model of the deployment on every item, one call per model."""
    found: BatchOutputs = {}
    if not items:
        return found
    vectors = [it.vector for it in items]
    for slot in deployment.batch_slots:
        assert slot.scorer is not None
        t0 = time.perf_counter()
        predictions = slot.scorer.predict_many(vectors)
        found[slot.version] = (predictions, (time.perf_counter() - t0) * 1000 / len(items))
    return found


def serve(
    rt: PipelineRuntime,
    state: PartitionState,
    it: Scored,
    index: int,
    batch: BatchOutputs,
    deployment: Deployment,
    out: Outbox,
) -> list[Made]:
    """Predict one event with every deployed model, log the predictions and the features,
    and keep what each model predicted (and the weak label) until the label comes; return
    what was made."""
    record, message = it.record, it.message
    topics, partition = rt.topics, state.partition
    # the entity key (protected when it is pii), never the raw record's key, which may
    # carry it in clear; partitions are explicit, so the key does not place the record
    key = (record.entity_key or record.event_id).encode()
    now_ms = int(time.time() * 1000)
    features = {
        "event_id": record.event_id,
        "ts_ms": record.ts_ms,
        "entity_key": record.entity_key,
        "ingest_ms": message.timestamp,
        "features": it.vector,
    }
    out.add(topics["features"], partition, key, dumps(features), it.headers)
    canary = deployment.canary_for(record.entity_key) if deployment.has_canary else None
    made: list[Made] = []
    for slot in (deployment.champion, *deployment.challengers):
        if slot.role == "canary" and slot is not canary:
            continue
        if slot.scorer is not None:
            predictions, latency_ms = batch[slot.version]
            prediction = predictions[index]
        else:
            learner = rt.online(state, slot.version)
            if learner is None:  # a fresh model this partition has not started (yet)
                continue
            t0 = time.perf_counter()
            prediction = learner.predict(it.vector)
            latency_ms = (time.perf_counter() - t0) * 1000
        served = slot is canary if canary is not None else slot.role == "champion"
        made.append(Made(slot.version, slot.role, served, prediction))
        value = _prediction(rt, it, slot, prediction, served, latency_ms, now_ms)
        out.add(topics["predictions"], partition, key, value, it.headers)
    if it.weak is not None and rt.labeller_source:
        made.append(labeller_made(rt.labeller_source, it.weak))
    monitor = state.monitor
    if monitor is not None:  # data and prediction drift, on what was served
        found = monitor.observe_features(it.vector)
        if canary is None:
            found += monitor.observe_score(made[0].prediction.score)
        state.detections.extend((d, record.ts_ms, None) for d in found)
    event_id = record.event_id
    waiting = state.early.pop(event_id, None)
    if waiting is not None:  # its label came first: learn now, from what was just served
        rt.counters["labels_early_matched"] += 1
        out.add(topics["state"], partition, EARLY + event_id.encode(), None)
        learn_one(rt, state, it.vector, waiting[1], made, out, record.ts_ms)
    else:
        state.joins[event_id] = (now_ms, it.vector, record.ts_ms, made)
        features["predictions"] = [m.to_json() for m in made]
        out.add(topics["state"], partition, JOIN + event_id.encode(), dumps(features))
    rt.counters["scored"] += 1
    return made


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

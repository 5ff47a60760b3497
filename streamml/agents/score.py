"""score: ``<p>.features`` -> ``<p>.predictions`` with the partition's online model.

The features of each scored event are kept, keyed by event_id, until its label
arrives (or their TTL passes), for the learn step.
"""

from __future__ import annotations

import time
from typing import Any

import faust
from faust.types import TableT

from streamml import telemetry
from streamml.agents.learn import LearnHook
from streamml.agents.runtime import PipelineRuntime, run_step
from streamml.streams.topics import dumps, loads


def register(
    app: faust.App,
    rt: PipelineRuntime,
    joins: TableT[str, Any],
    models: TableT[str, Any],
    early: TableT[str, Any],
    learn_one: LearnHook,
) -> None:
    name = rt.name
    features = app.topic(rt.topics["features"], value_serializer="raw", key_serializer="raw")
    predictions = app.topic(rt.topics["predictions"], value_serializer="raw", key_serializer="raw")

    @app.agent(features, name=f"{name}.score")
    async def score(stream: faust.StreamT[Any]) -> None:
        await run_step(stream, rt, "score", handle)

    async def handle(message: Any) -> str | None:
        record = loads(message.value)
        partition = message.partition
        learner = rt.learner(partition, lambda: models.get(str(partition)))
        t0 = time.perf_counter()
        prediction = learner.predict(record["features"])
        latency_ms = (time.perf_counter() - t0) * 1000
        stored = {
            "features": record["features"],
            "ts_ms": record["ts_ms"],
            "stored_ms": int(time.time() * 1000),
        }
        key = record["event_id"]
        # not .get(): a faust table's get() returns the default, not None
        waiting = early[key] if key in early else None  # noqa: SIM401
        if waiting is not None:  # its label came first: learn now
            del early[key]
            rt.counters["labels_early_matched"] += 1
            await learn_one(partition, record["event_id"], waiting["label"], stored)
        else:
            joins[key] = stored
        rt.counters["scored"] += 1
        await predictions.send(
            key=message.key,
            partition=partition,
            value=dumps(
                {
                    "pipeline": name,
                    "event_id": record["event_id"],
                    "entity_key": record["entity_key"],
                    "ts_ms": record["ts_ms"],
                    "ingest_ms": record.get("ingest_ms"),
                    "model_name": rt.spec.online_model.kind,
                    "model_version": learner.version,
                    "role": "champion",
                    "served": True,
                    "score": prediction.score,
                    "predicted_class": prediction.predicted_class,
                    "probabilities": prediction.probabilities,
                    "latency_ms": latency_ms,
                    "emitted_ms": int(time.time() * 1000),
                    "trace_id": telemetry.trace_id(),
                }
            ),
            headers=telemetry.inject(),
        )
        return "ok"

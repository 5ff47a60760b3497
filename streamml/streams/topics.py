"""Topic names and record codecs of a pipeline (the wire format users produce and consume)."""

from __future__ import annotations

from typing import Any

import orjson

from streamml.schemas.spec import PipelineSpec

CONTROL_TOPIC = "streamml.control"


def pipeline_topics(spec: PipelineSpec) -> dict[str, str]:
    """Role -> topic name; ``metrics`` carries per-minute prequential metrics to the sink."""
    return {**spec.topics_by_role, "metrics": spec.topic("metrics")}


def dumps(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def loads(payload: bytes) -> Any:
    return orjson.loads(payload)


def state_topic(app_id: str, spec: PipelineSpec) -> str:
    """The compacted changelog of a pipeline's per-partition state (windows, statistics,
    online model, pending joins), partitioned like its raw topic."""
    return f"{app_id}-{spec.name}-state"

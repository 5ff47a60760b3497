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


# Faust tables of a pipeline; their changelog topics are created up front with the
# pipeline's partition count (a worker must not discover them half-way).
TABLES = ("windows", "featstats", "joins", "online-model", "early-labels")


def table_name(pipeline: str, table: str) -> str:
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}")
    return f"{pipeline}-{table}"


def changelog_topics(app_id: str, spec: PipelineSpec) -> list[str]:
    return [f"{app_id}-{table_name(spec.name, t)}-changelog" for t in TABLES]

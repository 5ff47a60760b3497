"""Kafka records -> ClickHouse rows: the columns of each table the sink writes, and a
function per topic that makes a record's row (pure; the sink in :mod:`streams.sink` does
the I/O). A function raises ``ValueError``/``KeyError``/``TypeError`` on a record that
is no row; the sink makes that a dead letter."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from streamml.schemas.records import DeadLetter, Label, Source
from streamml.streams.topics import loads

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
ANNOTATION_COLUMNS = [
    "pipeline",
    "event_id",
    "ts",
    "source",
    "model_version",
    "label",
    "confidence",
]
FLAG_COLUMNS = [
    "pipeline",
    "event_id",
    "ts",
    "model_version",
    "predicted_class",
    "served_confidence",
    "source",
    "weak_label",
    "weak_confidence",
    "judge",
    "judge_model",
]
SUMMARY_COLUMNS = ["pipeline", "event_id", "ts", "method", "model_version", "summary"]
COLUMNS = {
    "annotations": ANNOTATION_COLUMNS,
    "flags": FLAG_COLUMNS,
    "summaries": SUMMARY_COLUMNS,
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


def label_row(pipeline: str, label: Label, v: dict[str, Any], fallback_ms: int) -> tuple[Any, ...]:
    """A validated label (see :func:`validate_label`) and its record -> a ``labels`` row."""
    return (
        pipeline,
        label.event_id,
        str(v.get("entity_key", "")),
        _ts(v.get("ts_ms") or fallback_ms),
        str(label.value),
        _label_value(label.value),
    )


def dead_letter_row(
    pipeline: str, error_class: str, reason: str, payload: bytes, source: Source
) -> tuple[Any, ...]:
    """A ``dead_letters`` row made by the sink, cut to the limits the engine's dead letters
    keep (payload 64 KiB, key 1 KiB, reason 2000 characters)."""
    return dlq_row(loads(DeadLetter(error_class, reason, payload, source).to_json(pipeline)))


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


def annotation_rows(pipeline: str, v: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """A record of ``<p>.annotations``: a weak label, a flag or a summary (``kind``)."""
    kind, ts = v["kind"], _ts(v["ts_ms"])
    event_id = str(v["event_id"])
    row: tuple[Any, ...]
    if kind == "weak_label":
        row = (
            pipeline,
            event_id,
            ts,
            str(v["source"]),
            str(v["model_version"]),
            str(v["label"]),
            float(v["confidence"]),
        )
        return [("annotations", row)]
    if kind == "flag":
        row = (
            pipeline,
            event_id,
            ts,
            str(v["model_version"]),
            str(v["predicted_class"]),
            float(v["served_confidence"]),
            str(v["source"]),
            str(v["weak_label"]),
            float(v["weak_confidence"]),
            str(v.get("judge") or ""),
            str(v.get("judge_model") or ""),
        )
        return [("flags", row)]
    if kind == "summary":
        row = (
            pipeline,
            event_id,
            ts,
            str(v["method"]),
            str(v["model_version"]),
            str(v["summary"]),
        )
        return [("summaries", row)]
    raise ValueError(f"unknown annotation kind {kind!r}")


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

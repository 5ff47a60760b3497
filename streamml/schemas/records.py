"""Raw bytes -> a typed record, or a dead letter saying exactly what was wrong.

Derivation rules when the producer leaves them out (documented in docs/pipeline-spec.md):

* ``event_id`` missing -> ``"<topic>:<partition>:<offset>"`` of the raw record, so a
  re-delivered record gets the same id and collapses in ClickHouse.
* timestamp missing -> the Kafka record's timestamp (ms since the epoch).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import orjson

from streamml.schemas.spec import BOOLEAN_TEXT, FieldSpec, PipelineSpec


@dataclass(frozen=True)
class Source:
    """Where a raw record came from."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None = None


@dataclass(frozen=True)
class Record:
    """A valid raw record: identity, event time (ms), entity and typed fields."""

    event_id: str
    ts_ms: int
    entity_key: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class DeadLetter:
    """A rejected record: the original bytes, an error class, a reason and its source."""

    error_class: str
    reason: str
    payload: bytes
    source: Source

    def to_json(self, pipeline: str) -> bytes:
        """The dead letter as ``<p>.dlq`` carries it. It always fits the broker's message
        limit: a payload over :data:`DLQ_PAYLOAD_BYTES` or a key over :data:`DLQ_KEY_BYTES`
        is cut there, and the reason says so with the original size and sha256."""
        payload, cut_payload = _cut(self.payload, DLQ_PAYLOAD_BYTES)
        key, cut_key = _cut(self.source.key or b"", DLQ_KEY_BYTES)
        reason = self.reason[:DLQ_REASON_CHARS]
        for what, cut in (("payload", cut_payload), ("key", cut_key)):
            if cut:
                reason += f" [{what} truncated: {cut}]"
        return orjson.dumps(
            {
                "pipeline": pipeline,
                "error_class": self.error_class,
                "reason": reason,
                "payload": payload.decode("utf-8", errors="replace"),
                "topic": self.source.topic,
                "partition": self.source.partition,
                "offset": self.source.offset,
                "ts_ms": self.source.timestamp_ms,
                "key": key.decode("utf-8", errors="replace"),
            }
        )


DLQ_PAYLOAD_BYTES = 65_536  # of the original record kept in a dead letter
DLQ_KEY_BYTES = 1_024
DLQ_REASON_CHARS = 2_000


def _cut(data: bytes, limit: int) -> tuple[bytes, str]:
    """``data`` cut to ``limit`` bytes, and what was cut ("" when nothing was).

    >>> _cut(b"abc", 8)
    (b'abc', '')
    >>> kept, said = _cut(b"x" * 10, 4)
    >>> kept, said.split(",")[0]
    (b'xxxx', '10 bytes')
    """
    if len(data) <= limit:
        return data, ""
    digest = hashlib.sha256(data).hexdigest()
    return data[:limit], f"{len(data)} bytes, sha256 {digest}, first {limit} kept"


_INT_LIMIT = 2**63
_MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


class _Reject(Exception):
    def __init__(self, error_class: str, reason: str) -> None:
        super().__init__(reason)
        self.error_class = error_class
        self.reason = reason


def validate(spec: PipelineSpec, payload: bytes, source: Source) -> Record | DeadLetter:
    """Check ``payload`` against the spec's schema."""
    try:
        return _validate(spec, payload, source)
    except _Reject as rej:
        return DeadLetter(rej.error_class, rej.reason, payload, source)


def _validate(spec: PipelineSpec, payload: bytes, source: Source) -> Record:
    schema = spec.schema_
    if len(payload) > schema.max_record_bytes:
        raise _Reject(
            "oversize", f"{len(payload)} bytes > max_record_bytes {schema.max_record_bytes}"
        )
    data = _parse(payload)
    if not isinstance(data, dict):
        raise _Reject("not_an_object", f"expected a JSON object, got {type(data).__name__}")
    known = set(schema.fields) | {schema.event_id, schema.timestamp}
    unknown = sorted(set(data) - known)
    if unknown and schema.unknown_fields == "reject":
        raise _Reject("unexpected_field", f"unexpected field(s): {', '.join(unknown)}")
    fields: dict[str, Any] = {}
    for name, fspec in schema.fields.items():
        if name not in data:
            if fspec.required:
                raise _Reject("missing_field", f"field {name!r} is required")
            fields[name] = None
            continue
        fields[name] = _check(name, fspec, data[name])
    event_id = data.get(schema.event_id)
    if event_id is None or event_id == "":
        event_id = f"{source.topic}:{source.partition}:{source.offset}"
    elif not isinstance(event_id, str | int) or isinstance(event_id, bool):
        raise _Reject("wrong_type", f"{schema.event_id!r} must be a string or integer")
    raw_ts = data.get(schema.timestamp)
    ts_ms = source.timestamp_ms if raw_ts is None else _timestamp_ms(schema.timestamp, raw_ts)
    entity = "" if schema.entity_key is None else str(fields[schema.entity_key] or "")
    return Record(str(event_id), ts_ms, entity, fields)


def _parse(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:  # NaN/Infinity literals are not JSON, but Python producers write them
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Reject("malformed_json", f"not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise _Reject("malformed_json", "JSON nested too deeply") from None
    try:  # e.g. a lone surrogate escape ("\ud800"): Python reads it, no UTF-8 can carry it
        orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        if "surrogates" in str(exc) or "UTF-8" in str(exc):
            raise _Reject("invalid_string", f"a string is not valid Unicode: {exc}") from None
    return value


def _show(fspec: FieldSpec, value: Any, quote: bool = False) -> str:
    """A value as a reason quotes it; a pii field's value never.

    >>> plain, marked = FieldSpec(type="string"), FieldSpec(type="string", pii="redact")
    >>> _show(plain, "XX", quote=True), _show(marked, "XX")
    ("'XX'", '(pii value)')
    """
    if fspec.pii is not None:
        return PII_SHOWN
    return repr(value) if quote else str(value)


PII_SHOWN = "(pii value)"


def _check(name: str, fspec: FieldSpec, value: Any) -> Any:
    if value is None:
        if fspec.nullable:
            return None
        raise _Reject("null_not_allowed", f"field {name!r} must not be null")
    kind = fspec.type
    if kind in ("float", "int"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Reject(
                "wrong_type", f"field {name!r} must be a number, got {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            if not fspec.allow_nan:
                raise _Reject("not_finite", f"field {name!r} is {_show(fspec, value)}")
            return value
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise _Reject(
                    "wrong_type", f"field {name!r} must be an integer, got {_show(fspec, value)}"
                )
            value = int(value)
            if abs(value) >= _INT_LIMIT:
                raise _Reject("out_of_range", f"field {name!r} does not fit in 64 bits")
        else:
            try:
                value = float(value)
            except OverflowError:
                raise _Reject("out_of_range", f"field {name!r} is too large") from None
        if fspec.min is not None and value < fspec.min:
            shown = _show(fspec, value)
            raise _Reject("out_of_range", f"field {name!r} = {shown} is below min {fspec.min}")
        if fspec.max is not None and value > fspec.max:
            shown = _show(fspec, value)
            raise _Reject("out_of_range", f"field {name!r} = {shown} is above max {fspec.max}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _Reject("wrong_type", f"field {name!r} must be true or false")
        return value
    if kind == "timestamp":
        return _timestamp_ms(name, value, fspec.pii is not None)
    if not isinstance(value, str):
        raise _Reject("wrong_type", f"field {name!r} must be a string, got {type(value).__name__}")
    if fspec.max_length is not None and len(value) > fspec.max_length:
        raise _Reject("too_long", f"field {name!r} is longer than {fspec.max_length}")
    if fspec.choices is not None and value not in fspec.choices:
        shown = _show(fspec, value, quote=True)
        raise _Reject("bad_choice", f"field {name!r} = {shown} is not one of {fspec.choices}")
    return value


def _timestamp_ms(name: str, value: Any, pii: bool = False) -> int:
    """Epoch seconds or milliseconds (numbers), or an ISO 8601 string, to epoch ms (a
    ``pii`` field's value is not quoted in the reason)."""
    if isinstance(value, bool):
        raise _Reject("bad_timestamp", f"field {name!r} must be a time, got a boolean")
    if isinstance(value, int | float):
        try:
            ms = int(value if abs(value) >= 1e11 else value * 1000)
        except (OverflowError, ValueError):
            shown = PII_SHOWN if pii else str(value)
            raise _Reject("bad_timestamp", f"field {name!r} is {shown}") from None
        return _in_range(name, ms)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=dt.UTC)
            ms = int(parsed.timestamp() * 1000)
        except (ValueError, OverflowError):
            shown = PII_SHOWN if pii else repr(value[:40])
            raise _Reject("bad_timestamp", f"field {name!r} = {shown} is not ISO 8601") from None
        return _in_range(name, ms)
    raise _Reject("bad_timestamp", f"field {name!r} must be a time, got {type(value).__name__}")


def _in_range(name: str, ms: int) -> int:
    if not 0 <= ms <= _MAX_TS_MS:
        raise _Reject("bad_timestamp", f"field {name!r} is outside 1970..9999")
    return ms


@dataclass(frozen=True)
class Label:
    """A valid label: the event it belongs to and its value, as the models learn it
    (a bool for a binary task, a string or integer class, a float target)."""

    event_id: str
    value: Any


def validate_label(spec: PipelineSpec, payload: bytes, source: Source) -> Label | DeadLetter:
    """Check a ``<p>.labels`` record: a JSON object with ``event_id`` and the label (under
    ``label.field``, or ``label``), whose value fits the task: a class of the spec's class
    set, or a finite number in ``label.min..label.max``.

    >>> from streamml.schemas.spec import parse_spec
    >>> spec = parse_spec({"name": "p", "task": "classification",
    ...     "schema": {"fields": {"x": {"type": "float"}}},
    ...     "features": [{"kind": "numeric", "name": "x", "field": "x"}],
    ...     "online_model": {"kind": "logistic_regression"}})
    >>> src = Source("p.labels", 0, 7, 0)
    >>> validate_label(spec, b'{"event_id": "a", "label": 1}', src)
    Label(event_id='a', value=True)
    >>> bad = validate_label(spec, b'{"event_id": "a", "label": "banana"}', src)
    >>> bad.error_class, bad.reason
    ('unknown_class', "label 'banana' is not one of the classes [false, true]")
    """
    try:
        return _validate_label(spec, payload, source)
    except _Reject as rej:
        return DeadLetter(rej.error_class, rej.reason, payload, source)


def _validate_label(spec: PipelineSpec, payload: bytes, source: Source) -> Label:
    if len(payload) > spec.schema_.max_record_bytes:
        raise _Reject(
            "oversize", f"{len(payload)} bytes > max_record_bytes {spec.schema_.max_record_bytes}"
        )
    data = _parse(payload)
    if not isinstance(data, dict):
        raise _Reject("not_an_object", f"expected a JSON object, got {type(data).__name__}")
    event_id = data.get("event_id")
    if event_id is None or event_id == "":
        raise _Reject("missing_field", "a label needs its event's 'event_id'")
    if not isinstance(event_id, str | int) or isinstance(event_id, bool):
        raise _Reject("wrong_type", "'event_id' must be a string or integer")
    field_name = spec.label.field if spec.label.field in data else "label"
    if field_name not in data:
        raise _Reject("missing_field", f"the label field {spec.label.field!r} is missing")
    return Label(str(event_id), check_label(spec, data[field_name]))


def label_problem(spec: PipelineSpec, value: Any) -> str | None:
    """Why ``value`` is not a valid label of the spec, or None when it is one.

    >>> from streamml.schemas.spec import parse_spec
    >>> spec = parse_spec({"name": "p", "task": "regression",
    ...     "schema": {"fields": {"x": {"type": "float"}}}, "label": {"min": 0},
    ...     "features": [{"kind": "numeric", "name": "x", "field": "x"}],
    ...     "online_model": {"kind": "linear_regression"}})
    >>> label_problem(spec, 2.5) is None, label_problem(spec, -1), label_problem(spec, "a")
    (True, 'label -1.0 is below label.min 0.0', 'the label must be a number, got str')
    """
    try:
        check_label(spec, value)
    except _Reject as rej:
        return rej.reason
    return None


def check_label(spec: PipelineSpec, value: Any) -> Any:
    """A label value as the models learn it, or :class:`_Reject` saying why it is not one."""
    label = spec.label
    if value is None:
        raise _Reject("null_not_allowed", "the label must not be null")
    if isinstance(value, dict | list):
        raise _Reject("wrong_type", f"the label must be a single value, got {type(value).__name__}")
    if spec.task == "regression":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Reject("wrong_type", f"the label must be a number, got {type(value).__name__}")
        try:
            target = float(value)
        except OverflowError:
            raise _Reject("not_finite", "the label is too large for a float") from None
        if not math.isfinite(target):
            raise _Reject("not_finite", f"the label is {target}")
        if label.min is not None and target < label.min:
            raise _Reject("out_of_range", f"label {target} is below label.min {label.min}")
        if label.max is not None and target > label.max:
            raise _Reject("out_of_range", f"label {target} is above label.max {label.max}")
        return target
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer() or abs(value) >= _INT_LIMIT:
            raise _Reject("wrong_type", f"a class label must be a string or integer, got {value}")
        value = int(value)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _INT_LIMIT:
        raise _Reject("out_of_range", "the label does not fit in 64 bits")
    if isinstance(value, str) and len(value) > 1_000:
        raise _Reject("too_long", f"a class label of {len(value)} characters")
    if label.boolean:
        flag = value if isinstance(value, bool) else BOOLEAN_TEXT.get(str(value).lower())
        if flag is None:
            raise _Reject(
                "unknown_class", f"label {value!r} is not one of the classes [false, true]"
            )
        return flag
    if label.classes is not None and str(value) not in label.classes:
        shown = value if not isinstance(value, str) else value[:80]
        raise _Reject("unknown_class", f"label {shown!r} is not one of the classes {label.classes}")
    return value


def json_schema(spec: PipelineSpec) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the raw record, for producers in other languages."""
    types = {"float": "number", "int": "integer", "bool": "boolean", "string": "string"}
    props: dict[str, Any] = {}
    required = []
    for name, fspec in spec.schema_.fields.items():
        prop: dict[str, Any]
        if fspec.type == "timestamp":
            prop = {"type": ["string", "number"], "description": "ISO 8601 or epoch s/ms"}
        else:
            prop = {"type": types[fspec.type]}
        if fspec.min is not None:
            prop["minimum"] = fspec.min
        if fspec.max is not None:
            prop["maximum"] = fspec.max
        if fspec.choices is not None:
            prop["enum"] = list(fspec.choices)
        if fspec.max_length is not None:
            prop["maxLength"] = fspec.max_length
        if fspec.nullable:
            prop = {"anyOf": [prop, {"type": "null"}]}
        props[name] = prop
        if fspec.required:
            required.append(name)
    props.setdefault(spec.schema_.event_id, {"type": ["string", "integer"]})
    props.setdefault(
        spec.schema_.timestamp,
        {"type": ["string", "number"], "description": "ISO 8601 or epoch s/ms"},
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{spec.name}.raw",
        "description": spec.description or f"raw records of pipeline {spec.name}",
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": spec.schema_.unknown_fields != "reject",
    }

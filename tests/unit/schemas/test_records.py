"""Raw bytes -> Record or DeadLetter, against pipelines/demo.yaml."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamml.schemas.records import DeadLetter, Record, Source, json_schema, validate
from streamml.schemas.spec import PipelineSpec, load_spec, parse_spec

PIPELINES = Path(__file__).resolve().parents[3] / "pipelines"
SPEC = load_spec(PIPELINES / "demo.yaml")
SRC = Source("demo.raw", 3, 42, 1_767_225_600_000, key=b"u0001")
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z

GOOD: dict[str, Any] = {
    "event_id": "pay-1",
    "ts": "2026-01-01T00:00:00Z",
    "user_id": "u0001",
    "amount": 12.5,
    "items": 3,
    "merchant": "m01",
    "country": "DE",
    "device": "ios",
    "risk": 0.25,
}


def _payload(drop: tuple[str, ...] = (), **changes: Any) -> bytes:
    record = {k: v for k, v in GOOD.items() if k not in drop}
    record.update(changes)
    return json.dumps(record).encode()


def _record(payload: bytes, spec: PipelineSpec = SPEC, source: Source = SRC) -> Record:
    result = validate(spec, payload, source)
    assert isinstance(result, Record), result
    return result


def _spec_with(**schema_changes: Any) -> PipelineSpec:
    data = yaml.safe_load((PIPELINES / "demo.yaml").read_text("utf-8"))
    data["schema"].update(schema_changes)
    return parse_spec(data)


# --- valid records -----------------------------------------------------------------------


def test_valid_record_is_typed() -> None:
    record = _record(_payload(amount=12, items=3.0))
    assert record == Record(
        event_id="pay-1",
        ts_ms=T0_MS,
        entity_key="u0001",
        fields={
            "user_id": "u0001",
            "amount": 12.0,
            "items": 3,
            "merchant": "m01",
            "country": "DE",
            "device": "ios",
            "risk": 0.25,
        },
    )
    assert type(record.fields["amount"]) is float
    assert type(record.fields["items"]) is int


def test_optional_nullable_field_may_be_missing_or_null() -> None:
    assert _record(_payload(drop=("device",))).fields["device"] is None
    assert _record(_payload(device=None)).fields["device"] is None


def test_integer_event_id_becomes_a_string() -> None:
    assert _record(_payload(event_id=17)).event_id == "17"


@pytest.mark.parametrize("changes", [{"drop": ("event_id",)}, {"event_id": ""}, {"event_id": None}])
def test_event_id_derived_from_topic_partition_offset(changes: dict[str, Any]) -> None:
    record = _record(_payload(**changes))
    assert record.event_id == "demo.raw:3:42"
    other = Source("demo.raw", 5, 7, 0)
    assert _record(_payload(**changes), source=other).event_id == "demo.raw:5:7"


@pytest.mark.parametrize("changes", [{"drop": ("ts",)}, {"ts": None}])
def test_timestamp_taken_from_kafka_when_missing(changes: dict[str, Any]) -> None:
    source = Source("demo.raw", 0, 0, 1_700_000_000_123)
    assert _record(_payload(**changes), source=source).ts_ms == 1_700_000_000_123


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        ("2026-01-01T00:00:00Z", T0_MS),
        ("2026-01-01T00:00:00+00:00", T0_MS),
        ("2026-01-01T01:00:00+01:00", T0_MS),
        ("2025-12-31T19:00:00-05:00", T0_MS),
        ("2026-01-01T00:00:00", T0_MS),  # no offset: UTC
        ("2026-01-01T00:00:00.250Z", T0_MS + 250),
        ("2026-01-01", T0_MS),
        (1_767_225_600, T0_MS),  # epoch seconds
        (1_767_225_600.5, T0_MS + 500),  # fractional epoch seconds
        (1_767_225_600_000, T0_MS),  # epoch milliseconds
        (1_767_225_600_250.0, T0_MS + 250),
    ],
)
def test_timestamp_formats(ts: Any, expected_ms: int) -> None:
    assert _record(_payload(ts=ts)).ts_ms == expected_ms


def test_unknown_fields_drop_accepts_and_removes_extras() -> None:
    spec = _spec_with(unknown_fields="drop")
    record = _record(_payload(extra=1, note="hi"), spec=spec)
    assert set(record.fields) == set(SPEC.schema_.fields)
    assert "extra" not in record.fields and "note" not in record.fields
    # the same payload is rejected by the shipped spec
    result = validate(SPEC, _payload(extra=1, note="hi"), SRC)
    assert isinstance(result, DeadLetter)
    assert result.reason == "unexpected field(s): extra, note"


# --- the fuzz corpus ---------------------------------------------------------------------

_BASE = _payload().removesuffix(b"}")

FUZZ: list[tuple[str, bytes, str, str]] = [
    # (id, payload, error_class, text the reason must contain)
    ("truncated", b'{"user_id": "u0001", "amount": ', "malformed_json", "not valid JSON"),
    ("empty", b"", "malformed_json", "not valid JSON"),
    ("garbage", b"hello world", "malformed_json", "not valid JSON"),
    ("trailing_comma", _BASE + b", }", "malformed_json", "not valid JSON"),
    ("single_quotes", b"{'user_id': 'u0001'}", "malformed_json", "not valid JSON"),
    ("invalid_utf8", b'{"user_id": "\xff\xfe", "amount": 1}', "malformed_json", "not valid JSON"),
    ("array", b"[1, 2, 3]", "not_an_object", "got list"),
    ("string", b'"u0001"', "not_an_object", "got str"),
    ("null", b"null", "not_an_object", "got NoneType"),
    ("number", b"42", "not_an_object", "got int"),
    ("amount_string", _payload(amount="ten"), "wrong_type", "'amount'"),
    ("amount_bool", _payload(amount=True), "wrong_type", "'amount'"),
    ("risk_bool", _payload(risk=False), "wrong_type", "'risk'"),
    ("items_fraction", _payload(items=2.5), "wrong_type", "'items'"),
    ("user_id_number", _payload(user_id=123), "wrong_type", "'user_id'"),
    ("device_list", _payload(device=["ios"]), "wrong_type", "'device'"),
    ("event_id_float", _payload(event_id=1.5), "wrong_type", "'event_id'"),
    ("event_id_bool", _payload(event_id=True), "wrong_type", "'event_id'"),
    ("nan_literal", _BASE.replace(b'"amount": 12.5', b'"amount": NaN') + b"}", "not_finite", ""),
    (
        "inf_literal",
        _BASE.replace(b'"amount": 12.5', b'"amount": Infinity') + b"}",
        "not_finite",
        "",
    ),
    ("neg_inf", _BASE.replace(b'"risk": 0.25', b'"risk": -Infinity') + b"}", "not_finite", ""),
    (
        "overflow_float",
        _BASE.replace(b'"amount": 12.5', b'"amount": 1e400') + b"}",
        "not_finite",
        "",
    ),
    ("below_min", _payload(amount=-5.0), "out_of_range", "below min"),
    ("above_max", _payload(risk=1.5), "out_of_range", "above max"),
    ("items_zero", _payload(items=0), "out_of_range", "'items'"),
    ("bad_choice", _payload(country="XX"), "bad_choice", "'XX'"),
    ("too_long", _payload(user_id="u" * 65), "too_long", "longer than 64"),
    ("unexpected", _payload(x=1), "unexpected_field", "unexpected field(s): x"),
    ("label_in_raw", _payload(is_fraud=True), "unexpected_field", "is_fraud"),
    ("oversize", _payload() + b" " * 4096, "oversize", "max_record_bytes 4096"),
    ("null_amount", _payload(amount=None), "null_not_allowed", "'amount'"),
    ("null_user", _payload(user_id=None), "null_not_allowed", "'user_id'"),
    ("missing_user", _payload(drop=("user_id",)), "missing_field", "'user_id'"),
    ("missing_risk", _payload(drop=("risk",)), "missing_field", "'risk'"),
    ("ts_words", _payload(ts="yesterday"), "bad_timestamp", "not ISO 8601"),
    ("ts_empty", _payload(ts=""), "bad_timestamp", "'ts'"),
    ("ts_bool", _payload(ts=True), "bad_timestamp", "boolean"),
    ("ts_object", _payload(ts={"s": 1}), "bad_timestamp", "'ts'"),
    ("ts_month_13", _payload(ts="2026-13-01T00:00:00Z"), "bad_timestamp", "'ts'"),
    ("ts_nan", _BASE.replace(b'"2026-01-01T00:00:00Z"', b"NaN") + b"}", "bad_timestamp", "'ts'"),
]


@pytest.mark.parametrize(
    ("payload", "error_class", "mentions"),
    [case[1:] for case in FUZZ],
    ids=[case[0] for case in FUZZ],
)
def test_bad_payload_becomes_a_dead_letter(payload: bytes, error_class: str, mentions: str) -> None:
    result = validate(SPEC, payload, SRC)
    assert isinstance(result, DeadLetter), result
    assert result.error_class == error_class
    assert mentions in result.reason
    assert result.payload == payload  # the original bytes, untouched
    assert result.source == SRC
    sent = orjson.loads(result.to_json("demo"))
    assert sent["pipeline"] == "demo"
    assert sent["error_class"] == error_class
    assert (sent["topic"], sent["partition"], sent["offset"]) == ("demo.raw", 3, 42)
    assert sent["key"] == "u0001"
    assert sent["payload"] == payload.decode("utf-8", errors="replace")


def test_payload_exactly_at_the_size_limit_is_accepted() -> None:
    payload = _payload()
    padded = payload + b" " * (SPEC.schema_.max_record_bytes - len(payload))
    assert len(padded) == SPEC.schema_.max_record_bytes
    assert isinstance(validate(SPEC, padded, SRC), Record)
    assert isinstance(validate(SPEC, padded + b" ", SRC), DeadLetter)


@pytest.mark.parametrize(
    "payload",
    [
        # an integer too large for a float, in a float field
        _BASE.replace(b'"amount": 12.5', b'"amount": ' + b"9" * 400) + b"}",
        # nesting deeper than the JSON parsers recurse, well under max_record_bytes
        b"[" * 3000,
        b'{"user_id": ' + b"[" * 1500 + b"]" * 1500 + b"}",
    ],
    ids=["huge_int_in_float_field", "deep_array", "deep_value"],
)
def test_pathological_json_is_a_dead_letter_not_a_crash(payload: bytes) -> None:
    assert len(payload) <= SPEC.schema_.max_record_bytes
    result = validate(SPEC, payload, SRC)
    assert isinstance(result, DeadLetter)
    assert result.payload == payload


# --- properties --------------------------------------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=80)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


def _check_result(payload: bytes, result: Record | DeadLetter) -> None:
    assert isinstance(result, Record | DeadLetter)
    if isinstance(result, DeadLetter):
        assert result.payload == payload
        assert result.error_class
        assert result.reason


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_raise(payload: bytes) -> None:
    _check_result(payload, validate(SPEC, payload, SRC))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from([*GOOD, "extra"]), value=_json_values)
def test_any_value_in_any_field_never_raises(field: str, value: Any) -> None:
    payload = json.dumps({**GOOD, field: value}).encode()
    result = validate(SPEC, payload, SRC)
    _check_result(payload, result)
    if isinstance(result, Record) and field in SPEC.schema_.fields:
        fspec = SPEC.schema_.fields[field]
        kept = result.fields[field]
        if fspec.type == "float":
            assert type(kept) is float
        elif fspec.type == "int":
            assert type(kept) is int
        elif kept is not None:
            assert isinstance(kept, str)
        if fspec.choices is not None:
            assert kept in fspec.choices


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(min_value=0, max_value=len(_payload()) - 1))
def test_every_truncation_of_a_good_record_is_malformed(cut: int) -> None:
    payload = _payload()[:cut]
    result = validate(SPEC, payload, SRC)
    assert isinstance(result, DeadLetter)
    assert result.error_class == "malformed_json"
    assert result.payload == payload


# --- JSON Schema -------------------------------------------------------------------------


def test_json_schema_matches_the_spec() -> None:
    schema = json_schema(SPEC)
    json.dumps(schema)  # serialisable as it is
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "demo.raw"
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["user_id", "amount", "items", "merchant", "country", "risk"]
    props = schema["properties"]
    assert set(props) == set(GOOD)
    assert props["country"] == {
        "type": "string",
        "enum": ["US", "DE", "FR", "GB", "BR", "IN", "JP", "NG"],
    }
    assert props["items"] == {"type": "integer", "minimum": 1, "maximum": 1000}
    assert props["amount"] == {"type": "number", "minimum": 0}
    assert props["risk"] == {"type": "number", "minimum": 0, "maximum": 1}
    assert props["user_id"] == {"type": "string", "maxLength": 64}
    assert props["device"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert props["event_id"]["type"] == ["string", "integer"]
    assert props["ts"]["type"] == ["string", "number"]


def test_json_schema_follows_every_field_of_the_spec() -> None:
    for spec in (SPEC, load_spec(PIPELINES / "phishing.yaml")):
        schema = json_schema(spec)
        fields = spec.schema_.fields
        assert schema["required"] == [n for n, f in fields.items() if f.required]
        for name, fspec in fields.items():
            prop = schema["properties"][name]
            if fspec.nullable:
                prop = prop["anyOf"][0]
            assert prop.get("enum") == fspec.choices
            assert prop.get("minimum") == fspec.min
            assert prop.get("maximum") == fspec.max
            assert prop.get("maxLength") == fspec.max_length


def test_json_schema_allows_extras_when_unknown_fields_are_dropped() -> None:
    assert json_schema(_spec_with(unknown_fields="drop"))["additionalProperties"] is True


def test_json_schema_timestamp_field_and_custom_names() -> None:
    data = yaml.safe_load((PIPELINES / "phishing.yaml").read_text("utf-8"))
    data["schema"]["event_id"] = "id"
    data["schema"]["timestamp"] = "at"
    data["schema"]["fields"]["seen"] = {"type": "timestamp", "required": False}
    spec = parse_spec(copy.deepcopy(data))
    props = json_schema(spec)["properties"]
    assert props["id"] == {"type": ["string", "integer"]}
    assert props["at"]["type"] == ["string", "number"]
    assert props["seen"]["type"] == ["string", "number"]
    assert "seen" not in json_schema(spec)["required"]
    assert "event_id" not in props and "ts" not in props
    # and validate uses the custom names
    record = {n: 0.5 for n in data["schema"]["fields"] if n != "seen"}
    record.update(age_of_domain=1, ip_in_url=0, id="x-1", at=1_767_225_600, seen="2026-01-01")
    result = _record(json.dumps(record).encode(), spec=spec)
    assert result.event_id == "x-1"
    assert result.ts_ms == T0_MS
    assert result.fields["seen"] == T0_MS


def test_a_dead_letter_always_fits_the_broker_and_says_what_it_cut() -> None:
    """A 1 MB record with a 1 MB key, or 400 KB of control characters, must not make a dead
    letter larger than a broker accepts (1 MB by default): it is cut, and says so."""
    import hashlib

    import orjson

    from streamml.schemas.records import DeadLetter

    payload, key = b"\x01" * 400_000 + b"{" * 600_000, b"k" * 1_000_000
    letter = DeadLetter("oversize", "r" * 500_000, payload, Source("d.raw", 0, 7, 0, key))
    out = letter.to_json("demo")
    assert len(out) < 512_000  # JSON escapes a control byte as 6: 64 KiB kept -> < 400 KB
    value = orjson.loads(out)
    assert len(value["key"]) == 1_024 and len(value["payload"]) == 65_536
    assert f"sha256 {hashlib.sha256(payload).hexdigest()}" in value["reason"]
    assert f"sha256 {hashlib.sha256(key).hexdigest()}" in value["reason"]
    assert "1000000 bytes" in value["reason"]
    small = orjson.loads(DeadLetter("x", "why", b"{}", Source("d.raw", 0, 1, 0, b"k")).to_json("d"))
    assert (small["payload"], small["key"], small["reason"]) == ("{}", "k", "why")

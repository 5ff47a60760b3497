"""Fields marked pii: the spec's rules, the protected record, the protected dead letter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamml.errors import SpecError
from streamml.schemas.pii import NO_PII, REDACTED, Protector
from streamml.schemas.records import DeadLetter, Record, Source, validate
from streamml.schemas.spec import PipelineSpec, parse_spec

PIPELINES = Path(__file__).resolve().parents[3] / "pipelines"
PLANTED = "PLANTED-4f2a9c"
KEY = b"test-pii-key"


def _spec_data(keep_features: bool = False, **marks: str) -> dict[str, Any]:
    """The demo spec with these fields marked, and (unless ``keep_features``) without the
    features on the redacted or dropped ones."""
    data: dict[str, Any] = yaml.safe_load((PIPELINES / "demo.yaml").read_text())
    for name, mode in marks.items():
        data["schema"]["fields"][name]["pii"] = mode
        if mode != "hash" and not keep_features:
            data["features"] = [f for f in data["features"] if f.get("field") != name]
    return data


def _spec(**marks: str) -> PipelineSpec:
    return parse_spec(_spec_data(False, **marks))


SPEC = _spec(user_id="hash", country="redact")
PROTECT = Protector.for_spec(SPEC, KEY)
SRC = Source("demo.raw", 0, 7, 1_767_225_600_000, key=PLANTED.encode())
GOOD: dict[str, Any] = {
    "event_id": "pay-1",
    "ts": 1_767_225_600_000,
    "user_id": PLANTED,
    "amount": 12.5,
    "items": 3,
    "merchant": "m01",
    "country": "DE",
    "device": "ios",
    "risk": 0.25,
}


def _payload(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


def _letter(payload: bytes) -> DeadLetter:
    result = validate(SPEC, payload, SRC)
    assert isinstance(result, DeadLetter)
    return PROTECT.letter(result)


# --- the keyed hash -------------------------------------------------------------------
def test_the_hash_is_keyed_stable_and_short() -> None:
    h = PROTECT.hash(PLANTED)
    assert h == PROTECT.hash(PLANTED) and h.startswith("h:") and len(h) == 18
    assert h != Protector.for_spec(SPEC, b"another key").hash(PLANTED)
    assert h != PROTECT.hash(PLANTED + "x")
    assert PROTECT.key(PLANTED.encode()) == h.encode()  # a key that was the entity key


def test_marked_fields_need_a_key() -> None:
    with pytest.raises(ValueError, match="PII key"):
        Protector({"user_id": "hash"}, b"")
    assert not NO_PII.active
    record = Record("e", 0, "u", {"user_id": "u"})
    assert NO_PII.record(record) is record


# --- the record, right after validation --------------------------------------------------
def test_a_valid_record_is_protected_entity_key_included() -> None:
    record = validate(SPEC, _payload(), SRC)
    assert isinstance(record, Record)
    protected = PROTECT.record(record)
    assert protected.entity_key == protected.fields["user_id"] == PROTECT.hash(PLANTED)
    assert protected.fields["country"] == REDACTED
    assert protected.fields["amount"] == 12.5 and protected.event_id == "pay-1"
    assert PLANTED not in repr(protected)


def test_a_dropped_field_is_removed_and_null_stays_null() -> None:
    spec = _spec(user_id="hash", merchant="drop")
    record = validate(spec, _payload(device=None), SRC)
    assert isinstance(record, Record)
    protected = Protector.for_spec(spec, KEY).record(record)
    assert "merchant" not in protected.fields and protected.fields["device"] is None


# --- dead letters: payload, key and reason ---------------------------------------------
@pytest.mark.parametrize(
    "payload",
    [
        _payload(amount=-1),  # out of range: the payload parses
        _payload(country=PLANTED),  # bad choice on a redacted field
        _payload(merchant=PLANTED, amount=-1),  # in an unmarked field too: only it keeps it
        _payload(extra=1),  # unexpected field
        b'{"user_id": "%s", "user_id": "x", "amount": 1}' % PLANTED.encode(),  # repeated
        b'{"user_id": "%s", "amount": NaN' % PLANTED.encode(),  # not JSON at all
        b'["%s"]' % PLANTED.encode(),  # JSON, not an object
        _payload(user_id=[PLANTED]),  # a marked field of the wrong type
    ],
)
def test_no_dead_letter_carries_a_marked_value(payload: bytes) -> None:
    letter = _letter(payload)
    text = letter.to_json("demo").decode()
    if b'"merchant": "%s"' % PLANTED.encode() in payload:  # unmarked: kept, as the spec says
        assert text.count(PLANTED) == 1, text
    else:
        assert PLANTED not in text, text
    assert letter.source.key == PROTECT.hash(PLANTED).encode()


def test_a_parsed_payload_keeps_its_unmarked_fields() -> None:
    letter = _letter(_payload(amount=-1))
    kept = json.loads(letter.payload)
    assert kept["user_id"] == PROTECT.hash(PLANTED) and kept["country"] == REDACTED
    assert kept["amount"] == -1 and kept["merchant"] == "m01"
    assert letter.error_class == "out_of_range"


def test_an_unparsed_payload_is_withheld_with_a_keyed_hash() -> None:
    raw = b'{"user_id": "%s", broken' % PLANTED.encode()
    letter = _letter(raw)
    assert letter.payload.decode() == (
        f"[pii: payload withheld, {len(raw)} bytes, {PROTECT.hash_bytes(raw)}]"
    )


def test_a_reason_never_quotes_a_marked_value() -> None:
    result = validate(SPEC, _payload(country=PLANTED), SRC)
    assert isinstance(result, DeadLetter) and result.error_class == "bad_choice"
    assert PLANTED not in result.reason and "(pii value)" in result.reason
    unmarked = validate(_spec(), _payload(country="XX"), SRC)
    assert isinstance(unmarked, DeadLetter) and "'XX'" in unmarked.reason


def test_an_exception_text_quoting_a_marked_value_is_scrubbed() -> None:
    letter = DeadLetter("featurize_failed", f"KeyError: '{PLANTED}'", _payload(), SRC)
    assert PROTECT.letter(letter).reason == f"KeyError: {PROTECT.hash(PLANTED)}"


def test_a_huge_dead_letter_is_cut_after_protection() -> None:
    letter = _letter(_payload(merchant="m" * 70_000))
    text = letter.to_json("demo").decode()
    assert PLANTED not in text and "payload truncated" in json.loads(text)["reason"]


# --- the spec's rules --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("marks", "problem"),
    [
        ({"user_id": "redact"}, "entity_key 'user_id' is pii 'redact'"),
        ({"user_id": "drop"}, "entity_key 'user_id' is pii 'drop'"),
        ({"amount": "hash"}, "only onehot, frequency and hashing features"),
        ({"merchant": "drop"}, "no feature can use it"),
        ({"device": "bogus"}, "schema.fields.device.pii"),
    ],
)
def test_a_spec_using_a_protected_field_wrongly_is_refused(
    marks: dict[str, str], problem: str
) -> None:
    with pytest.raises(SpecError, match=problem.replace(".", r"\.")):
        parse_spec(_spec_data(keep_features=True, **marks))


def test_the_event_id_and_timestamp_cannot_be_pii() -> None:
    data = _spec_data()
    data["schema"]["fields"]["event_id"] = {"type": "string", "pii": "hash"}
    with pytest.raises(SpecError, match="the event_id field 'event_id' cannot be pii"):
        parse_spec(data)


def test_a_hashed_field_may_be_a_category_and_unmarked_specs_keep_their_hash() -> None:
    spec = _spec(merchant="hash")  # merchant is a onehot feature
    assert spec.schema_.fields["merchant"].pii == "hash"
    assert _spec().spec_hash == parse_spec(_spec_data()).spec_hash
    assert spec.spec_hash != _spec().spec_hash

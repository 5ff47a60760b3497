"""Personal data: spec fields marked ``pii`` never leave the worker in clear.

Right after validation a record's marked fields are replaced (``hash``: a keyed hash,
``redact``: :data:`REDACTED`, ``drop``: removed), and its entity key with them, so every
step after it (windows, features, predictions, the state changelog, ClickHouse) only sees
the protected value. A dead letter is protected too: its payload (the marked fields of a
JSON object; any other payload is withheld), its key and its reason.

The keyed hash is HMAC-SHA256 under the deployment's PII key
(:func:`streamml.secrets.pii_key`), truncated to 64 bits: ``h:`` and 16 hex digits. It does
not depend on the field or the pipeline, so one value hashes alike everywhere and still
works as an entity key, a category or a join key; without the key it cannot be reversed
by hashing guesses.

>>> from streamml.schemas.records import Record
>>> p = Protector({"user": "hash", "name": "redact", "email": "drop"}, b"k", "user")
>>> r = p.record(Record("e1", 0, "ann", {"user": "ann", "name": "Ann", "email": "a@x", "n": 1}))
>>> r.entity_key == r.fields["user"] == p.hash("ann"), r.fields["name"], sorted(r.fields)
(True, '[redacted]', ['n', 'name', 'user'])
>>> p.hash("ann")
'h:9266175ac0e5692d'
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

import orjson

from streamml.schemas.records import DeadLetter, Record
from streamml.schemas.spec import PiiMode, PipelineSpec

REDACTED = "[redacted]"
HASH_PREFIX = "h:"
HASH_HEX = 16  # 64 bits: no collision expected below billions of distinct values
# Reason text shorter than this is not searched for a marked value (it would mangle it)
MIN_SCRUB_CHARS = 3
# A dead letter's payload larger than this is withheld without being parsed
MAX_PARSE_BYTES = 4 << 20


class Protector:
    """Protects one pipeline's marked fields, with one key; inactive without marks."""

    def __init__(
        self, modes: Mapping[str, PiiMode], key: bytes, entity_key: str | None = None
    ) -> None:
        if modes and not key:
            raise ValueError("fields marked pii need a PII key")
        self.modes = dict(modes)
        self.entity_key = entity_key
        self._key = key

    @classmethod
    def for_spec(cls, spec: PipelineSpec, key: bytes) -> Protector:
        return cls(marked(spec), key, spec.schema_.entity_key)

    @property
    def active(self) -> bool:
        return bool(self.modes)

    def hash_bytes(self, data: bytes) -> str:
        """The keyed hash of raw bytes."""
        digest = hmac.new(self._key, data, hashlib.sha256).hexdigest()
        return HASH_PREFIX + digest[:HASH_HEX]

    def hash(self, value: Any) -> str:
        """The keyed hash of a value, of its text (a string itself, a number as ``str``)."""
        return self.hash_bytes(_text(value).encode("utf-8", "surrogatepass"))

    def value(self, mode: PiiMode, value: Any) -> Any:
        """A marked value's protected form (None stays None: absence is not personal)."""
        if value is None:
            return None
        return self.hash(value) if mode == "hash" else REDACTED

    def record(self, record: Record) -> Record:
        """The record with its marked fields (and its entity key) protected."""
        if not self.active:
            return record
        fields = dict(record.fields)
        for name, mode in self.modes.items():
            if name not in fields:
                continue
            if mode == "drop":
                del fields[name]
            else:
                fields[name] = self.value(mode, fields[name])
        entity = record.entity_key
        if entity and self.entity_key in self.modes:
            entity = self.hash(entity)  # the spec allows only hash here
        return Record(record.event_id, record.ts_ms, entity, fields)

    def key(self, key: bytes | None) -> bytes | None:
        """A Kafka key the worker did not make (a dead letter's): its keyed hash, so a key
        that was the entity key becomes the protected entity key."""
        if key is None or not self.active:
            return key
        return self.hash_bytes(key).encode()

    def letter(self, letter: DeadLetter) -> DeadLetter:
        """A dead letter with its payload, key and reason protected.

        >>> from streamml.schemas.records import Source
        >>> p = Protector({"user": "hash"}, b"k", "user")
        >>> src = Source("t", 0, 1, 0, b"ann")
        >>> d = p.letter(DeadLetter("bad", "no 'ann' here", b'{"user": "ann", "x": 1}', src))
        >>> d.payload == b'{"user":"%s","x":1}' % p.hash("ann").encode(), "ann" in d.reason
        (True, False)
        >>> d.source.key == p.hash("ann").encode()
        True
        >>> p.letter(DeadLetter("bad", "", b"ann{", src)).payload
        b'[pii: payload withheld, 4 bytes, h:a093297f27eba27b]'
        """
        if not self.active:
            return letter
        data = _parse(letter.payload)
        if isinstance(data, dict):
            found = [(mode, data[n]) for n, mode in self.modes.items() if n in data]
            payload = self._payload(data) or self._withheld(letter.payload)
        else:
            found = []
            payload = self._withheld(letter.payload)
        return DeadLetter(
            letter.error_class,
            self.scrub(letter.reason, found),
            payload,
            replace(letter.source, key=self.key(letter.source.key)),
        )

    def scrub(self, text: str, found: Iterable[tuple[PiiMode, Any]]) -> str:
        """``text`` with each marked value found (as text, repr or JSON) replaced by its
        protected form (a dropped one by the redaction marker); e.g. an exception message
        that quoted one.

        >>> p = Protector({"name": "redact"}, b"k")
        >>> p.scrub("bad name 'Ann Lee'", [("redact", "Ann Lee")])
        'bad name [redacted]'
        """
        for mode, value in found:
            if value is None:
                continue
            protected = str(self.value("hash" if mode == "hash" else "redact", value))
            forms = {_text(value), repr(value), json.dumps(value, default=str)}
            for form in sorted(forms, key=len, reverse=True):
                if len(form) >= MIN_SCRUB_CHARS:
                    text = text.replace(form, protected)
        return text

    def _payload(self, data: dict[str, Any]) -> bytes | None:
        """The JSON object again with its marked fields protected (written anew, so a key
        repeated in the original cannot carry a second, unprotected value); None when it
        cannot be written again (nested too deeply)."""
        out = dict(data)
        for name, mode in self.modes.items():
            if name not in out:
                continue
            if mode == "drop":
                del out[name]
            else:
                out[name] = self.value(mode, out[name])
        try:
            return json.dumps(out, separators=(",", ":")).encode()
        except (RecursionError, ValueError):
            return None

    def _withheld(self, payload: bytes) -> bytes:
        """A payload no marked field can be found in: its size and keyed hash only."""
        if not payload:
            return payload
        return f"[pii: payload withheld, {len(payload)} bytes, {self.hash_bytes(payload)}]".encode()


NO_PII = Protector({}, b"")


def marked(spec: PipelineSpec) -> dict[str, PiiMode]:
    """The spec's fields marked pii, with their mode."""
    return {n: f.pii for n, f in spec.schema_.fields.items() if f.pii is not None}


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return str(value)


def _parse(payload: bytes) -> Any:
    """The payload's JSON value, or None when it is not JSON (or too large to look at)."""
    if len(payload) > MAX_PARSE_BYTES:
        return None
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:  # NaN/Infinity literals, lone surrogates: Python's parser reads them
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None

"""Synthetic and bundled datasets that producers stream into pipelines (no downloads)."""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MERCHANTS = [f"m{i:02d}" for i in range(16)]
COUNTRIES = ["US", "DE", "FR", "GB", "BR", "IN", "JP", "NG"]
DEVICES = ["ios", "android", "web", None]


@dataclass(frozen=True)
class Example:
    key: str
    record: dict[str, Any] | bytes  # bytes: sent as they are (malformed on purpose)
    label: Any


_OK = b'"items": 1, "merchant": "m01", "country": "US", "risk": 0.1'
BAD_RECORDS: list[bytes] = [
    b'{"user_id": "u0001", "amount": ',  # truncated JSON
    b'{"user_id": "u0002", "amount": -5.0, ' + _OK + b"}",  # below min
    b'{"amount": 10.0, ' + _OK + b"}",  # user_id missing
    b'{"user_id": "u0003", "amount": 10.0, ' + _OK.replace(b"US", b"XX") + b"}",  # bad choice
    b'{"user_id": "u0004", "amount": NaN, ' + _OK + b"}",  # not finite
    b'{"user_id": "u0005", "amount": 1.0, ' + _OK + b', "x": 1}',  # unexpected field
    b"[1, 2, 3]",  # not an object
    b'{"user_id": "u0006", "amount": "ten", ' + _OK + b"}",  # wrong type
]


def payments(
    n: int,
    seed: int = 7,
    drift_at: float = 0.5,
    users: int = 200,
    start: dt.datetime | None = None,
    span_s: float | None = None,
    bad_every: int = 0,
) -> Iterator[Example]:
    """Card payments whose fraud rule changes after ``drift_at`` of the stream.

    Before the drift, fraud means large amounts at risky merchants; after it, small
    amounts many items from a few countries -- a concept drift on the same features.
    """
    rng = random.Random(seed)
    t0 = start or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    step_s = (span_s / n) if span_s else 0.5
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            yield Example(f"bad{i}", BAD_RECORDS[(i // bad_every) % len(BAD_RECORDS)], None)
            continue
        user = f"u{rng.randrange(users):04d}"
        amount = round(math.exp(rng.gauss(3.5, 1.2)), 2)
        items = rng.randint(1, 12)
        merchant = rng.choice(MERCHANTS)
        country = rng.choice(COUNTRIES)
        risk = round(rng.random(), 3)
        if i < drift_at * n:
            z = 0.025 * amount + 3.0 * risk - 4.5 + (1.0 if merchant in MERCHANTS[:4] else 0.0)
        else:
            z = -0.02 * amount + 0.45 * items + (1.5 if country in ("NG", "BR") else 0.0) - 3.5
        fraud = rng.random() < _sigmoid(3 * z)
        ts = t0 + dt.timedelta(seconds=i * step_s)
        record = {
            "event_id": f"pay-{seed}-{i}",
            "ts": ts.isoformat(),
            "user_id": user,
            "amount": amount,
            "items": items,
            "merchant": merchant,
            "country": country,
            "device": rng.choice(DEVICES),
            "risk": risk,
        }
        yield Example(user, record, fraud)


def _sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow for any finite x (a large amount makes |x| huge)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def phishing() -> Iterator[Example]:
    """river's Phishing dataset in its order, with event ids ``phishing-<i>``."""
    from river import datasets

    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for i, (x, y) in enumerate(datasets.Phishing()):
        event_id = f"phishing-{i}"
        record = {"event_id": event_id, "ts": (t0 + dt.timedelta(seconds=i)).isoformat(), **x}
        yield Example(event_id, record, bool(y))


def generator_for(spec_fields: set[str]) -> tuple[str, Callable[..., Iterator[Example]]] | None:
    """The synthetic generator whose records have exactly these schema fields (besides
    event id and timestamp): ``payments`` for the demo spec and its copies, ``tickets`` for
    the tickets spec; None when neither fits.

    >>> generator_for({"user_id", "amount", "items", "merchant", "country", "device", "risk"})[0]
    'payments'
    >>> generator_for({"x"}) is None
    True
    """
    from streamml.models.tickets import tickets

    for name, make in (("payments", payments), ("tickets", tickets)):
        sample = next(make(1))
        assert isinstance(sample.record, dict)
        if set(sample.record) - {"event_id", "ts"} == spec_fields:
            return name, make
    return None

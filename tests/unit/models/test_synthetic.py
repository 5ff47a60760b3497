"""The demo's generator over many seeds: the main job cannot crash on its own data.

`make demo` seeds the generator from the clock, so any seed is a seed a user meets. For
every seed, every record the generator makes (bad ones aside, which it makes on purpose)
validates against the demo spec, featurizes to finite numbers, and its label is a label of
the spec; the bad ones become dead letters, never exceptions.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from streamml.models import synthetic
from streamml.models.features import Featurizer, GlobalState
from streamml.schemas.records import DeadLetter, Record, Source, label_problem, validate
from streamml.schemas.spec import load_spec

ROOT = Path(__file__).resolve().parents[3]
DEMO = load_spec(ROOT / "pipelines" / "demo.yaml")


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**63 - 1),
    drift_at=st.floats(min_value=0.0, max_value=1.0),
    users=st.integers(min_value=1, max_value=500),
    span_s=st.one_of(st.none(), st.floats(min_value=1.0, max_value=10 * 365 * 86400.0)),
)
def test_every_generated_record_validates_featurizes_and_has_a_valid_label(
    seed: int, drift_at: float, users: int, span_s: float | None
) -> None:
    featurizer = Featurizer(DEMO)
    stats = GlobalState()
    windows: dict[str, dict[str, Any]] = {}
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    examples = synthetic.payments(
        400, seed=seed, drift_at=drift_at, users=users, start=start, span_s=span_s, bad_every=37
    )
    for i, example in enumerate(examples):
        payload = example.record if isinstance(example.record, bytes) else None
        if payload is not None:  # one of the generator's deliberate bad records
            source = Source("demo.raw", 0, i, 0)
            assert isinstance(validate(DEMO, payload, source), DeadLetter)
            continue
        record = validate(DEMO, orjson.dumps(example.record), Source("demo.raw", 0, i, 0))
        assert isinstance(record, Record), record
        window = windows.setdefault(record.entity_key, {})
        vector = featurizer.transform(record, stats, window)
        assert all(math.isfinite(v) for v in vector.values()), vector
        assert label_problem(DEMO, example.label) is None


def test_the_sigmoid_holds_at_the_extremes() -> None:
    """The overflow a user met: math.exp(-3 * z) for a large amount after the drift."""
    for x in (-1e308, -1e6, -745.2, 0.0, 745.2, 1e6, 1e308):
        p = synthetic._sigmoid(x)
        assert 0.0 <= p <= 1.0

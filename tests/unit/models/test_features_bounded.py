"""Feature state stays bounded: category tables are capped, and entity state carries the
event time its expiry is measured from."""

from __future__ import annotations

from typing import Any

import pytest

from streamml.models.features import (
    CLOCK,
    FREQUENCY_MAX_CATEGORIES,
    SEEN,
    Featurizer,
    GlobalState,
)
from streamml.schemas.records import Record
from streamml.schemas.spec import parse_spec

T0_MS = 1_767_225_600_000


def _spec(*features: dict[str, Any]) -> Any:
    return parse_spec(
        {
            "name": "t",
            "task": "classification",
            "schema": {
                "entity_key": "user",
                "fields": {"user": {"type": "string"}, "merchant": {"type": "string"}},
            },
            "features": list(features),
            "online_model": {"kind": "logistic_regression"},
        }
    )


def _rec(ts_ms: int, user: str = "u", merchant: str = "m") -> Record:
    return Record(f"e{ts_ms}", ts_ms, user, {"user": user, "merchant": merchant})


def test_frequency_table_is_capped_and_keeps_the_frequent_categories() -> None:
    """A category per record (e.g. a user id used as a category) would grow the table with
    every record; past the cap the rare half goes, while a frequent category keeps its
    share."""
    featurizer = Featurizer(_spec({"name": "f", "kind": "frequency", "field": "merchant"}))
    state = GlobalState()
    n = 3 * FREQUENCY_MAX_CATEGORIES
    for i in range(n):
        merchant = "popular" if i % 4 == 0 else f"m{i}"
        out = featurizer.transform(_rec(T0_MS + i, merchant=merchant), state, {})
    assert len(state.data["f"]) <= FREQUENCY_MAX_CATEGORIES
    last = featurizer.transform(_rec(T0_MS + n, merchant="popular"), state, {})
    assert last["f"] == pytest.approx(0.25, abs=0.01)
    assert out["f"] == pytest.approx(1 / n, rel=0.01)  # a new category: seen once


def test_entity_state_keeps_its_newest_event_time_and_the_partition_its_clock() -> None:
    window = {
        "name": "w",
        "kind": "window",
        "field": "merchant",
        "aggs": ["count"],
        "window": {"size_s": 60},
    }
    featurizer = Featurizer(_spec(window))
    state, entity = GlobalState(), {}
    for ts in (T0_MS + 5_000, T0_MS, T0_MS + 7_000, T0_MS + 6_000):
        featurizer.transform(_rec(ts), state, entity)
    assert entity[SEEN] == T0_MS + 7_000
    assert state.clock_ms == state.data[CLOCK] == T0_MS + 7_000


def test_no_clock_without_entity_features() -> None:
    featurizer = Featurizer(_spec({"name": "h", "kind": "hashing", "field": "merchant"}))
    state, entity = GlobalState(), {}
    featurizer.transform(_rec(T0_MS), state, entity)
    assert entity == {} and state.clock_ms == 0

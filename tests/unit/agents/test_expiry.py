"""Bounded state: entity windows expire after the entity TTL (event time) and are
tombstoned; a restore leaves expired windows out; joins and early labels expire after
``label.ttl_s`` (wall clock), restored ones included. No broker: plain records in, a
recording outbox out."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from streamml.agents.expiry import expire_entities
from streamml.agents.ingest import ingest
from streamml.agents.learn import housekeeping
from streamml.agents.runtime import (
    EARLY,
    JOIN,
    STATS,
    WINDOW,
    PartitionState,
    PipelineRuntime,
    last_seen_ms,
)
from streamml.errors import SpecError
from streamml.models.features import SEEN, GlobalState
from streamml.models.online import OnlineLearner
from streamml.schemas.spec import PipelineSpec, parse_spec

T0_MS = 1_700_000_000_000  # 2023-11-14, in the past: the wall-clock cap does not bite
TTL_S = 60.0


WINDOW_30S = {
    "name": "amt",
    "kind": "window",
    "field": "amount",
    "aggs": ["count", "sum"],
    "window": {"size_s": 30},
}
LAST_3 = {"name": "l", "kind": "last_n", "field": "amount", "n": 3, "aggs": ["mean"]}


def _spec(
    state: dict[str, Any] | None = None, features: tuple[dict[str, Any], ...] = (WINDOW_30S,)
) -> PipelineSpec:
    data: dict[str, Any] = {
        "name": "t",
        "task": "classification",
        "schema": {
            "entity_key": "user",
            "fields": {"user": {"type": "string"}, "amount": {"type": "float"}},
        },
        "features": list(features),
        "online_model": {"kind": "logistic_regression"},
        "label": {"ttl_s": 60},
        "state": {"ttl_s": TTL_S} if state is None else state,
    }
    return parse_spec(data)


class Recorder:
    """An outbox that keeps what was added."""

    def __init__(self) -> None:
        self.records: list[tuple[str, int, bytes | None, bytes | None]] = []

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None) -> None:
        self.records.append((topic, partition, key, value))

    def tombstones(self, prefix: bytes) -> list[str]:
        return [
            k[2:].decode() for _, _, k, v in self.records if v is None and k and k[:2] == prefix
        ]


def _runtime(spec: PipelineSpec) -> tuple[PipelineRuntime, PartitionState]:
    rt = PipelineRuntime.from_spec(spec, "app", 1, None)  # type: ignore[arg-type]  # unused
    state = rt.states[0] = PartitionState(0, OnlineLearner(spec), GlobalState())
    return rt, state


def _event(rt: PipelineRuntime, state: PartitionState, user: str, ts_ms: int, n: int) -> None:
    """One raw record through the real ingest step (validate + featurize)."""
    value = orjson.dumps({"event_id": f"e{n}", "ts": ts_ms, "user": user, "amount": 1.0})
    message = SimpleNamespace(
        topic="t.raw", partition=0, offset=n, timestamp=ts_ms, key=user.encode(), value=value
    )
    assert ingest(rt, state, message, (), Recorder()) is not None  # type: ignore[arg-type]


# --- the TTL in the spec ---------------------------------------------------------------


def test_entity_ttl_defaults_to_the_longest_window_plus_a_margin() -> None:
    assert _spec(state={}).entity_ttl_s == 30 + 3600
    assert _spec().entity_ttl_s == TTL_S
    assert _spec({}, (LAST_3,)).entity_ttl_s == 86_400  # last_n values have no window: a day
    assert _spec({}, (WINDOW_30S, LAST_3)).entity_ttl_s == 86_400
    assert _spec({"ttl_s": 45}, (WINDOW_30S, LAST_3)).entity_ttl_s == 45


def test_a_ttl_shorter_than_a_window_is_refused() -> None:
    with pytest.raises(SpecError, match=r"state\.ttl_s: 10 s is shorter than the longest"):
        _spec(state={"ttl_s": 10})


# --- expiry ---------------------------------------------------------------------------------


def test_featurizing_records_the_entity_and_partition_event_times() -> None:
    rt, state = _runtime(_spec())
    _event(rt, state, "a", T0_MS + 5_000, 0)
    _event(rt, state, "a", T0_MS + 1_000, 1)  # late: the entity's newest time stays
    assert last_seen_ms(state.windows["a"]) == T0_MS + 5_000
    assert state.stats.clock_ms == T0_MS + 5_000


def test_entities_not_seen_within_the_ttl_expire_and_are_tombstoned() -> None:
    rt, state = _runtime(_spec())
    for n, user in enumerate(["a", "b", "c"]):
        _event(rt, state, user, T0_MS + n * 1000, n)
    _event(rt, state, "a", T0_MS + 3000, 3)  # a is touched again: now the newest
    _event(rt, state, "d", T0_MS + 61_500, 4)  # the clock moves 61.5 s on
    out = Recorder()
    assert expire_entities(rt, state, out) == 1  # b (1 s) is past 61.5 - 60; c (2 s) not
    assert out.tombstones(WINDOW) == ["b"]
    assert list(state.windows) == ["c", "a", "d"]
    assert rt.counters["entities_expired"] == 1
    assert rt.counters["entities_live"] == 3
    assert expire_entities(rt, state, Recorder()) == 0  # nothing new: reads only the front


def test_expiry_respects_its_limit_and_resumes() -> None:
    rt, state = _runtime(_spec())
    for n in range(10):
        _event(rt, state, f"u{n}", T0_MS + n, n)
    _event(rt, state, "late", T0_MS + 100_000, 10)
    assert expire_entities(rt, state, Recorder(), limit=4) == 4
    assert expire_entities(rt, state, Recorder(), limit=4) == 4
    assert expire_entities(rt, state, Recorder(), limit=4) == 2
    assert list(state.windows) == ["late"]


def test_a_record_dated_in_the_future_does_not_wipe_the_partition() -> None:
    rt, state = _runtime(_spec())
    now_ms = T0_MS + 10_000
    _event(rt, state, "a", T0_MS, 0)
    _event(rt, state, "future", now_ms + 10 * 86_400_000, 1)  # ten days ahead of the wall
    assert expire_entities(rt, state, Recorder(), now_ms=now_ms) == 0
    assert set(state.windows) == {"a", "future"}


def test_windows_stay_bounded_over_many_entities() -> None:
    """20,000 distinct entities, 10 ms of event time apart, housekept every 1,000 events:
    a 60 s TTL holds 6,000 entities' worth of event time, plus one housekeeping period."""
    rt, state = _runtime(_spec())
    peak = 0
    for n in range(20_000):
        _event(rt, state, f"user{n}", T0_MS + n * 10, n)
        if n % 1000 == 999:
            expire_entities(rt, state, Recorder())
            peak = max(peak, len(state.windows))
    assert peak <= 6_000 + 1_000
    assert rt.counters["entities_expired"] == 20_000 - len(state.windows)


# --- restore ----------------------------------------------------------------------------------


def _log(spec: PipelineSpec, state: PartitionState) -> dict[bytes, tuple[bytes, int]]:
    log = {WINDOW + e.encode(): (orjson.dumps(w), 0) for e, w in state.windows.items()}
    log[STATS] = (orjson.dumps(state.stats.data), 0)
    return log


def test_a_restore_leaves_expired_windows_out_and_tombstones_them_next() -> None:
    spec = _spec()
    rt, state = _runtime(spec)
    for n, user in enumerate(["old1", "old2", "back", "live"]):
        ts = T0_MS + (70_000 if user == "live" else n * 1000)
        _event(rt, state, user, ts, n)
    log = _log(spec, state)
    log[WINDOW + b"legacy"] = (orjson.dumps({"amt": []}), 0)  # logged without an event time
    restored = PartitionState.restore(spec, 0, log)
    assert sorted(restored.stale) == ["back", "old1", "old2"]
    assert list(restored.windows) == ["live", "legacy"]  # ordered by newest event
    assert restored.windows["legacy"][SEEN] == T0_MS + 70_000
    rt.states[0] = restored
    _event(rt, restored, "back", T0_MS + 71_000, 9)  # came back before housekeeping
    out = Recorder()
    assert expire_entities(rt, restored, out) == 2
    assert sorted(out.tombstones(WINDOW)) == ["old1", "old2"]
    assert restored.stale == []


# --- label joins and early labels -------------------------------------------------------------


def test_joins_and_early_labels_expire_after_the_label_ttl_also_when_restored() -> None:
    spec = _spec()
    now_ms = int(time.time() * 1000)
    old, recent = now_ms - 120_000, now_ms - 1_000
    join = orjson.dumps({"features": {"x": 1.0}, "ts_ms": T0_MS, "predictions": []})
    early = orjson.dumps({"label": "true"})
    log = {  # as a new owner reads them: each with the time it was logged at
        JOIN + b"j-old": (join, old),
        EARLY + b"l-old": (early, old),
        JOIN + b"j-new": (join, recent),
        EARLY + b"l-new": (early, recent),
    }
    rt, _ = _runtime(spec)
    state = rt.states[0] = PartitionState.restore(spec, 0, log)
    assert set(state.joins) == {"j-old", "j-new"} and set(state.early) == {"l-old", "l-new"}
    out = Recorder()
    housekeeping(rt, state, out)  # type: ignore[arg-type]
    assert set(state.joins) == {"j-new"} and set(state.early) == {"l-new"}
    assert out.tombstones(JOIN) == ["j-old"] and out.tombstones(EARLY) == ["l-old"]
    assert rt.counters["features_expired"] == 1 and rt.counters["labels_expired"] == 1

"""Feature engineering: every feature kind, windows, selection, and JSON-able state."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from streamml.models import synthetic
from streamml.models.features import (
    OTHER,
    Featurizer,
    GlobalState,
    Vector,
    last_n_update,
    window_update,
)
from streamml.schemas.records import Record, Source, validate
from streamml.schemas.spec import (
    LastNFeature,
    PipelineSpec,
    WindowFeature,
    load_spec,
    parse_spec,
)

PIPELINES = Path(__file__).resolve().parents[3] / "pipelines"
T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a Thursday

FIELDS: dict[str, Any] = {
    "user": {"type": "string"},
    "amount": {"type": "float", "required": False, "nullable": True},
    "items": {"type": "int"},
    "merchant": {"type": "string", "required": False, "nullable": True},
    "when": {"type": "timestamp", "required": False},
}


def _spec(*features: dict[str, Any], **extra: Any) -> PipelineSpec:
    data: dict[str, Any] = {
        "name": "t",
        "task": "classification",
        "schema": {"entity_key": "user", "fields": FIELDS},
        "features": list(features),
        "online_model": {"kind": "logistic_regression"},
        **extra,
    }
    return parse_spec(data)


def _rec(ts_ms: int = T0_MS, user: str = "u1", **fields: Any) -> Record:
    values = {"user": user, "amount": None, "items": 1, "merchant": None, "when": None}
    values.update(fields)
    return Record(f"e{ts_ms}", ts_ms, user, values)


def _run(spec: PipelineSpec, records: list[Record]) -> list[Vector]:
    """Featurize ``records`` in order with one partition state and one state per entity."""
    featurizer = Featurizer(spec)
    global_state = GlobalState()
    entities: dict[str, dict[str, Any]] = {}
    return [
        featurizer.transform(r, global_state, entities.setdefault(r.entity_key, {}))
        for r in records
    ]


def _one(feature: dict[str, Any], **fields: Any) -> Vector:
    return _run(_spec(feature), [_rec(**fields)])[0]


# --- per-record feature kinds --------------------------------------------------------------


def test_numeric_passes_the_value_and_fills_missing() -> None:
    feature = {"name": "a", "kind": "numeric", "field": "amount"}
    assert _one(feature, amount=2.5) == {"a": 2.5}
    assert _one(feature, amount=None) == {"a": 0.0}
    assert _one({**feature, "fill": -1.0}, amount=None) == {"a": -1.0}
    assert _one({"name": "n", "kind": "numeric", "field": "items"}, items=7) == {"n": 7.0}


def test_log1p_and_negative_values() -> None:
    feature = {"name": "a", "kind": "log1p", "field": "amount"}
    assert _one(feature, amount=math.e - 1)["a"] == pytest.approx(1.0)
    assert _one(feature, amount=0.0)["a"] == 0.0
    assert _one(feature, amount=-5.0)["a"] == 0.0  # clamped at 0 before log1p


@pytest.mark.parametrize(
    ("amount", "expected"), [(-5.0, 0.0), (0.0, 0.0), (5.0, 5.0), (10.0, 10.0), (50.0, 10.0)]
)
def test_clip(amount: float, expected: float) -> None:
    feature = {"name": "a", "kind": "clip", "field": "amount", "lower": 0, "upper": 10}
    assert _one(feature, amount=amount) == {"a": expected}


def test_clip_with_one_bound() -> None:
    feature = {"name": "a", "kind": "clip", "field": "amount", "upper": 3}
    assert _one(feature, amount=-100.0) == {"a": -100.0}
    assert _one(feature, amount=100.0) == {"a": 3.0}


def test_standardize_is_a_running_z_score() -> None:
    values = [10.0, 12.0, 9.0, 30.0, 11.0, 10.5]
    spec = _spec({"name": "z", "kind": "standardize", "field": "amount"})
    out = _run(spec, [_rec(T0_MS + i, amount=v) for i, v in enumerate(values)])
    assert out[0]["z"] == 0.0  # one value: no spread yet
    for i in range(1, len(values)):
        seen = values[: i + 1]
        expected = (values[i] - statistics.fmean(seen)) / statistics.pstdev(seen)
        assert out[i]["z"] == pytest.approx(expected, rel=1e-9)
    assert out[3]["z"] > 1.5  # the outlier stands out


def test_standardize_constant_stream_is_zero() -> None:
    spec = _spec({"name": "z", "kind": "standardize", "field": "amount"})
    out = _run(spec, [_rec(T0_MS + i, amount=4.0) for i in range(5)])
    assert [v["z"] for v in out] == [0.0] * 5


def test_onehot_caps_the_vocabulary() -> None:
    spec = _spec({"name": "m", "kind": "onehot", "field": "merchant", "max_categories": 2})
    merchants = ["a", "b", "c", "a", "d", "b"]
    out = _run(spec, [_rec(T0_MS + i, merchant=m) for i, m in enumerate(merchants)])
    assert out == [
        {"m=a": 1.0},
        {"m=b": 1.0},
        {f"m={OTHER}": 1.0},
        {"m=a": 1.0},
        {"m=__other__": 1.0},
        {"m=b": 1.0},
    ]


def test_onehot_missing_category_is_the_empty_string() -> None:
    spec = _spec({"name": "m", "kind": "onehot", "field": "merchant"})
    assert _run(spec, [_rec(merchant=None)]) == [{"m=": 1.0}]


def test_frequency_is_the_share_seen_so_far() -> None:
    spec = _spec({"name": "f", "kind": "frequency", "field": "merchant"})
    merchants = ["a", "a", "b", "a", "c", "b"]
    out = _run(spec, [_rec(T0_MS + i, merchant=m) for i, m in enumerate(merchants)])
    assert [v["f"] for v in out] == pytest.approx([1.0, 1.0, 1 / 3, 3 / 4, 1 / 5, 2 / 6])
    assert all(type(v["f"]) is float for v in out)


def test_hashing_buckets_are_stable_and_in_range() -> None:
    spec = _spec({"name": "d", "kind": "hashing", "field": "merchant", "buckets": 8})
    # crc32-based: the same bucket in every process (not Python's salted hash())
    assert _run(spec, [_rec(merchant="ios")]) == [{"d#3": 1.0}]
    assert _run(spec, [_rec(merchant="android")]) == [{"d#5": 1.0}]
    assert _run(spec, [_rec(merchant="web")]) == [{"d#1": 1.0}]
    assert _run(spec, [_rec(merchant=None)]) == [{"d#0": 1.0}]
    out = _run(spec, [_rec(T0_MS + i, merchant=f"m{i}") for i in range(200)])
    keys = {next(iter(v)) for v in out}
    assert all(len(v) == 1 and next(iter(v.values())) == 1.0 for v in out)
    assert keys == {f"d#{b}" for b in range(8)}  # 200 categories reach every bucket


@pytest.mark.parametrize(
    ("ts_ms", "hour", "weekday"),
    [
        (T0_MS + 6 * 3_600_000, 6.0, 3),  # Thu 2026-01-01 06:00 UTC
        (T0_MS + 18 * 3_600_000 + 30 * 60_000, 18.5, 3),  # Thu 18:30
        (T0_MS + 3 * 86_400_000, 0.0, 6),  # Sun 2026-01-04 00:00
    ],
)
def test_cyclic_time_of_the_record_timestamp(ts_ms: int, hour: float, weekday: int) -> None:
    out = _run(_spec({"name": "t", "kind": "cyclic_time"}), [_rec(ts_ms)])[0]
    assert out == pytest.approx(
        {
            "t_hour_sin": math.sin(2 * math.pi * hour / 24),
            "t_hour_cos": math.cos(2 * math.pi * hour / 24),
            "t_dow_sin": math.sin(2 * math.pi * weekday / 7),
            "t_dow_cos": math.cos(2 * math.pi * weekday / 7),
        },
        abs=1e-12,
    )


def test_cyclic_time_known_values_at_six_in_the_morning() -> None:
    out = _run(_spec({"name": "t", "kind": "cyclic_time"}), [_rec(T0_MS + 6 * 3_600_000)])[0]
    assert out["t_hour_sin"] == pytest.approx(1.0)
    assert out["t_hour_cos"] == pytest.approx(0.0, abs=1e-12)


def test_cyclic_time_of_a_timestamp_field() -> None:
    spec = _spec({"name": "w", "kind": "cyclic_time", "field": "when"})
    out = _run(spec, [_rec(T0_MS, when=T0_MS + 12 * 3_600_000)])[0]
    assert out["w_hour_sin"] == pytest.approx(0.0, abs=1e-12)
    assert out["w_hour_cos"] == pytest.approx(-1.0)


def test_ratio_interaction_difference() -> None:
    spec = _spec(
        {"name": "r", "kind": "ratio", "fields": ["amount", "items"]},
        {"name": "i", "kind": "interaction", "fields": ["amount", "items"]},
        {"name": "d", "kind": "difference", "fields": ["amount", "items"]},
        {"name": "d2", "kind": "difference", "fields": ["items", "amount"]},
    )
    assert _run(spec, [_rec(amount=10.0, items=4)]) == [{"r": 2.5, "i": 40.0, "d": 6.0, "d2": -6.0}]


def test_ratio_with_zero_denominator_is_zero() -> None:
    spec = _spec({"name": "r", "kind": "ratio", "fields": ["amount", "items"]})
    assert _run(spec, [_rec(amount=10.0, items=0)]) == [{"r": 0.0}]
    assert _run(spec, [_rec(amount=None, items=5)]) == [{"r": 0.0}]


# --- windows ---------------------------------------------------------------------------


def _window(kind: str, size_s: float, step_s: float | None = None) -> WindowFeature:
    window: dict[str, Any] = {"type": kind, "size_s": size_s}
    if step_s is not None:
        window["step_s"] = step_s
    return WindowFeature(
        kind="window",
        name="w",
        field="amount",
        aggs=["count", "sum", "mean", "std", "min", "max"],
        window=window,  # type: ignore[arg-type]
    )


def test_tumbling_window_accumulates_then_resets_on_a_new_window() -> None:
    feature = _window("tumbling", 60)
    state: dict[str, Any] = {}
    events = [(0, 1.0), (10_000, 3.0), (59_999, 5.0), (60_000, 7.0), (61_000, 9.0)]
    out = [window_update(state, feature, T0_MS + t, x) for t, x in events]
    assert [o["w_count"] for o in out] == [1.0, 2.0, 3.0, 1.0, 2.0]
    assert [o["w_sum"] for o in out] == [1.0, 4.0, 9.0, 7.0, 16.0]
    assert out[2]["w_mean"] == 3.0
    assert out[2]["w_min"] == 1.0 and out[2]["w_max"] == 5.0
    assert out[2]["w_std"] == pytest.approx(statistics.pstdev([1.0, 3.0, 5.0]))
    assert out[3] == {
        "w_count": 1.0,
        "w_sum": 7.0,
        "w_mean": 7.0,
        "w_std": 0.0,
        "w_min": 7.0,
        "w_max": 7.0,
    }


def test_tumbling_window_skipping_windows_starts_fresh() -> None:
    feature = _window("tumbling", 60)
    state: dict[str, Any] = {}
    window_update(state, feature, T0_MS, 100.0)
    out = window_update(state, feature, T0_MS + 3_600_000, 2.0)
    assert out["w_count"] == 1.0 and out["w_max"] == 2.0


def test_hopping_window_covers_only_the_last_size_s() -> None:
    feature = _window("hopping", 300, 60)
    state: dict[str, Any] = {}
    times_s = [0, 100, 250, 299, 310, 360, 700]
    out = [window_update(state, feature, T0_MS + t * 1000, float(t)) for t in times_s]
    # the window ending with the event's 60 s step spans 300 s:
    # at 299 -> [0, 300); at 310 -> [60, 360); at 360 -> [120, 420); at 700 -> [460, 760)
    assert [o["w_count"] for o in out] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 1.0]
    assert out[4]["w_sum"] == 100 + 250 + 299 + 310
    assert out[4]["w_min"] == 100.0
    assert out[5]["w_sum"] == 250 + 299 + 310 + 360
    assert out[5]["w_min"] == 250.0
    assert out[6]["w_sum"] == 700.0


def test_last_n_keeps_the_last_n_values() -> None:
    feature = LastNFeature(
        kind="last_n", name="l", field="amount", n=3, aggs=["count", "mean", "min", "max"]
    )
    state: dict[str, Any] = {}
    out = [last_n_update(state, feature, float(x)) for x in [5, 1, 2, 3, 4]]
    assert [o["l_count"] for o in out] == [1.0, 2.0, 3.0, 3.0, 3.0]
    assert out[-1] == {"l_count": 3.0, "l_mean": 3.0, "l_min": 2.0, "l_max": 4.0}
    assert state["l"] == [2.0, 3.0, 4.0]


def test_entity_state_is_per_entity() -> None:
    spec = _spec(
        {
            "name": "w",
            "kind": "window",
            "field": "amount",
            "aggs": ["count"],
            "window": {"size_s": 600},
        },
        {"name": "l", "kind": "last_n", "field": "amount", "n": 2, "aggs": ["sum"]},
    )
    records = [
        _rec(T0_MS, "a", amount=1.0),
        _rec(T0_MS + 1, "b", amount=10.0),
        _rec(T0_MS + 2, "a", amount=2.0),
        _rec(T0_MS + 3, "a", amount=3.0),
    ]
    out = _run(spec, records)
    assert [v["w_count"] for v in out] == [1.0, 1.0, 2.0, 3.0]
    assert [v["l_sum"] for v in out] == [1.0, 10.0, 3.0, 5.0]


_in_order = st.lists(st.integers(min_value=0, max_value=20_000), min_size=1, max_size=40).map(
    lambda gaps: [T0_MS + sum(gaps[: i + 1]) for i in range(len(gaps))]
)


@settings(max_examples=200, deadline=None)
@given(times=_in_order, size_s=st.sampled_from([1, 5, 30, 60]))
def test_tumbling_count_equals_events_in_the_window(times: list[int], size_s: int) -> None:
    feature = _window("tumbling", size_s)
    size_ms = size_s * 1000
    state: dict[str, Any] = {}
    for i, t in enumerate(times):
        out = window_update(state, feature, t, 1.0)
        start = t - t % size_ms
        assert out["w_count"] == sum(1 for s in times[: i + 1] if start <= s <= t)
    assert json.loads(json.dumps(state)) == state


@settings(max_examples=200, deadline=None)
@given(
    times=_in_order,
    step_s=st.sampled_from([1, 2, 5]),
    steps=st.integers(min_value=1, max_value=6),
)
def test_hopping_count_equals_events_in_the_window(
    times: list[int], step_s: int, steps: int
) -> None:
    feature = _window("hopping", step_s * steps, step_s)
    size_ms, step_ms = step_s * steps * 1000, step_s * 1000
    state: dict[str, Any] = {}
    for i, t in enumerate(times):
        out = window_update(state, feature, t, float(i))
        end = t - t % step_ms + step_ms
        inside = [j for j, s in enumerate(times[: i + 1]) if end - size_ms <= s <= t]
        assert out["w_count"] == len(inside)
        assert out["w_sum"] == sum(inside)
        assert all(t - times[j] < size_ms for j in inside)


# --- selection ---------------------------------------------------------------------------


def _demo_data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((PIPELINES / "demo.yaml").read_text("utf-8"))
    return data


def _demo_vector(**changes: Any) -> Vector:
    data = _demo_data()
    data.update(changes)
    spec = parse_spec(data)
    example = next(synthetic.payments(1))
    record = validate(spec, orjson.dumps(example.record), Source("demo.raw", 0, 0, T0_MS))
    assert isinstance(record, Record)
    return Featurizer(spec).transform(record, GlobalState(), {})


def test_demo_exclude_drops_only_the_named_feature() -> None:
    vector = _demo_vector()
    assert "amount_x_risk" not in vector
    assert {"amount_log", "amount_z", "amount_per_item", "risk"} <= set(vector)
    assert sum(k.startswith("merchant=") for k in vector) == 1
    assert sum(k.startswith("device#") for k in vector) == 1


def test_exclude_drops_expansions() -> None:
    full = _demo_vector(exclude=[])
    vector = _demo_vector(exclude=["merchant", "device", "user_amount_1m", "t"])
    assert not [k for k in vector if k.startswith(("merchant=", "device#", "t_"))]
    assert not [k for k in vector if k.startswith("user_amount_1m_")]
    assert "user_amount_5m_sum" in vector and "user_last5_mean" in vector
    assert set(full) - set(vector) == {
        k for k in full if k.startswith(("merchant=", "device#", "t_", "user_amount_1m_"))
    }


def test_select_keeps_names_and_their_expansions() -> None:
    vector = _demo_vector(select=["merchant", "user_amount_5m", "country_freq"])
    assert sorted(k for k in vector if not k.startswith("merchant=")) == [
        "country_freq",
        "user_amount_5m_std",
        "user_amount_5m_sum",
    ]
    assert sum(k.startswith("merchant=") for k in vector) == 1


def test_select_then_exclude() -> None:
    vector = _demo_vector(select=["amount_log", "amount_z"], exclude=["amount_z"])
    assert list(vector) == ["amount_log"]


def test_exclude_a_feature_whose_name_prefixes_another() -> None:
    # "amount" and "amount_log" are two features; excluding one must keep the other
    spec = _spec(
        {"name": "amount", "kind": "numeric", "field": "amount"},
        {"name": "amount_log", "kind": "log1p", "field": "amount"},
        exclude=["amount"],
    )
    assert set(_run(spec, [_rec(amount=1.0)])[0]) == {"amount_log"}
    spec = _spec(
        {"name": "amount", "kind": "numeric", "field": "amount"},
        {"name": "amount_log", "kind": "log1p", "field": "amount"},
        select=["amount"],
    )
    assert set(_run(spec, [_rec(amount=1.0)])[0]) == {"amount"}


# --- state -------------------------------------------------------------------------------


def test_states_survive_a_json_round_trip() -> None:
    spec = load_spec(PIPELINES / "demo.yaml")
    records = []
    for i, example in enumerate(synthetic.payments(400, users=20, span_s=3600)):
        result = validate(spec, orjson.dumps(example.record), Source("demo.raw", 0, i, T0_MS))
        assert isinstance(result, Record)
        records.append(result)
    featurizer = Featurizer(spec)
    assert featurizer.needs_entity_state

    def run(round_trip_at: int | None) -> list[Vector]:
        global_state = GlobalState()
        entities: dict[str, dict[str, Any]] = {}
        out = []
        for i, record in enumerate(records):
            if i == round_trip_at:
                global_state = GlobalState(json.loads(json.dumps(global_state.data)))
                entities = json.loads(json.dumps(entities))
            state = entities.setdefault(record.entity_key, {})
            out.append(featurizer.transform(record, global_state, state))
        return out

    straight = run(None)
    assert straight == run(200)
    assert any(v["user_amount_1m_count"] > 1 for v in straight)  # windows did carry over


# --- validated records can always be featurized -------------------------------------------


@pytest.mark.parametrize(
    "ts",
    [
        1_767_225_600_000_000,  # epoch microseconds, a common producer mistake
        1e300,
        "0001-01-01T00:00:00+01:00",
        -1e15,
    ],
)
def test_every_record_validate_accepts_can_be_featurized(ts: Any) -> None:
    spec = load_spec(PIPELINES / "demo.yaml")
    example = next(synthetic.payments(1))
    assert isinstance(example.record, dict)
    payload = orjson.dumps({**example.record, "ts": ts})
    result = validate(spec, payload, Source("demo.raw", 0, 0, T0_MS))
    if isinstance(result, Record):  # else a dead letter: fine as well
        vector = Featurizer(spec).transform(result, GlobalState(), {})
        assert all(math.isfinite(v) for v in vector.values())


def test_a_huge_integer_in_an_unbounded_int_field_can_be_featurized() -> None:
    spec = load_spec(PIPELINES / "phishing.yaml")  # age_of_domain: {type: int}, no max
    first = next(synthetic.phishing())
    assert isinstance(first.record, dict)
    payload = orjson.dumps({**first.record, "age_of_domain": 0}).replace(
        b'"age_of_domain":0', b'"age_of_domain":' + b"9" * 400
    )
    result = validate(spec, payload, Source("phishing.raw", 0, 0, T0_MS))
    if isinstance(result, Record):  # else a dead letter: fine as well
        vector = Featurizer(spec).transform(result, GlobalState(), {})
        assert all(math.isfinite(v) for v in vector.values())

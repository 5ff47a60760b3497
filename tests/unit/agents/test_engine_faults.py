"""A record is data, never an exception: when a step raises on one record (featurize,
score, learn), that record becomes one dead letter naming the step and the exception, what
it had half-added is rolled back, and every other record of the batch is served as usual.

The engine's batch step runs here without a broker: records in, the outbox's queue out.
The faults are injected by making one step raise for one record (the steps themselves are
tested elsewhere); everything around them is the real code."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord

from streamml import telemetry
from streamml.agents.engine import PipelineEngine
from streamml.agents.runtime import Held, PartitionState, PipelineRuntime
from streamml.config import load_settings
from streamml.models.features import GlobalState
from streamml.models.online import OnlineLearner
from streamml.schemas.spec import parse_spec
from streamml.streams.outbox import Outbox

SPEC = parse_spec(
    {
        "name": "faults",
        "task": "classification",
        "schema": {"fields": {"x": {"type": "float"}}},
        "features": [{"kind": "numeric", "name": "x", "field": "x"}],
        "online_model": {"kind": "logistic_regression"},
    }
)


def _message(topic: str, offset: int, value: dict[str, Any]) -> ConsumerRecord[bytes, bytes]:
    data = orjson.dumps(value)
    return ConsumerRecord(topic, 0, offset, 1_000 + offset, 0, b"k", data, None, 1, len(data), [])


def _engine(tmp_path: Path) -> tuple[PipelineEngine, PartitionState]:
    settings = load_settings(state_dir=tmp_path)
    rt = PipelineRuntime.from_spec(SPEC, "app", 1, telemetry.setup(settings))
    state = PartitionState(0, OnlineLearner(SPEC), GlobalState())
    rt.states[0] = state
    return PipelineEngine(settings, rt), state


def _run(engine: PipelineEngine, state: PartitionState) -> list[dict[str, Any]]:
    """Events e0..e5 and the labels of e0..e2, interleaved; the outbox's records back."""
    raw, labels = engine.rt.topics["raw"], engine.rt.topics["labels"]
    ready = []
    for i in range(6):
        ready.append(_message(raw, i, {"event_id": f"e{i}", "x": float(i)}))
        if i < 3:
            ready.append(_message(labels, i, {"event_id": f"e{i}", "label": i % 2 == 0}))
    held = [
        Held((m.timestamp, n, 0, m.offset), m.topic == labels, m, 0.0) for n, m in enumerate(ready)
    ]
    out = Outbox(object())  # type: ignore[arg-type]  # nothing is sent here
    outcomes: Counter[tuple[str, str]] = Counter()
    engine._apply(state, held, out, outcomes, {"ingest": 0.0, "score": 0.0, "learn": 0.0})
    sent = []
    for (topic, _), records in out._records.items():
        for key, value, _ in records:
            sent.append({"topic": topic, "key": key, "value": value})
    return sent


def _by_topic(sent: list[dict[str, Any]], engine: PipelineEngine, role: str) -> list[Any]:
    return [orjson.loads(r["value"]) for r in sent if r["topic"] == engine.rt.topics[role]]


@pytest.mark.parametrize("step", ["featurize", "score", "learn"])
def test_a_step_raising_on_one_record_makes_one_dead_letter_and_the_rest_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    engine, state = _engine(tmp_path)
    rt = engine.rt
    if step == "featurize":
        real = rt.featurizer.transform

        def transform(record: Any, *args: Any) -> Any:
            if record.event_id == "e1":
                raise ZeroDivisionError("boom")
            return real(record, *args)

        monkeypatch.setattr(rt.featurizer, "transform", transform)
    elif step == "score":
        real_predict = state.learner.predict

        def predict(x: dict[str, float]) -> Any:
            if x["x"] == 1.0:
                raise OverflowError("boom")
            return real_predict(x)

        monkeypatch.setattr(state.learner, "predict", predict)
    else:
        real_learn = state.learner.learn
        calls = []

        def learn(*args: Any) -> None:
            calls.append(args)
            if len(calls) == 2:  # the label of e1
                raise ValueError("boom")
            real_learn(*args)

        monkeypatch.setattr(state.learner, "learn", learn)
    sent = _run(engine, state)
    letters = _by_topic(sent, engine, "dlq")
    assert [d["error_class"] for d in letters] == [f"{step}_failed"]
    assert "boom" in letters[0]["reason"]
    letter_topic = rt.topics["labels"] if step == "learn" else rt.topics["raw"]
    assert (letters[0]["topic"], letters[0]["offset"]) == (letter_topic, 1)
    served = {p["event_id"] for p in _by_topic(sent, engine, "predictions")}
    features = {f["event_id"] for f in _by_topic(sent, engine, "features")}
    if step == "learn":  # the event was served; its label is the dead letter
        assert served == features == {f"e{i}" for i in range(6)}
    else:  # nothing half-sent for e1: no features without a prediction
        assert served == features == {f"e{i}" for i in range(6) if i != 1}
    assert engine.breaker.failed[f"{step}_failed"] == 1  # the circuit breaker hears of it


def test_the_breaker_opens_on_a_flood_and_says_so(tmp_path: Path) -> None:
    engine, _ = _engine(tmp_path)
    engine.rt.failures["malformed_json"] = 80
    engine._breaker_count(100)
    trips = engine.breaker.roll(time.monotonic() + engine.settings.breaker_window_s)
    out = Outbox(object())  # type: ignore[arg-type]
    engine._report_trips(trips, out)
    [(_, records)] = out._records.items()
    event = orjson.loads(records[0][1])
    assert event["action"] == "alert"
    assert event["details"]["rule"] == "breaker:malformed_json"
    assert event["details"]["state"] == "firing"
    assert engine.health()["breaker_open"] == ["malformed_json"]

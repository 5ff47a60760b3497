"""Control events: what a worker publishes is what every other worker reads back, and
anything that is not a streamml control event is refused rather than acted on."""

from __future__ import annotations

import orjson
import pytest

from streamml.schemas.control import ACTIONS, DEPLOYMENT_ACTIONS, ControlEvent


def test_an_event_survives_the_round_trip_with_its_details_and_model_row() -> None:
    event = ControlEvent.new(
        "demo",
        "promoted",
        version="v2",
        previous="v1",
        reason="roc_auc +0.04",
        details={"metrics": {"roc_auc": 0.91}, "rows": 3000, "window": [1, 2]},
        model={"pipeline": "demo", "version": "v2", "stage": "champion", "features": ["a"]},
    )

    back = ControlEvent.from_json(event.to_json())

    assert back == event
    assert back.details["metrics"] == {"roc_auc": 0.91}
    assert back.model is not None and back.model["features"] == ["a"]


def test_new_events_get_an_id_a_time_and_an_actor() -> None:
    first = ControlEvent.new("demo", "trained")
    second = ControlEvent.new("demo", "trained")

    assert first.event_id != second.event_id and len(first.event_id) == 32
    assert first.ts_ms > 1_600_000_000_000 and first.actor
    assert ControlEvent.new("demo", "alert", actor="ci").actor == "ci"


def test_only_deployment_actions_ask_scorers_to_reload() -> None:
    assert ControlEvent.new("demo", "rolled_back").changes_deployment
    assert ControlEvent.new("demo", "challenger_set").changes_deployment
    # a refusal must not trigger another reload (it would loop), nor training steps
    for action in ("model_refused", "trained", "evaluated", "drift_detected"):
        assert not ControlEvent.new("demo", action).changes_deployment, action
    assert DEPLOYMENT_ACTIONS <= ACTIONS


def test_an_unknown_action_is_refused_when_made_and_when_read() -> None:
    with pytest.raises(ValueError, match="unknown control action 'deleted'"):
        ControlEvent.new("demo", "deleted")
    payload = ControlEvent.new("demo", "promoted").to_json()
    forged = payload.replace(b'"promoted"', b'"deleted"')
    with pytest.raises(ValueError, match="not a streamml control event"):
        ControlEvent.from_json(forged)


@pytest.mark.parametrize(
    "payload",
    [b"", b"{", b'{"action": "promoted"', b"not json", b"\xff\xfe"],
    ids=["empty", "open-brace", "truncated", "text", "binary"],
)
def test_malformed_json_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        ControlEvent.from_json(payload)


@pytest.mark.parametrize("value", [[1, 2], "promoted", 42, None, {"pipeline": "demo"}], ids=repr)
def test_json_that_is_not_an_event_object_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="not a streamml control event"):
        ControlEvent.from_json(orjson.dumps(value))


def test_fields_from_a_newer_writer_are_ignored() -> None:
    event = ControlEvent.new("demo", "archived", version="v3")
    data = orjson.loads(event.to_json()) | {"added_later": True}

    assert ControlEvent.from_json(orjson.dumps(data)) == event

"""Retraining policy (cooldown, de-duplication, busy, kinds, schedule) and promotion."""

from __future__ import annotations

from typing import Any

from streamml.models.policy import RetrainPolicy
from streamml.schemas.spec import PipelineSpec, parse_spec


def _spec(**retrain: Any) -> PipelineSpec:
    return parse_spec(
        {
            "name": "t",
            "task": "classification",
            "schema": {"fields": {"x": {"type": "float"}}},
            "features": [{"name": "x", "kind": "numeric", "field": "x"}],
            "online_model": {"kind": "logistic_regression"},
            "drift": {"concept": {}, "data": {}},
            "retrain": {"cooldown_s": 120, "last_events": 4000, **retrain},
        }
    )


# --- RetrainPolicy -------------------------------------------------------------------------


def test_a_burst_of_detections_within_the_cooldown_retrains_once() -> None:
    policy = RetrainPolicy(_spec())
    # 20 detections in 60 s, e.g. every partition seeing the same drift, some re-delivered
    decisions = [policy.on_drift("concept", 1_000_000 + 500 * i, 100.0 + 3 * i) for i in range(20)]
    accepted = [d for d in decisions if d.retrain]
    assert len(accepted) == 1 and decisions[0].retrain
    assert (accepted[0].since_ms, accepted[0].last_events) == (1_000_000, 4000)
    assert all("cooling down" in d.reason for d in decisions[1:])


def test_the_cooldown_expires_and_allows_the_next_retrain() -> None:
    policy = RetrainPolicy(_spec())
    assert policy.on_drift("concept", 1000, now_s=0.0).retrain
    assert not policy.on_drift("concept", 2000, now_s=119.0).retrain
    assert policy.on_drift("concept", 3000, now_s=120.0).retrain


def test_no_retrain_while_busy() -> None:
    policy = RetrainPolicy(_spec(cooldown_s=0))
    assert policy.on_drift("concept", 1000, 0.0).retrain
    policy.started(1.0)
    assert policy.busy
    refused = policy.on_drift("concept", 2000, 500.0)
    assert not refused.retrain and "in flight" in refused.reason
    assert not policy.on_manual(500.0).retrain
    policy.finished(600.0, challenger="v7")
    assert policy.busy  # the challenger it produced is under evaluation
    refused = policy.on_drift("concept", 3000, 700.0)
    assert not refused.retrain and "v7" in refused.reason
    policy.challenger_resolved()
    assert not policy.busy
    assert policy.on_drift("concept", 4000, 800.0).retrain


def test_a_retrain_that_deployed_nothing_frees_the_policy() -> None:
    policy = RetrainPolicy(_spec(cooldown_s=0))
    policy.started(0.0)
    policy.finished(10.0, challenger=None)  # e.g. too few labelled rows
    assert not policy.busy and policy.on_drift("concept", 1, 11.0).retrain


def test_the_same_or_an_older_drift_point_is_not_retrained_twice() -> None:
    policy = RetrainPolicy(_spec(cooldown_s=0))
    assert policy.on_drift("concept", 5000, 0.0).retrain
    again = policy.on_drift("concept", 5000, 1000.0)
    assert not again.retrain and "already handled" in again.reason
    assert not policy.on_drift("concept", 4000, 2000.0).retrain
    assert policy.on_drift("concept", 6000, 3000.0).retrain


def test_only_the_kinds_in_the_spec_retrain() -> None:
    policy = RetrainPolicy(_spec())
    refused = policy.on_drift("data", 1000, 0.0)
    assert not refused.retrain and "retrain.kinds" in refused.reason
    # a refused request does not start the cooldown
    assert policy.on_drift("concept", 1000, 1.0).retrain
    both = RetrainPolicy(_spec(kinds=["concept", "data"]))
    assert both.on_drift("data", 1000, 0.0).retrain


def test_retraining_on_drift_can_be_switched_off() -> None:
    policy = RetrainPolicy(_spec(on_drift=False))
    decision = policy.on_drift("concept", 1000, 0.0)
    assert not decision.retrain and "on_drift" in decision.reason


def test_since_drift_off_trains_on_the_last_events_only() -> None:
    decision = RetrainPolicy(_spec(since_drift=False)).on_drift("concept", 1000, 0.0)
    assert decision.retrain and decision.since_ms is None and decision.last_events == 4000


def test_a_manual_request_passes_cooldown_and_evaluation_but_not_a_running_retrain() -> None:
    policy = RetrainPolicy(_spec())
    assert policy.on_drift("concept", 1000, 0.0).retrain
    manual = policy.on_manual(1.0)  # within the cooldown
    assert manual.retrain and manual.since_ms is None
    policy.started(2.0)
    policy.finished(3.0, challenger="v2")
    assert policy.on_manual(4.0).retrain  # a challenger under evaluation does not block it


def test_schedule() -> None:
    assert not RetrainPolicy(_spec()).scheduled_due(1e9).retrain  # no interval_s
    policy = RetrainPolicy(_spec(interval_s=3600))
    assert not policy.scheduled_due(100.0).retrain  # the clock starts at the first call
    assert not policy.scheduled_due(3699.0).retrain
    due = policy.scheduled_due(3700.0)
    assert due.retrain and due.since_ms is None
    policy.started(3700.0)
    assert not policy.scheduled_due(9000.0).retrain  # in flight
    policy.finished(3800.0, challenger=None)
    assert not policy.scheduled_due(7299.0).retrain  # counted from the last start
    assert policy.scheduled_due(7300.0).retrain

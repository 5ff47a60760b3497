"""Alert rules: fire once, resolve once, respect min_events, readable messages."""

from __future__ import annotations

import math

import pytest

from streamml.models.alerts import AlertBook, breached
from streamml.schemas.operations import AlertRule

ACCURACY = AlertRule(
    name="low_accuracy", metric="accuracy", op="below", threshold=0.6, window_s=120
)
LAG = AlertRule(name="lag", metric="consumer_lag", op="above", threshold=20000, min_events=0)


def test_a_rule_fires_once_and_resolves_once() -> None:
    book = AlertBook([ACCURACY])
    values = [0.8, 0.7, 0.55, 0.5, 0.52, 0.58, 0.65, 0.7, 0.9]
    transitions = [t for v in values if (t := book.update("low_accuracy", v, n=200))]
    assert [(t.state, t.value) for t in transitions] == [("firing", 0.55), ("resolved", 0.65)]
    assert book.firing == []


def test_the_transition_says_what_happened_in_one_line() -> None:
    book = AlertBook([ACCURACY])
    fired = book.update("low_accuracy", 0.52, n=340)
    assert fired is not None
    assert fired.message == "accuracy 0.52 below 0.6 over the last 120 s (n=340)"
    assert (fired.rule, fired.metric, fired.op, fired.threshold, fired.window_s) == (
        "low_accuracy",
        "accuracy",
        "below",
        0.6,
        120.0,
    )
    resolved = book.update("low_accuracy", 0.71, n=400)
    assert resolved is not None
    assert resolved.message == "accuracy 0.71 no longer below 0.6 over the last 120 s (n=400)"


def test_too_few_events_or_no_value_change_nothing() -> None:
    book = AlertBook([ACCURACY])  # min_events 50 by default
    assert book.update("low_accuracy", 0.1, n=49) is None
    assert book.update("low_accuracy", None, n=1000) is None
    assert book.firing == []
    assert book.update("low_accuracy", 0.1, n=50) is not None
    # a thin window while firing does not resolve it either
    assert book.update("low_accuracy", 0.99, n=3) is None
    assert book.firing == ["low_accuracy"]


def test_rules_are_tracked_separately_and_listed_in_declaration_order() -> None:
    book = AlertBook([ACCURACY, LAG])
    assert book.update("lag", 25000, n=0) is not None
    assert book.update("low_accuracy", 0.3, n=500) is not None
    assert book.firing == ["low_accuracy", "lag"]
    lag = book.update("lag", 150, n=0)
    assert lag is not None and lag.state == "resolved" and book.firing == ["low_accuracy"]
    assert lag.message == "consumer_lag 150 no longer above 20000 over the last 300 s (n=0)"


def test_breached_is_strict_and_nan_never_breaches() -> None:
    assert breached(LAG, 20001) and not breached(LAG, 20000)
    assert breached(ACCURACY, 0.59) and not breached(ACCURACY, 0.6)
    assert not breached(ACCURACY, math.nan) and not breached(LAG, math.nan)


def test_an_unknown_rule_is_an_error() -> None:
    with pytest.raises(KeyError, match="low_acc"):
        AlertBook([ACCURACY]).update("low_acc", 0.1, n=100)

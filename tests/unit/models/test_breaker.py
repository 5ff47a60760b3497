"""The circuit breaker trips on a cause's share of a window, never below min_records."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamml.models.breaker import Breaker


@given(
    ok=st.integers(0, 500),
    bad=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(1, 500), max_size=3),
    ratio=st.floats(0.01, 1.0),
    min_records=st.integers(1, 300),
)
def test_a_window_trips_exactly_the_causes_over_the_ratio(
    ok: int, bad: dict[str, int], ratio: float, min_records: int
) -> None:
    breaker = Breaker(window_s=10, ratio=ratio, min_records=min_records)
    breaker.count(0.0, None, ok)
    for cause, n in bad.items():
        breaker.count(1.0, cause, n)
    assert breaker.roll(5.0) == []  # the window is not over yet
    total = ok + sum(bad.values())
    fired = {t.cause for t in breaker.roll(10.0) if t.state == "firing"}
    if total < min_records:
        assert fired == set()
    else:
        assert fired == {c for c, n in bad.items() if n > ratio * total}
    assert breaker.open == fired


def test_an_open_cause_stays_open_until_a_window_is_below_the_ratio() -> None:
    breaker = Breaker(window_s=1, ratio=0.5, min_records=2)
    breaker.count(0.0, "x", 10)
    assert [t.state for t in breaker.roll(1.0)] == ["firing"]
    breaker.count(2.0, "x", 10)
    assert breaker.roll(3.0) == []  # still firing: said once
    breaker.count(4.0, None, 10)
    breaker.count(4.0, "x", 1)
    trips = breaker.roll(5.0)
    assert [(t.cause, t.state, t.failed, t.total) for t in trips] == [("x", "resolved", 1, 11)]
    assert breaker.open == set()

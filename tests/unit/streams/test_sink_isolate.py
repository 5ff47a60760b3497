"""Isolating the rows ClickHouse refuses: bisection over a stand-in writer (pure core)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamml.errors import WarehouseRefusedError
from streamml.streams.warehouse import isolate_refused


@given(
    st.integers(0, 300).flatmap(
        lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0)), max_size=n))
    )
)
def test_exactly_the_refused_rows_are_left_out_and_the_rest_written_once(
    case: tuple[int, set[int]],
) -> None:
    n, bad = case
    written: list[int] = []
    calls = 0

    def write(part: Sequence[int]) -> None:
        nonlocal calls
        calls += 1
        if bad & set(part):
            raise WarehouseRefusedError("refused", reason=f"row {min(bad & set(part))}")
        written.extend(part)

    refused = isolate_refused(range(n), write)
    assert sorted(r.index for r in refused) == sorted(bad)
    assert all(r.reason == f"row {r.index}" for r in refused)
    assert sorted(written) == [i for i in range(n) if i not in bad]  # each once
    if len(bad) == 1:
        assert calls <= 2 * n.bit_length() + 1  # one bad row costs ~2 log2(n) writes


def test_an_outage_during_isolation_is_raised_not_taken_for_a_refusal() -> None:
    def write(part: Sequence[int]) -> None:
        if len(part) < 4:
            raise ConnectionError("server went away")
        raise WarehouseRefusedError("refused", reason="bad")

    with pytest.raises(ConnectionError):  # propagates, so the whole batch is retried
        isolate_refused(range(8), write)

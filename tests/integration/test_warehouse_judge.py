"""The trainer's judge on real chDB: a change confirmed and dated from served errors, and
the paired review of deployed models, over rows written as the sink writes them.

It opens the session's chDB in this process, which then cannot open another path: like
test_warehouse.py, it must run after the modules whose own workers or lifecycle calls open
theirs (pytest runs modules in name order)."""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator

import pytest

from streamml import sql
from streamml.agents import judge
from streamml.config import Settings
from streamml.recovery import analyse
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.spec import PipelineSpec
from streamml.streams.rows import LABEL_COLUMNS, PREDICTION_COLUMNS
from streamml.streams.warehouse import Warehouse
from streamml.testing import temporary_warehouse

from .test_pipeline import ROOT

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
N, CHANGE = 3000, 2000


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    [found] = load_pipelines(ROOT / "pipelines", ["demo"])
    return found


@pytest.fixture
def warehouse(stack_settings: Settings, session_warehouse: Warehouse) -> Iterator[Warehouse]:
    with temporary_warehouse(stack_settings, "t_judge") as wh:
        yield wh


def _ts(i: int) -> dt.datetime:
    return T0 + dt.timedelta(milliseconds=50 * i)


LATE = 2500


def _write(wh: Warehouse, models: dict[str, tuple[float, ...]], served: str) -> None:
    """N labelled events (ids ``e-<i>``); each model is right with probability (before,
    after[, late]) the change at CHANGE (and from LATE on); ``served`` answered, the others
    shadowed."""
    rng = random.Random(3)
    predictions, labels = [], []
    for i in range(N):
        truth = rng.random() < 0.3
        labels.append(("demo", f"e-{i}", "u", _ts(i), str(truth), float(truth)))
        for version, rates in models.items():
            late = rates[2] if len(rates) > 2 else rates[1]
            before, after = rates[0], rates[1] if i < LATE else late
            right = rng.random() < (before if i < CHANGE else after)
            said = truth if right else not truth
            score = (0.6 + 0.35 * rng.random()) if said else 0.4 * rng.random()
            predictions.append(
                (
                    "demo",
                    f"e-{i}",
                    "u",
                    _ts(i),
                    "m",
                    version,
                    "champion" if version == served else "shadow",
                    int(version == served),
                    score,
                    str(said),
                    {},
                    0.1,
                    1.0,
                    "",
                )
            )
    wh.insert("predictions", predictions, PREDICTION_COLUMNS)
    wh.insert("labels", labels, LABEL_COLUMNS)


def test_a_rise_of_the_served_error_is_confirmed_and_dated_after_the_change(
    warehouse: Warehouse, spec: PipelineSpec
) -> None:
    _write(warehouse, {"v1": (0.92, 0.6), "online": (0.9, 0.85)}, served="v1")
    found = judge.confirm_change(spec, warehouse.query, 0, 4000)
    assert found.confirmed and found.change_ts_ms is not None, found.reason
    index = (found.change_ts_ms - int(T0.timestamp() * 1000)) / 50
    assert CHANGE <= index <= CHANGE + 200, found.reason  # dated just after, never before
    assert found.point is not None and found.point.after > found.point.before


def test_a_stationary_served_error_is_not_confirmed(
    warehouse: Warehouse, spec: PipelineSpec
) -> None:
    _write(warehouse, {"v1": (0.9, 0.9)}, served="v1")
    found = judge.confirm_change(spec, warehouse.query, 0, 4000)
    assert not found.confirmed and found.change_ts_ms is None, found.reason


def test_the_review_promotes_the_model_that_is_better_on_the_same_events(
    warehouse: Warehouse, spec: PipelineSpec
) -> None:
    _write(
        warehouse,
        {"v1": (0.92, 0.6), "online": (0.9, 0.86), "v2": (0.5, 0.7)},
        served="v1",
    )
    since = int(_ts(CHANGE).timestamp() * 1000)
    result = judge.review(spec, warehouse.query, "v1", ["online", "v2"], since, 4000)
    assert result.events == N - CHANGE
    assert result.promote is not None and result.promote.version == "online", result.summary
    assert result.verdicts["v2"].action in ("promote", "keep")  # better, but not the best
    # churn: a promotion also needs min_labeled_events judged after the last promotion
    late = judge.review(
        spec, warehouse.query, "v1", ["online"], since, 4000, int(_ts(N - 10).timestamp() * 1000)
    )
    assert late.promote is None and late.verdicts["online"].action == "wait"


def test_a_worse_candidate_cannot_win(warehouse: Warehouse, spec: PipelineSpec) -> None:
    _write(warehouse, {"v1": (0.9, 0.9), "v2": (0.6, 0.6)}, served="v1")
    result = judge.review(spec, warehouse.query, "v1", ["v2"], 0, 4000)
    assert result.promote is None
    verdict = result.verdicts["v2"]
    assert judge.cannot_win(verdict, "v2", spec.promotion.min_delta), verdict.reason


def test_recovery_reads_what_was_served(warehouse: Warehouse) -> None:
    _write(warehouse, {"v1": (0.95, 0.6), "online": (0.9, 0.97)}, served="v1")
    rows = sql.run(warehouse.query, sql.served_rows("demo", "e-")).rows
    typed = [(int(i), str(v), int(s), str(c), str(lab)) for i, v, s, c, lab in rows]
    result = analyse(typed, N, CHANGE)
    after = result.phase("right after it")
    assert after.served == pytest.approx(0.6, abs=0.05)
    assert after.best_shadow == "online" and after.best_shadow_accuracy > 0.9
    assert result.recovery_events is None  # v1 served throughout and never recovered


def test_of_two_qualifying_candidates_the_better_on_common_events_wins(
    warehouse: Warehouse, spec: PipelineSpec
) -> None:
    """A fresh model exists only for the latest events, where the champion is at its worst,
    so its bound against the champion is the widest; the online model is better on the
    events both scored, and it is the one promoted."""
    models = {"v1": (0.92, 0.85, 0.4), "online": (0.9, 0.9), "fresh": (0.5, 0.8)}
    _write(warehouse, models, "v1")
    warehouse.command(
        "ALTER TABLE predictions DELETE WHERE model_version = 'fresh' "
        f"AND toUInt64(substring(event_id, 3)) < {LATE}"
    )
    since = int(_ts(CHANGE).timestamp() * 1000)
    result = judge.review(spec, warehouse.query, "v1", ["fresh", "online"], since, 4000)
    assert {v for v, d in result.verdicts.items() if d.action == "promote"} == {"fresh", "online"}
    assert result.promote is not None and result.promote.version == "online", result.summary
    lows = {v: judge._low(d, v) for v, d in result.verdicts.items()}
    assert lows["fresh"] > lows["online"]  # the highest bound alone would pick the fresh one

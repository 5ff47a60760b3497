"""judge: is a drift real and where did it start; which model should serve.

Both read what was served from ClickHouse -- the predictions each model made when the
event arrived, joined with the labels that came later -- and hand the numbers to the pure
cores (:func:`streamml.models.drift.latest_rise`, :func:`streamml.models.decision.decide`).

* :func:`confirm_change`: a detector fired on one partition; over the served model's errors
  on every partition's latest labelled events, a CUSUM change-point test says whether the
  error rose significantly and at which event the latest rise began (a split that lands
  on an earlier, milder rise is tested again on what follows it).
* :func:`review`: every model deployed now (champion, batch challengers, the online model)
  is compared with the champion on the same labelled events since the change, by a paired
  bootstrap, and with the trivial baseline on those events.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from streamml import sql
from streamml.models.decision import Outputs, ServingDecision, decide, metric_value
from streamml.models.drift import ChangePoint, latest_rise
from streamml.models.online import positive_label
from streamml.schemas.spec import PipelineSpec

Query = sql.Runner
CONFIRM_ALPHA = 1e-4  # a change is confirmed when the CUSUM p-value is below this
MIN_SEGMENT = 50  # labelled events on each side of a change point
# The dated change moves this many labelled events past the CUSUM estimate, whose error is
# a few dozen events when the error jumps (measured: up to ~120 early on a 0.08 -> 0.4 rise
# in 50 simulations): a retrain window should hold no event of the old regime.
SAFETY_EVENTS = 100


def _error(spec: PipelineSpec, predicted: str, score: float, label: str, value: float) -> float:
    if spec.task == "classification":
        return 0.0 if predicted == label else 1.0
    return abs(score - value)


@dataclass(frozen=True)
class Confirmation:
    confirmed: bool
    change_ts_ms: int | None  # event time of the first event after the change point
    reason: str
    point: ChangePoint | None = None
    events: int = 0


def confirm_change(
    spec: PipelineSpec, query: Query, since_ms: int, last_events: int
) -> Confirmation:
    """Test the served model's errors on the latest ``last_events`` labelled events with
    event time at or after ``since_ms`` for one rise of the error (all partitions, in event
    time order), dated at the latest significant rise."""
    rows = sql.run(query, sql.served_errors(spec.name, since_ms, last_events)).rows
    rows = list(reversed(rows))
    errors = [_error(spec, str(c), float(s), str(lab), float(v)) for _, c, s, lab, v in rows]
    point = latest_rise(errors, MIN_SEGMENT, CONFIRM_ALPHA)
    if point is None:
        return Confirmation(False, None, f"{len(errors)} labelled events: too few to test", None)
    where = f"error {point.before:.3f} -> {point.after:.3f} at event {point.index} of " + (
        f"{len(errors)} (CUSUM {point.statistic:.2f}, p={point.p_value:.2g})"
    )
    if point.p_value >= CONFIRM_ALPHA or point.after <= point.before:
        return Confirmation(False, None, f"not confirmed: {where}", point, len(errors))
    change_ts = int(rows[min(point.index + SAFETY_EVENTS, len(rows) - 1)][0])
    return Confirmation(True, change_ts, f"confirmed: {where}", point, len(errors))


@dataclass
class Review:
    """The verdict on each deployed candidate (one paired comparison each)."""

    champion: str
    events: int
    promote: ServingDecision | None = None  # the best candidate that qualified
    below_baseline: ServingDecision | None = None
    verdicts: dict[str, ServingDecision] = field(default_factory=dict)
    newest_ts_ms: int = 0

    @property
    def summary(self) -> str:
        parts = [f"{v}: {d.action} ({d.reason})" for v, d in self.verdicts.items()]
        return f"champion {self.champion} on {self.events} labelled events; " + "; ".join(parts)


def review(
    spec: PipelineSpec,
    query: Query,
    champion: str,
    candidates: Sequence[str],
    since_ms: int,
    max_events: int,
    fresh_after_ms: int = 0,
) -> Review:
    """Each candidate against the champion on the latest ``max_events`` labelled events
    (event time at or after ``since_ms``) that the champion scored, those it scored too:
    a model that adapts is judged on what it does now. A promotion also needs
    ``promotion.min_labeled_events`` of those after ``fresh_after_ms`` (the last
    promotion), which bounds churn."""
    promo = spec.promotion
    versions = [champion, *candidates]
    recent = 2 * int(max_events) + 1000
    found = sql.judged_predictions(spec.name, versions, since_ms, recent)
    rows = sql.run(query, found).rows
    by_event: dict[str, dict[str, tuple[str, float]]] = {}
    meta: dict[str, tuple[int, str, float]] = {}
    for event_id, version, ts, predicted, score, label, value in rows:
        by_event.setdefault(str(event_id), {})[str(version)] = (str(predicted), float(score))
        meta[str(event_id)] = (int(ts), str(label), float(value))
    result = Review(champion, 0, newest_ts_ms=max((m[0] for m in meta.values()), default=0))
    positive = str(positive_label(spec.label.positive)) if spec.task == "classification" else None
    regression = spec.task == "regression"
    # the window: the latest max_events labelled events the champion scored, the same
    # events for every candidate (a candidate deployed later is judged on its part of it)
    window = sorted(
        (e for e, models in by_event.items() if champion in models), key=lambda e: (meta[e][0], e)
    )[-int(max_events) :]
    for candidate in candidates:
        ids = [e for e in window if candidate in by_event[e]]
        fresh = sum(1 for e in ids if meta[e][0] > fresh_after_ms)
        result.events = max(result.events, len(ids))
        labels: list[str] | list[float]
        labels = [meta[e][2] for e in ids] if regression else [meta[e][1] for e in ids]

        decision = decide(
            _outputs(champion, "champion", ids, by_event),
            [_outputs(candidate, "candidate", ids, by_event)],
            labels,
            metric=promo.metric,
            lower_is_better=promo.lower_is_better,
            min_delta=promo.min_delta,
            min_labeled_events=promo.min_labeled_events,
            positive=positive,
            task=spec.task,
        )
        if decision.action == "promote" and fresh < promo.min_labeled_events:
            decision = ServingDecision(
                "wait",
                champion,
                f"{fresh} of {promo.min_labeled_events} labelled events since the last "
                f"promotion ({decision.reason})",
                decision.table,
            )
        result.verdicts[candidate] = decision
        if decision.action == "keep_below_baseline":
            result.below_baseline = decision
    qualified = [v for v, d in result.verdicts.items() if d.action == "promote"]
    if qualified:
        best = _best(spec, result.verdicts, qualified, by_event, meta, regression)
        result.promote = result.verdicts[best]
    return result


def _best(
    spec: PipelineSpec,
    verdicts: dict[str, ServingDecision],
    qualified: list[str],
    by_event: dict[str, dict[str, tuple[str, float]]],
    meta: dict[str, tuple[int, str, float]],
    regression: bool,
) -> str:
    """Of several candidates that qualified, the best on the labelled events all of them
    scored (each was judged against the champion on its own events: a fresh model only
    has the latest ones). Too few common events: the highest lower bound decides."""
    if len(qualified) == 1:
        return qualified[0]
    promo = spec.promotion
    common = [e for e, models in by_event.items() if all(v in models for v in qualified)]
    if len(common) < promo.min_labeled_events:
        return max(qualified, key=lambda v: _low(verdicts[v], v))
    labels = [meta[e][2] for e in common] if regression else [meta[e][1] for e in common]
    positive = str(positive_label(spec.label.positive)) if not regression else None
    values = {}
    for version in qualified:
        out = _outputs(version, "candidate", common, by_event)
        values[version] = metric_value(promo.metric, labels, out, positive)
    sign = -1.0 if promo.lower_is_better else 1.0
    return max(qualified, key=lambda v: sign * values[v])


def _outputs(
    version: str, role: str, ids: list[str], by_event: dict[str, dict[str, tuple[str, float]]]
) -> Outputs:
    """What ``version`` predicted for the events ``ids``, in that order."""
    return Outputs(
        version,
        role,
        np.array([by_event[e][version][1] for e in ids], dtype=np.float64),
        [by_event[e][version][0] for e in ids],
    )


def _vs_champion(decision: ServingDecision, version: str) -> tuple[float, float] | None:
    """The (low, high) bounds of ``version``'s gain over the champion in a verdict."""
    row = next((r for r in decision.table if r.version == version), None)
    return None if row is None else (row.vs_champion.low, row.vs_champion.high)


def _low(decision: ServingDecision, version: str) -> float:
    bounds = _vs_champion(decision, version)
    return -math.inf if bounds is None else bounds[0]


def cannot_win(decision: ServingDecision, version: str, min_delta: float) -> bool:
    """The candidate's upper bound against the champion does not reach ``min_delta``."""
    bounds = _vs_champion(decision, version)
    return bounds is not None and math.isfinite(bounds[1]) and bounds[1] <= min_delta

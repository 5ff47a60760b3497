"""When to retrain, and whether a retrained challenger replaces the champion.

:class:`RetrainPolicy` turns drift detections, a schedule and manual requests into at
most one retrain at a time; :func:`judge_challenger` decides a challenger's fate from
the labelled scores both models earned while serving side by side. Pure: the caller
passes the clock (``now_s``, any monotonic seconds) and acts on the decisions.

>>> from streamml.schemas.operations import PromotionSpec
>>> rule = PromotionSpec(metric="accuracy", min_delta=0.01, min_labeled_events=100)
>>> judge_challenger(RoleScore("v1", "accuracy", 0.80, 500),
...                  RoleScore("v2", "accuracy", 0.85, 500), rule).action
'promote'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from streamml.errors import ModelError
from streamml.schemas.operations import PromotionSpec
from streamml.schemas.spec import PipelineSpec


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str
    since_ms: int | None  # train on events from here (the drift point) when retrain.since_drift
    last_events: int  # ... and on at most this many of the latest labelled events


class RetrainPolicy:
    """When to retrain: drift (kinds per spec) with a cooldown and de-duplication, a
    schedule, or a manual request.

    A drift request is refused while a retrain is in flight or a challenger it produced
    is under evaluation (:attr:`busy`), within ``retrain.cooldown_s`` of the last
    accepted request, for kinds not in ``retrain.kinds`` (or with ``on_drift`` off), and
    when its drift point is not later than the drift point of the last accepted drift
    request (the same drift reported again, or by another partition: that retrain
    already trains on the events since). The caller reports the retrain's life with
    :meth:`started`, :meth:`finished` and :meth:`challenger_resolved`.
    """

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec.retrain
        self._in_flight = False
        self._challenger: str | None = None
        self._last_request_s: float | None = None
        self._last_drift_ms: int | None = None
        self._last_started_s: float | None = None
        self._start_s: float | None = None  # the first time the policy was asked

    @property
    def busy(self) -> bool:
        """A retrain runs, or the challenger it deployed awaits its verdict."""
        return self._in_flight or self._challenger is not None

    def on_drift(self, kind: str, drift_ts_ms: int, now_s: float) -> RetrainDecision:
        """Retrain because a ``kind`` drift was detected at event time ``drift_ts_ms``?"""
        self._clock(now_s)
        if not self.spec.on_drift:
            why: str | None = "retraining on drift is off (retrain.on_drift)"
        elif kind not in self.spec.kinds:
            why = f"{kind} drift does not trigger retraining (retrain.kinds: {self.spec.kinds})"
        else:
            why = self._refusal()
        last = self._last_drift_ms
        if why is None and last is not None and drift_ts_ms <= last:
            why = f"{kind} drift at {drift_ts_ms} is not after the drift already handled ({last})"
        if why is None and self._last_request_s is not None:
            ago, cooldown = now_s - self._last_request_s, self.spec.cooldown_s
            if ago < cooldown:
                why = f"cooling down: {ago:.0f} s since the last request (< {cooldown:g} s)"
        if why is not None:
            return self._no(why)
        self._last_request_s, self._last_drift_ms = now_s, drift_ts_ms
        since = drift_ts_ms if self.spec.since_drift else None
        return RetrainDecision(True, f"{kind} drift at {drift_ts_ms}", since, self.spec.last_events)

    def on_manual(self, now_s: float) -> RetrainDecision:
        """A person asked for a retrain: accepted unless one is in flight."""
        self._clock(now_s)
        if self._in_flight:
            return self._no("a retrain is in flight")
        self._last_request_s = now_s
        return RetrainDecision(True, "requested", None, self.spec.last_events)

    def scheduled_due(self, now_s: float) -> RetrainDecision:
        """Is ``retrain.interval_s`` up since the last retrain started (or the start)?"""
        start = self._clock(now_s)
        if self.spec.interval_s is None:
            return self._no("no schedule (retrain.interval_s)")
        why = self._refusal()
        if why is not None:
            return self._no(why)
        since = self._last_started_s if self._last_started_s is not None else start
        if now_s - since < self.spec.interval_s:
            return self._no(
                f"next scheduled retrain in {since + self.spec.interval_s - now_s:.0f} s"
            )
        return RetrainDecision(
            True, f"scheduled every {self.spec.interval_s:g} s", None, self.spec.last_events
        )

    def started(self, now_s: float) -> None:
        self._clock(now_s)
        self._in_flight = True
        self._last_started_s = now_s

    def finished(self, now_s: float, challenger: str | None) -> None:
        """The retrain ended; ``challenger`` is the version now under evaluation (shadow
        or canary), None when nothing was deployed (too few rows, refused, failed)."""
        self._clock(now_s)
        self._in_flight = False
        self._challenger = challenger

    def challenger_resolved(self) -> None:
        """The challenger was promoted or archived: drift may retrain again."""
        self._challenger = None

    def _clock(self, now_s: float) -> float:
        if self._start_s is None:
            self._start_s = now_s
        return self._start_s

    def _refusal(self) -> str | None:
        if self._in_flight:
            return "a retrain is in flight"
        if self._challenger is not None:
            return f"challenger {self._challenger} is under evaluation"
        return None

    def _no(self, why: str) -> RetrainDecision:
        return RetrainDecision(False, why, None, self.spec.last_events)


@dataclass(frozen=True)
class RoleScore:
    """One model's score on the labelled events it served (or shadowed)."""

    version: str
    metric: str
    value: float
    n: int  # labelled events behind the value


@dataclass(frozen=True)
class PromotionDecision:
    action: str  # "wait" | "promote" | "archive"
    reason: str


def judge_challenger(
    champion: RoleScore | None, challenger: RoleScore, promotion: PromotionSpec
) -> PromotionDecision:
    """Wait for ``min_labeled_events`` labels on each side; then promote if and only if
    the challenger beats the champion by more than ``min_delta`` on ``promotion.metric``
    (lower is better for rmse/mae), else archive. Ties keep the champion. Without a
    champion score the challenger is promoted once it has enough labels; a non-finite
    score (e.g. ROC AUC before both classes were seen) waits."""
    metric, need = promotion.metric, promotion.min_labeled_events
    for score in (challenger, champion):
        if score is not None and score.metric != metric:
            raise ModelError(f"{score.version} is scored on {score.metric!r}, not {metric!r}")
    if challenger.n < need:
        return PromotionDecision(
            "wait", f"challenger {challenger.version}: {challenger.n} of {need} labelled events"
        )
    if champion is not None and champion.n < need:
        return PromotionDecision(
            "wait", f"champion {champion.version}: {champion.n} of {need} labelled events"
        )
    if champion is None:
        return PromotionDecision("promote", f"no champion score; {metric} {challenger.value:.4f}")
    if not (math.isfinite(challenger.value) and math.isfinite(champion.value)):
        return PromotionDecision(
            "wait", f"{metric} not comparable yet ({challenger.value} vs {champion.value})"
        )
    margin = challenger.value - champion.value
    if promotion.lower_is_better:
        margin = -margin
    vs = (
        f"{metric} {challenger.value:.4f} ({challenger.version}, n={challenger.n}) vs "
        f"{champion.value:.4f} ({champion.version}, n={champion.n})"
    )
    # "more than min_delta" in decimal terms: 0.81 vs 0.80 is not more than 0.01
    slack = 1e-9 * max(1.0, abs(champion.value), abs(challenger.value))
    if margin > promotion.min_delta + slack:
        return PromotionDecision("promote", f"{vs}: better by more than {promotion.min_delta:g}")
    return PromotionDecision("archive", f"{vs}: not better by more than {promotion.min_delta:g}")

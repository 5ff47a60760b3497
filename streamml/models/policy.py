"""When to retrain.

:class:`RetrainPolicy` turns drift detections, a schedule and manual requests into at
most one retrain at a time. Pure: the caller passes the clock (``now_s``, any monotonic
seconds) and acts on the decisions. Which model then serves is decided by
:func:`streamml.models.decision.decide`, on the predictions each model made.

>>> from streamml.schemas.spec import parse_spec
>>> import yaml, pathlib
>>> spec = parse_spec(yaml.safe_load(pathlib.Path("pipelines/demo.yaml").read_text()))
>>> policy = RetrainPolicy(spec)
>>> policy.on_drift("concept", 1_000, now_s=0.0).retrain
True
>>> policy.started(0.0); policy.on_drift("concept", 2_000, now_s=1.0).reason
'a retrain is in flight'
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def challenger(self) -> str | None:
        """The challenger the last retrain deployed, while it awaits its verdict."""
        return self._challenger

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

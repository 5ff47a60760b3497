"""Drift monitors as the spec's ``drift`` section declares them, for one stream.

Three kinds, each fed one observation at a time and answering with the detections it made:

* **concept**: a river detector (ADWIN, Page-Hinkley or DDM) over the prequential error
  (0/1 for classification, ``|y - y_hat|`` for regression); only a *rise* of the error
  is a detection -- an improvement (after a retrain, say) is not;
* **data**: each numeric feature, by PSI against a reference (tumbling windows) or by
  river's KSWIN;
* **prediction**: the served score, by PSI against a reference.

Pure and synchronous (no Kafka): one :class:`DriftMonitor` per partition of a pipeline.

>>> ref = Reference.from_columns({"x": [float(i % 10) for i in range(1000)]}, bins=5)
>>> len(ref.fractions["x"]), round(psi(ref.fractions["x"], ref.fractions["x"]), 6)
(5, 0.0)
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt
from river import drift as river_drift

from streamml.errors import ConfigError
from streamml.schemas.operations import ConceptDriftSpec
from streamml.schemas.spec import PipelineSpec

FloatArray = npt.NDArray[np.float64]
SCORE = "score"  # the column of a Reference that holds the served score
FLOOR = 1e-4  # smallest fraction of a bin, so that PSI never takes log(0)
ERROR_MEMORY = 20_000  # event times of the latest errors, to date a change point
_INT_PARAMS = frozenset(
    {"clock", "max_buckets", "min_window_length", "grace_period", "min_instances", "warm_start"}
)


@dataclass(frozen=True)
class Detection:
    """One drift a monitor found."""

    detector: str  # adwin | page_hinkley | ddm | kswin | psi
    kind: str  # concept | data | prediction
    target: str  # "error" for concept, the feature name for data, "score" for prediction
    statistic: float
    threshold: float
    window: int  # observations in the window that decided
    at: int  # 1-based count of observations of that monitor when it fired
    # where the change began, as this detector sees it: ADWIN keeps the observations after
    # its cut, so the change is about ``since`` observations before ``at`` (0: unknown)
    since: int = 0


# --- reference distributions and PSI -----------------------------------------------------


def _finite(values: Sequence[float]) -> npt.NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    return arr[np.isfinite(arr)]


def _fractions(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """Share of ``values`` per bin ``(edge[i-1], edge[i]]`` (open at both ends), floored."""
    arr = _finite(values)
    counts = np.bincount(np.searchsorted(edges, arr, side="left"), minlength=len(edges) + 1)
    shares = np.maximum(counts / max(len(arr), 1), FLOOR)
    return [float(v) for v in shares / shares.sum()]


def _quantile_edges(values: Sequence[float], bins: int) -> list[float]:
    arr = _finite(values)
    if not len(arr):
        raise ValueError("no finite values to bin")
    cuts = np.quantile(arr, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    return [float(v) for v in np.unique(cuts)]  # repeated values collapse their bins


@dataclass
class Reference:
    """Binned distribution per feature (and of the score) a model was trained on.

    Edges are the interior quantile cut points of each column (repeated cut points of a
    discrete column collapse), so ``len(fractions[c]) == len(edges[c]) + 1``; every
    fraction is at least :data:`FLOOR`. The score is the column :data:`SCORE`.
    """

    edges: dict[str, list[float]]
    fractions: dict[str, list[float]]

    @classmethod
    def from_columns(cls, columns: Mapping[str, Sequence[float]], bins: int = 10) -> Reference:
        """Quantile bins of each column; non-finite values are left out."""
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        edges, fractions = {}, {}
        for name, values in columns.items():
            try:
                edges[name] = _quantile_edges(values, bins)
            except ValueError:
                raise ValueError(f"column {name!r} has no finite values") from None
            fractions[name] = _fractions(values, edges[name])
        return cls(edges, fractions)

    def to_json(self) -> dict[str, Any]:
        return {"edges": dict(self.edges), "fractions": dict(self.fractions)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        try:
            edges = {str(k): [float(x) for x in v] for k, v in data["edges"].items()}
            fractions = {str(k): [float(x) for x in v] for k, v in data["fractions"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a drift reference: {exc!r}") from None
        if set(edges) != set(fractions):
            raise ValueError("a drift reference needs edges and fractions for the same columns")
        for name, cut in edges.items():
            if len(fractions[name]) != len(cut) + 1:
                raise ValueError(f"column {name!r}: {len(cut)} edges need {len(cut) + 1} bins")
            if any(b <= a for a, b in pairwise(cut)):
                raise ValueError(f"column {name!r}: edges must increase")
        return cls(edges, fractions)


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two fraction vectors over the same bins.

    Fractions are floored at :data:`FLOOR` (no log of 0). Common reading: below 0.1
    stable, 0.1-0.2 a moderate shift, above 0.2 a significant one.

    >>> psi([0.5, 0.5], [0.5, 0.5])
    0.0
    >>> round(psi([0.5, 0.5], [0.9, 0.1]), 3)
    0.879
    """
    if len(expected) != len(actual):
        raise ValueError(f"PSI needs the same bins: {len(expected)} != {len(actual)}")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, FLOOR), max(a, FLOOR)
        total += (a - e) * math.log(a / e)
    return total


# --- one monitor per target ----------------------------------------------------------------


class _Psi:
    """PSI over tumbling windows of ``window`` observations against a reference.

    Without a reference the first full window becomes it. A window whose PSI exceeds
    the threshold fires and becomes the new reference, so a lasting shift fires once.
    """

    def __init__(self, kind: str, target: str, threshold: float, window: int, bins: int) -> None:
        self.kind, self.target = kind, target
        self.threshold, self.window, self.bins = threshold, window, bins
        self.edges: list[float] | None = None
        self.fractions: list[float] = []
        self.buffer: list[float] = []

    def adopt(self, reference: Reference | None) -> None:
        """Compare with ``reference``'s column from now on (None: learn it from a window)."""
        if reference is not None and self.target in reference.edges:
            self.edges = list(reference.edges[self.target])
            self.fractions = list(reference.fractions[self.target])
        else:
            self.edges, self.fractions = None, []
        self.buffer = []

    def update(self, x: float, at: int) -> Detection | None:
        if not math.isfinite(x):
            return None
        self.buffer.append(x)
        if len(self.buffer) < self.window:
            return None
        values, self.buffer = self.buffer, []
        if self.edges is None:
            self.edges = _quantile_edges(values, self.bins)
            self.fractions = _fractions(values, self.edges)
            return None
        value = psi(self.fractions, _fractions(values, self.edges))
        if value <= self.threshold:
            return None
        self.edges = _quantile_edges(values, self.bins)
        self.fractions = _fractions(values, self.edges)
        return Detection("psi", self.kind, self.target, value, self.threshold, self.window, at)


class _Kswin:
    """river's KSWIN on one feature; quiet for ``window`` observations after it fires."""

    def __init__(self, target: str, alpha: float, window: int) -> None:
        self.target, self.alpha, self.window = target, alpha, window
        stat = min(max(30, window // 10), window // 2)
        seed = zlib.crc32(target.encode("utf-8"))  # reproducible, different per feature
        self.detector = river_drift.KSWIN(
            alpha=alpha, window_size=window, stat_size=stat, seed=seed
        )
        self.quiet_until = 0

    def adopt(self, reference: Reference | None) -> None:
        """KSWIN compares the recent past with itself: a reference does not apply."""

    def update(self, x: float, at: int) -> Detection | None:
        if not math.isfinite(x):
            return None
        self.detector.update(x)
        if not self.detector.drift_detected or at < self.quiet_until:
            return None
        self.quiet_until = at + self.window
        p_value = float(self.detector.p_value)
        return Detection("kswin", "data", self.target, p_value, self.alpha, self.window, at)


class _Concept:
    """A river detector over the error stream; reports rises of the error only.

    river resets a detector after it fires; a detection within ``min_events`` errors of
    the start or of the previous river detection is not reported.
    """

    def __init__(self, spec: ConceptDriftSpec) -> None:
        self.spec = spec
        self.binary = spec.detector == "ddm"
        self.detector = self._build()
        self.since = 0

    def _build(self) -> Any:
        params: dict[str, Any] = {
            k: int(v) if k in _INT_PARAMS else float(v) for k, v in self.spec.params.items()
        }
        try:
            if self.spec.detector == "adwin":
                return river_drift.ADWIN(**params)
            if self.spec.detector == "page_hinkley":
                return river_drift.PageHinkley(**{"mode": "up", **params})
            return river_drift.binary.DDM(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"drift.concept.params: {exc}") from None

    def reset(self) -> None:
        self.detector = self._build()
        self.since = 0

    def update(self, error: float, at: int) -> Detection | None:
        if self.binary and error not in (0.0, 1.0):
            raise ValueError(f"ddm watches 0/1 errors, got {error!r}")
        det = self.detector
        before = float(det.estimation) if self.spec.detector == "adwin" else 0.0
        width = int(det.width) if self.spec.detector == "adwin" else 0
        det.update(error)
        self.since += 1
        if not det.drift_detected:
            return None
        warm, self.since = self.since >= self.spec.min_events, 0
        since = 0
        if self.spec.detector == "adwin":
            # ADWIN dropped the older part of its window: the mean error of the rest, which
            # began where ADWIN cut -- its estimate of the change point.
            stat, threshold, window = float(det.estimation), float(det.delta), width + 1
            rising = stat > before
            since = int(det.width)
        elif self.spec.detector == "page_hinkley":
            stat = float(det._sum_increase - det._min_increase)
            threshold, window, rising = float(det.threshold), int(det._x_mean.n), True
        else:
            p, n = float(det._p.get()), int(det._p.n)
            stat = p + math.sqrt(p * (1 - p) / n)
            threshold = float(det._p_min + det.drift_threshold * det._s_min)
            window, rising = n, True
        if not (warm and rising):
            return None
        return Detection(self.spec.detector, "concept", "error", stat, threshold, window, at, since)


# --- every monitor of a stream -------------------------------------------------------------


class DriftMonitor:
    """Every monitor the spec declares, for one stream (one partition of one pipeline).

    * ``observe_error``: concept drift. Detections are rises of the error only; none in
      the first ``drift.concept.min_events`` errors nor within that many after river's
      detector fired (it resets itself then), so a change inside that warm-up is not
      reported.
    * ``observe_features``: data drift on ``drift.data.features`` or, when None, on
      every numeric key (no one-hot ``a=b`` or hashing ``a#3`` indicators) of the first
      vector and of the reference. A vector without the key (a feature left out by
      ``select``/``exclude``) or with a non-finite value is not an observation of that
      feature, so its windows fill more slowly. PSI compares tumbling windows with
      the reference column (or, without one, with the first window); a window that fires
      becomes the new reference, so a lasting shift fires once. KSWIN runs per feature
      (a KS test per observation: costly with many features) and stays quiet for a
      window after it fires.
    * ``observe_score``: prediction drift, PSI on the score like a feature.

    Each monitor fires at most once per window. ``set_reference`` is for a new serving
    model: the concept detector starts over, the score monitor adopts the reference's
    :data:`SCORE` column (or learns a new one from its next window), and PSI feature
    monitors adopt the reference's columns where it has them.
    """

    def __init__(self, spec: PipelineSpec, reference: Reference | None = None) -> None:
        self.spec = spec
        drift = spec.drift
        self._concept = _Concept(drift.concept) if drift.concept is not None else None
        self._features: dict[str, _Psi | _Kswin] | None = None  # chosen at the first vector
        self._score: _Psi | None = None
        if drift.prediction is not None:
            p = drift.prediction
            self._score = _Psi("prediction", SCORE, p.threshold, p.window, p.bins)
        self._counts = {"concept": 0, "data": 0, "prediction": 0}
        self._error_ts: deque[int] = deque(maxlen=ERROR_MEMORY)
        self.reference: Reference | None = None
        self.set_reference(reference)

    def set_reference(self, reference: Reference | None) -> None:
        """The serving model changed: compare with the distributions it was trained on."""
        self.reference = reference
        if self._concept is not None:
            self._concept.reset()
        if self._score is not None:
            self._score.adopt(reference)
        if self._features is not None and reference is not None:
            for name, monitor in self._features.items():
                if name in reference.edges:
                    monitor.adopt(reference)

    def change_ts_ms(self, detection: Detection) -> int | None:
        """Event time of the first observation after the detector's estimated change
        point (ADWIN's cut); None when the detector gives none or it is out of memory."""
        if detection.kind != "concept" or detection.since <= 0:
            return None
        first = detection.at - detection.since + 1  # observation number, 1-based
        oldest = self._counts["concept"] - len(self._error_ts) + 1
        if first < oldest:
            return None
        return self._error_ts[first - oldest] or None

    @property
    def observed(self) -> dict[str, int]:
        """Observations passed to each kind so far (``concept``, ``data``, ``prediction``)."""
        return dict(self._counts)

    def observe_error(self, error: float, ts_ms: int = 0) -> list[Detection]:
        """Concept drift on the prequential error of the serving model (``ts_ms``: the
        event time of the labelled event, kept to date a detection's change point)."""
        self._counts["concept"] += 1
        if self._concept is None:
            return []
        self._error_ts.append(ts_ms)
        found = self._concept.update(float(error), self._counts["concept"])
        return [found] if found is not None else []

    def observe_features(self, vector: Mapping[str, float]) -> list[Detection]:
        """Data drift on one feature vector; one detection per feature that fired."""
        self._counts["data"] += 1
        spec = self.spec.drift.data
        if spec is None:
            return []
        if self._features is None:
            self._features = self._monitors(vector)
        at = self._counts["data"]
        found = []
        for name, monitor in self._features.items():
            value = vector.get(name)
            detection = None if value is None else monitor.update(float(value), at)
            if detection is not None:
                found.append(detection)
        return found

    def observe_score(self, score: float) -> list[Detection]:
        """Prediction drift on one served score."""
        self._counts["prediction"] += 1
        if self._score is None:
            return []
        found = self._score.update(float(score), self._counts["prediction"])
        return [found] if found is not None else []

    def _monitors(self, vector: Mapping[str, float]) -> dict[str, _Psi | _Kswin]:
        spec = self.spec.drift.data
        assert spec is not None
        names = spec.features
        if names is None:
            keys = set(vector) | (set(self.reference.edges) - {SCORE} if self.reference else set())
            names = sorted(k for k in keys if "=" not in k and "#" not in k)
        monitors: dict[str, _Psi | _Kswin] = {}
        for name in names:
            if spec.method == "kswin":
                monitors[name] = _Kswin(name, spec.alpha, spec.window)
            else:
                monitors[name] = _Psi("data", name, spec.threshold, spec.window, spec.bins)
                monitors[name].adopt(self.reference)
        return monitors


# --- confirming a change and dating it -----------------------------------------------------


@dataclass(frozen=True)
class ChangePoint:
    """The most likely single change in the mean of a sequence (CUSUM) and its evidence."""

    index: int  # first observation of the new regime (0-based)
    before: float  # mean before it
    after: float  # mean from it on
    statistic: float  # max |CUSUM| / (sd * sqrt(n)): a Brownian bridge's sup without change
    p_value: float  # P(sup |bridge| >= statistic) without a change (Kolmogorov's tail)


def kolmogorov_tail(x: float) -> float:
    """P(sup_t |B(t)| >= x) for a Brownian bridge B: the p-value of a CUSUM statistic.

    >>> round(kolmogorov_tail(1.36), 3)  # the familiar 5% point
    0.049
    """
    if x <= 0:
        return 1.0
    total = sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * x * x) for k in range(1, 101))
    return float(min(1.0, max(0.0, 2.0 * total)))


def change_point(values: Sequence[float] | FloatArray, min_segment: int = 30) -> ChangePoint | None:
    """Whether and where the mean of ``values`` (e.g. a served model's errors in event
    order) changed; None when the sequence is too short (``2 * min_segment``) or constant.

    *Whether*: the CUSUM of deviations from the overall mean, standardised; without a
    change it behaves as a Brownian bridge, so ``p_value`` (Kolmogorov's tail) is below
    ``alpha`` with probability about ``alpha`` on a stationary stream of independent
    observations. *Where*: the split that maximises the likelihood of two segments --
    Bernoulli for 0/1 errors, Gaussian with a variance per segment otherwise -- which
    dates a change well even when few observations follow it (the CUSUM's own peak
    drifts early then: measured on 0.1 -> 0.4 error rates at the first significant test,
    likelihood split within 70 events in 40 of 40 runs, CUSUM peak up to 1,230 early).

    >>> errors = [0.0, 0.0, 0.0, 1.0] * 100 + [1.0, 1.0, 0.0, 1.0] * 50
    >>> cp = change_point(errors)
    >>> cp.index, round(cp.before, 2), round(cp.after, 2), cp.p_value < 1e-6
    (399, 0.25, 0.75, True)
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n < 2 * min_segment:
        return None
    sd = float(x.std())
    if sd == 0.0:
        return None
    cusum = np.cumsum(x - x.mean())[:-1]  # after k observations, k = 1 .. n-1
    statistic = float(np.abs(cusum).max() / (sd * math.sqrt(n)))
    k = np.arange(1, n, dtype=np.float64)
    usable = (k >= min_segment) & (k <= n - min_segment)
    split = int(np.argmax(np.where(usable, _split_likelihood(x, k), -np.inf))) + 1
    return ChangePoint(
        split,
        float(x[:split].mean()),
        float(x[split:].mean()),
        statistic,
        kolmogorov_tail(statistic),
    )


def _split_likelihood(x: npt.NDArray[np.float64], k: npt.NDArray[np.float64]) -> FloatArray:
    """Log-likelihood of "a change after k observations", for every k = 1 .. n-1."""
    n = len(x)
    total = np.cumsum(x)[:-1]
    left, right = total / k, (x.sum() - total) / (n - k)
    if np.isin(x, (0.0, 1.0)).all():  # 0/1 errors: two Bernoulli segments
        return np.asarray(_bernoulli(left) * k + _bernoulli(right) * (n - k), np.float64)
    squares = np.cumsum(x * x)[:-1]
    var_left = np.maximum(squares / k - left**2, 1e-12)
    var_right = np.maximum(((x * x).sum() - squares) / (n - k) - right**2, 1e-12)
    return np.asarray(-0.5 * (k * np.log(var_left) + (n - k) * np.log(var_right)), np.float64)


def _bernoulli(p: FloatArray) -> FloatArray:
    """Mean log-likelihood of a Bernoulli(p) sample whose mean is p (its -entropy)."""
    q = np.clip(p, 1e-12, 1 - 1e-12)
    return np.asarray(q * np.log(q) + (1 - q) * np.log(1 - q), dtype=np.float64)


def latest_rise(
    values: Sequence[float], min_segment: int = 30, alpha: float = 1e-4
) -> ChangePoint | None:
    """The latest significant rise in the mean of ``values``: :func:`change_point`, then
    tested again on what follows the split while that shows a further rise with p-value
    below ``alpha`` (binary segmentation towards the newest regime). One split over a
    sequence with two rises can land on the first; a retrain "on the new concept only"
    needs the last. ``before``/``after`` are the means either side of the returned split
    over the whole sequence; ``statistic``/``p_value`` are the first test's (whether the
    sequence changed at all).

    >>> errors = [0.0] * 1000 + [0.0, 0.0, 0.0, 1.0] * 750 + [1.0, 0.0] * 200  # 0, .25, .5
    >>> change_point(errors).index, latest_rise(errors).index
    (1003, 3999)
    """
    first = change_point(values, min_segment)
    if first is None or first.p_value >= alpha or first.after <= first.before:
        return first
    x = np.asarray(values, dtype=np.float64)
    split = first.index
    while True:
        nxt = change_point(x[split:], min_segment)
        if nxt is None or nxt.p_value >= alpha or nxt.after <= nxt.before:
            break
        split += nxt.index
    return ChangePoint(
        split, float(x[:split].mean()), float(x[split:].mean()), first.statistic, first.p_value
    )

"""Which model serves a pipeline: paired bootstrap comparisons, on the same labelled events,
of each candidate against the champion and against a trivial baseline.

A candidate replaces the champion only when the lower bound of its paired gain clears
``min_delta``, it is significantly better than doing nothing (the baseline), and, for
binary classification, it ranks better than chance. Pure numpy: the caller passes the
outputs each model gave when the events arrived and the labels that came later.

>>> rng = np.random.default_rng(7)
>>> y = rng.random(2_000) < 0.4  # the true class: "yes" for 40% of the events
>>> labels = np.where(y, "yes", "no")
>>> def model(version: str, role: str, noise: float) -> Outputs:
...     score = np.clip(y + rng.normal(0.0, noise, y.size), 0.0, 1.0)
...     return Outputs(version, role, score, np.where(score > 0.5, "yes", "no"))
>>> v1, v2 = model("v1", "champion", 0.8), model("v2", "shadow", 0.3)
>>> d = decide(v1, [v2], labels, metric="roc_auc", lower_is_better=False, min_delta=0.01,
...            min_labeled_events=500, positive="yes", task="classification")
>>> d.action, d.version
('promote', 'v2')
>>> print(d.reason)
v2 roc_auc 0.991 vs champion v1 0.784: +0.207 [95% 0.187, 0.229] on 2,000 events; baseline 0.500
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from streamml.errors import ModelError
from streamml.schemas.operations import LOWER_IS_BETTER, TASK_METRICS

FloatArray = npt.NDArray[np.float64]
Task = Literal["classification", "regression"]
Action = Literal["wait", "keep", "promote", "keep_below_baseline"]
Labels = Sequence[str] | Sequence[float] | npt.NDArray[Any]

BASELINE = "baseline"  # version and role of the trivial model in the table
MAX_UNDEFINED_SHARE = 0.05  # more resamples than this with the metric undefined: no bounds
_REGRESSION = frozenset(TASK_METRICS["regression"])
_METRICS = _REGRESSION | frozenset(TASK_METRICS["classification"])
_CELLS = 2_000_000  # resamples x events per chunk of bootstrap counts (16 MB of float64)


@dataclass(frozen=True, eq=False)  # eq=False: arrays do not compare to one bool
class Outputs:
    """What one model said about each labelled event, in the order of the labels.

    ``score`` is the positive-class probability (classification) or the prediction
    (regression); ``predicted`` the predicted class as a string (unused for regression).
    """

    version: str
    role: str  # champion | shadow | canary | online | fresh | baseline ...
    score: FloatArray
    predicted: Sequence[str] | npt.NDArray[Any] = ()

    def __post_init__(self) -> None:
        score = np.asarray(self.score, dtype=np.float64).ravel()
        if not np.isfinite(score).all():
            raise ModelError(f"{self.version}: scores must be finite")
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "predicted", np.asarray(self.predicted, dtype=str).ravel())


@dataclass(frozen=True)
class Comparison:
    """Paired gain of one model over another: positive means better, also for rmse/mae."""

    delta: float  # on all the events
    low: float  # percentile bootstrap bounds; NaN when too many resamples were undefined
    high: float
    n: int  # labelled events


@dataclass(frozen=True)
class Row:
    """One model's line in the audit trail."""

    version: str
    role: str
    value: float
    vs_champion: Comparison
    vs_baseline: Comparison
    roc_auc: float | None  # binary classification only: the better-than-chance check


@dataclass(frozen=True)
class ServingDecision:
    action: Action
    version: str  # the version to serve: the promoted candidate, else the champion
    reason: str
    table: list[Row]  # champion, candidates, baseline


# --- metrics -------------------------------------------------------------------------------

# A metric as a function of bootstrap counts (resamples x events) -> one value per resample.
_Scorer = Callable[[FloatArray], FloatArray]


def metric_value(metric: str, labels: Labels, outputs: Outputs, positive: str | None) -> float:
    """``metric`` of ``outputs`` on ``labels``: accuracy, precision, recall, f1, roc_auc
    (of the class ``positive``) or rmse, mae. Precision, recall and F1 are 0.0 when their
    denominator is (nothing predicted or labelled positive); ROC AUC is the Mann-Whitney
    statistic with ties counted half, NaN with one class only; everything is NaN on no events.

    >>> labels = ["a", "b", "b", "a"]
    >>> out = Outputs("v1", "champion", np.array([0.9, 0.2, 0.9, 0.1]), ["a", "b", "a", "b"])
    >>> metric_value("accuracy", labels, out, "a"), metric_value("roc_auc", labels, out, "a")
    (0.5, 0.375)
    """
    y = _labels(labels, metric in _REGRESSION)
    if len(y) == 0:
        return math.nan
    return float(_scorer(metric, y, outputs, positive)(np.ones((1, len(y))))[0])


def baseline_outputs(task: Task, labels: Labels, positive: str | None) -> Outputs:
    """The trivial model on these events: the majority class (ties: the first in sorted
    order) with the positive-class base rate as a constant score (ROC AUC 0.5), or the mean
    target. Computed from the judged events themselves, which flatters the baseline: a floor
    set this way is conservative.

    >>> baseline_outputs("classification", ["a", "b", "b"], "a").predicted.tolist()
    ['b', 'b', 'b']
    >>> baseline_outputs("regression", [1.0, 2.0, 6.0], None).score.tolist()
    [3.0, 3.0, 3.0]
    """
    y = _labels(labels, task == "regression")
    if task == "regression":
        return Outputs(BASELINE, BASELINE, np.full(len(y), y.mean() if len(y) else 0.0))
    classes, counts = np.unique(y, return_counts=True)
    majority = classes[counts.argmax()] if len(y) else ""
    rate = float((y == positive).mean()) if len(y) and positive is not None else 0.0
    return Outputs(BASELINE, BASELINE, np.full(len(y), rate), np.full(len(y), majority))


def _labels(labels: Labels, regression: bool) -> npt.NDArray[Any]:
    if regression:
        return np.asarray(labels, dtype=np.float64).ravel()
    return np.asarray(labels).astype(str).ravel()


def _scorer(metric: str, y: npt.NDArray[Any], out: Outputs, positive: str | None) -> _Scorer:
    n = len(y)
    if metric not in _METRICS:
        raise ModelError(f"unknown metric {metric!r} (use one of {sorted(_METRICS)})")
    if metric in ("rmse", "mae"):
        err = _sized(out.score, n, out.version) - y
        col = err**2 if metric == "rmse" else np.abs(err)
        if metric == "rmse":
            return lambda w: np.sqrt(w @ col / n)
        return lambda w: w @ col / n
    if metric == "accuracy":
        right = (_sized(np.asarray(out.predicted), n, out.version) == y).astype(np.float64)
        return lambda w: w @ right / n
    if positive is None:
        raise ModelError(f"{metric} needs the positive class")
    is_pos = y == positive
    if metric == "roc_auc":
        return _auc_scorer(is_pos, _sized(out.score, n, out.version))
    says = _sized(np.asarray(out.predicted), n, out.version) == positive
    tp = (is_pos & says).astype(np.float64)
    said, real = says.astype(np.float64), is_pos.astype(np.float64)
    parts = {"precision": (tp, said), "recall": (tp, real), "f1": (2 * tp, said + real)}
    num, den = parts[metric]
    return lambda w: _ratio(w @ num, w @ den)


def _auc_scorer(is_pos: npt.NDArray[np.bool_], score: FloatArray) -> _Scorer:
    """Weighted Mann-Whitney: per resample, for each group of tied scores, its positives
    times the negatives below it plus half the negatives tied with it."""
    order = np.argsort(score, kind="stable")
    ordered = score[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    pos = is_pos[order].astype(np.float64)
    neg = 1.0 - pos

    def auc(w: FloatArray) -> FloatArray:
        w = w[:, order]
        p = np.add.reduceat(w * pos, starts, axis=1)
        q = np.add.reduceat(w * neg, starts, axis=1)
        below = np.cumsum(q, axis=1) - q
        num = (p * (below + 0.5 * q)).sum(axis=1)
        den = p.sum(axis=1) * q.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den > 0, num / den, np.nan)

    return auc


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, 0.0)


def _sized(values: npt.NDArray[Any], n: int, version: str) -> npt.NDArray[Any]:
    if len(values) != n:
        raise ModelError(f"{version}: {len(values)} outputs for {n} labelled events")
    return values


# --- the paired bootstrap ------------------------------------------------------------------


def paired_bootstrap(
    metric: str,
    labels: Labels,
    a: Outputs,
    b: Outputs,
    *,
    lower_is_better: bool,
    positive: str | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """How much better ``b`` is than ``a`` on ``metric`` (sign flipped for lower-is-better
    metrics, so positive always means ``b`` better), with a percentile bootstrap interval
    over the events, both models scored on the same resamples (paired). Resamples where the
    metric is undefined (ROC AUC with one class) are dropped; with more than
    ``MAX_UNDEFINED_SHARE`` of them dropped the bounds are NaN.

    >>> labels = [1.0, 2.0, 3.0, 4.0] * 50
    >>> a = Outputs("v1", "champion", np.array([1.5, 2.5, 2.5, 3.5] * 50))
    >>> b = Outputs("v2", "shadow", np.array([1.0, 2.0, 3.0, 4.5] * 50))
    >>> c = paired_bootstrap("mae", labels, a, b, lower_is_better=True)
    >>> c.delta, c.low > 0, c.n
    (0.375, True, 200)
    """
    _check_direction(metric, lower_is_better)
    y = _labels(labels, metric in _REGRESSION)
    scorers = [_scorer(metric, y, m, positive) for m in (a, b)]
    boot = _resample(scorers, len(y), n_boot, seed)
    points = _points(scorers, len(y))
    return _compare(boot[0], boot[1], (points[0], points[1]), lower_is_better, confidence, len(y))


def _resample(scorers: Sequence[_Scorer], n: int, n_boot: int, seed: int) -> FloatArray:
    """Each scorer on the same ``n_boot`` bootstrap resamples of ``n`` events (as counts)."""
    out = np.full((len(scorers), n_boot), np.nan)
    if n == 0:
        return out
    rng = np.random.default_rng(seed)
    rows = max(1, _CELLS // n)
    for start in range(0, n_boot, rows):
        k = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(k, n)) + (np.arange(k) * n)[:, None]
        w = np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)
        for i, score in enumerate(scorers):
            out[i, start : start + k] = score(w)
    return out


def _points(scorers: Sequence[_Scorer], n: int) -> list[float]:
    if n == 0:
        return [math.nan] * len(scorers)
    ones = np.ones((1, n))
    return [float(score(ones)[0]) for score in scorers]


def _compare(
    a: FloatArray,
    b: FloatArray,
    points: tuple[float, float],
    lower: bool,
    confidence: float,
    n: int,
) -> Comparison:
    sign = -1.0 if lower else 1.0
    gains = sign * (b - a)
    kept = gains[np.isfinite(gains)]
    low = high = math.nan
    if len(gains) and len(kept) >= (1 - MAX_UNDEFINED_SHARE) * len(gains):
        tail = (1 - confidence) / 2
        low, high = (float(q) for q in np.quantile(kept, [tail, 1 - tail]))
    return Comparison(sign * (points[1] - points[0]), low, high, n)


def _check_direction(metric: str, lower_is_better: bool) -> None:
    if lower_is_better != (metric in LOWER_IS_BETTER):
        raise ModelError(f"{metric} is {'not ' * lower_is_better}lower-is-better")


# --- the decision --------------------------------------------------------------------------


def decide(
    champion: Outputs,
    candidates: Sequence[Outputs],
    labels: Labels,
    *,
    metric: str,
    lower_is_better: bool,
    min_delta: float,
    min_labeled_events: int,
    positive: str | None,
    task: Task,
    seed: int = 0,
    n_boot: int = 1000,
    confidence: float = 0.95,
) -> ServingDecision:
    """Keep the champion, promote a candidate, or wait, from paired bootstrap comparisons
    of every model against the champion and against :func:`baseline_outputs`.

    * ``wait``: fewer than ``min_labeled_events`` labels (the table is then empty), or a
      number the rules need is undefined (e.g. ROC AUC with one class seen so far).
    * ``promote`` a candidate when the lower bound of its gain over the champion is above
      ``min_delta``, the lower bound (and the point estimate) of its gain over the baseline
      above 0 and, for binary classification (``positive`` given), its ROC AUC point
      estimate above 0.5; among several, the highest lower bound over the champion wins.
    * When the champion is significantly below the baseline (upper bound < 0) or ranks no
      better than chance (ROC AUC <= 0.5), ``min_delta`` is waived: a candidate with a
      lower bound above 0 over the champion, not significantly below the baseline and
      better than it on the point estimate, still above chance, is promoted; with none,
      ``keep_below_baseline`` tells the caller to alert and retrain.
    * Otherwise ``keep``. Deterministic for a given ``seed``.

    Bounds are per comparison, not corrected for several candidates competing: raise
    ``confidence`` when many do.

    >>> out = Outputs("v1", "champion", np.array([0.2, 0.7]), ["n", "y"])
    >>> decide(out, [], ["n", "y"], metric="accuracy", lower_is_better=False, min_delta=0.0,
    ...        min_labeled_events=500, positive="y", task="classification").reason
    '2 of 500 labelled events'
    """
    _check_direction(metric, lower_is_better)
    if metric not in TASK_METRICS[task]:
        raise ModelError(f"{metric} does not fit task {task} (use one of {TASK_METRICS[task]})")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ModelError(f"need n_boot >= 1 and 0 < confidence < 1 ({n_boot}, {confidence})")
    y = _labels(labels, task == "regression")
    n = len(y)
    models = [champion, *candidates, baseline_outputs(task, y, positive)]
    versions = [m.version for m in models]
    if len(set(versions)) < len(versions):
        raise ModelError(f"versions must be distinct and not {BASELINE!r}: {versions[:-1]}")
    for m in models:  # refuse misaligned outputs before waiting for labels, not after
        _sized(m.score, n, m.version)
        if metric in ("accuracy", "precision", "recall", "f1"):
            _sized(np.asarray(m.predicted), n, m.version)
    if n < max(min_labeled_events, 1):
        why = f"{n:,} of {min_labeled_events:,} labelled events"
        return ServingDecision("wait", champion.version, why, [])

    binary = task == "classification" and positive is not None
    scorers = [_scorer(metric, y, m, positive) for m in models]
    boot = _resample(scorers, n, n_boot, seed)
    points = _points(scorers, n)

    def vs(ref: int, i: int) -> Comparison:
        pair = (points[ref], points[i])
        return _compare(boot[ref], boot[i], pair, lower_is_better, confidence, n)

    aucs = [metric_value("roc_auc", y, m, positive) if binary else None for m in models]
    last = len(models) - 1
    table = [
        Row(m.version, m.role, points[i], vs(0, i), vs(last, i), aucs[i])
        for i, m in enumerate(models)
    ]
    numbers = [
        x
        for r in table
        for x in (r.value, r.vs_champion.low, r.vs_baseline.low, r.vs_baseline.high, r.roc_auc)
    ]
    if not all(x is None or math.isfinite(x) for x in numbers):
        share = float(np.mean(~np.isfinite(boot).all(axis=0)))
        why = _undefined(metric, y, positive, share)
        return ServingDecision("wait", champion.version, why, table)

    champ, rows, base = table[0], table[1:-1], table[-1]
    broken = champ.vs_baseline.high < 0 or _at_chance(champ)
    failures = {r.version: _failures(r, min_delta, broken) for r in rows}
    pool = [r for r in rows if not failures[r.version]]
    if pool:
        best = max(pool, key=lambda r: r.vs_champion.low)
        why = _versus(best, champ, base, metric, confidence)
        waived = [f"min_delta {min_delta:g}"] if best.vs_champion.low <= min_delta else []
        waived += ["a significant gain over the baseline"] * (best.vs_baseline.low <= 0)
        if waived:
            why += f"; {' and '.join(waived)} waived because champion {champ.version} "
            why += _below(champ, base, metric)
        return ServingDecision("promote", best.version, why, table)
    if rows:
        best = max(rows, key=lambda r: r.vs_champion.low)
        why = f"{_versus(best, champ, base, metric, confidence)}; not promoted: "
        why += "; ".join(failures[best.version])
    else:
        why = f"no candidates; champion {champ.version} {metric} {_num(champ.value)}"
        why += f", baseline {_num(base.value)}"
    if broken:
        return ServingDecision(
            "keep_below_baseline",
            champ.version,
            f"champion {champ.version} {_below(champ, base, metric)}, no candidate fit to "
            f"replace it: alert and retrain; {why}",
            table,
        )
    return ServingDecision("keep", champ.version, why, table)


def _at_chance(r: Row) -> bool:
    return r.roc_auc is not None and r.roc_auc <= 0.5


def _failures(r: Row, min_delta: float, broken: bool) -> list[str]:
    """Why candidate ``r`` may not replace the champion (empty: it may). ``broken``: the
    champion is below the baseline or at chance, which waives ``min_delta``."""
    out = []
    c, b = r.vs_champion, r.vs_baseline
    if not (c.low > min_delta or (broken and c.low > 0)):
        floor = "0 (min_delta waived)" if broken else f"min_delta {min_delta:g}"
        out.append(f"lower bound {c.low:.3f} vs the champion not above {floor}")
    if b.delta <= 0 or not (b.low > 0 or (broken and b.high >= 0)):
        out.append(f"not better than the baseline ({b.delta:+.3f} [{b.low:.3f}, {b.high:.3f}])")
    if _at_chance(r):
        out.append(f"ROC AUC {r.roc_auc:.3f} no better than chance")
    return out


def _versus(r: Row, champ: Row, base: Row, metric: str, confidence: float) -> str:
    c = r.vs_champion
    return (
        f"{r.version} {metric} {_num(r.value)} vs champion {champ.version} {_num(champ.value)}: "
        f"{c.delta:+.3f} [{confidence:.0%} {c.low:.3f}, {c.high:.3f}] on {c.n:,} events; "
        f"baseline {_num(base.value)}"
    )


def _below(champ: Row, base: Row, metric: str) -> str:
    b = champ.vs_baseline
    if b.high < 0:
        return (
            f"{metric} {_num(champ.value)} is below the baseline's {_num(base.value)} "
            f"({b.delta:+.3f} [{b.low:.3f}, {b.high:.3f}])"
        )
    return f"ROC AUC {champ.roc_auc:.3f} is no better than chance"


def _undefined(metric: str, y: npt.NDArray[Any], positive: str | None, share: float) -> str:
    n = len(y)
    if positive is not None and len(np.unique(y == positive)) < 2:
        return f"one class only among {n:,} labelled events: ROC AUC undefined, wait for both"
    return (
        f"{metric} undefined (one class only) in {share:.0%} of the resamples of {n:,} events "
        f"(more than {MAX_UNDEFINED_SHARE:.0%}): wait for more labels"
    )


def _num(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 1000 else f"{x:,.0f}"

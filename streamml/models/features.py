"""Feature engineering over validated records: pure functions and small JSON-able states.

Two kinds of state, both plain dicts so Faust tables can hold them:

* partition state (:class:`GlobalState`): running mean/variance for ``standardize``,
  category counts for ``frequency`` (at most :data:`FREQUENCY_MAX_CATEGORIES`), the
  vocabulary of ``onehot`` (at most ``max_categories``) and the partition's event-time
  clock (the newest event time featurized);
* entity state (a dict per entity key): windowed and last-N aggregates, and the entity's
  newest event time under :data:`SEEN` (what the entity TTL is measured from).

Neither grows with the number of distinct entities or categories: entity states expire
(``streamml.agents.expiry``) and category tables are capped.
"""

from __future__ import annotations

import datetime as dt
import math
import zlib
from collections.abc import Iterable
from typing import Any

from streamml.schemas.records import Record
from streamml.schemas.spec import (
    TEXT_FEATURES,
    Agg,
    CategoricalFeature,
    ConstructedFeature,
    FeatureSpec,
    LastNFeature,
    NumericFeature,
    PipelineSpec,
    TimeFeature,
    WindowFeature,
)

OTHER = "__other__"
SEEN = "@seen_ms"  # entity state: the entity's newest event time (not a feature name)
CLOCK = "@clock_ms"  # partition state: the newest event time featurized
# ``frequency`` keeps the counts of at most this many categories per feature: past it the
# rarer half is forgotten (a forgotten category counts again from 1, as a rare one would).
FREQUENCY_MAX_CATEGORIES = 10_000
EXPANSION_SUFFIXES = frozenset(
    {"count", "sum", "mean", "std", "min", "max", "hour_sin", "hour_cos", "dow_sin", "dow_cos"}
)
Vector = dict[str, float]


class GlobalState:
    """Running statistics shared by all entities of a partition."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = data if data is not None else {}

    def standardize(self, name: str, x: float) -> float:
        """Welford update, then the z-score of ``x`` against the statistics so far."""
        n, mean, m2 = self.data.get(name, (0, 0.0, 0.0))
        n += 1
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
        self.data[name] = (n, mean, m2)
        std = math.sqrt(m2 / n) if n > 1 else 0.0
        return (x - mean) / std if std > 0 else 0.0

    def frequency(self, name: str, category: str, cap: int = FREQUENCY_MAX_CATEGORIES) -> float:
        """The share of records so far with ``category``, counting this one. Past ``cap``
        categories the rarer half of the counts is dropped, so the table stays bounded.

        >>> g = GlobalState()
        >>> [g.frequency("f", c, cap=4) for c in "aabcde"][-1]  # a, b kept; c, d, e new
        0.16666666666666666
        >>> sorted(g.data["f"])
        ['a', 'b', 'e']
        """
        counts: dict[str, int] = self.data.setdefault(name, {})
        seen = counts.get(category, 0) + 1
        counts[category] = seen
        total = self.data.get(name + "#total", 0) + 1
        self.data[name + "#total"] = total
        if len(counts) > cap:
            kept = sorted(counts.items(), key=lambda kv: kv[1], reverse=True)[: cap // 2]
            counts.clear()
            counts.update(kept)
            counts[category] = seen
        return float(seen / total)

    def advance(self, ts_ms: int) -> None:
        """Move the partition's event-time clock to ``ts_ms`` if that is newer."""
        if ts_ms > self.data.get(CLOCK, 0):
            self.data[CLOCK] = ts_ms

    @property
    def clock_ms(self) -> int:
        """The newest event time featurized in this partition (0: none yet)."""
        return int(self.data.get(CLOCK, 0))

    def onehot(self, name: str, category: str, cap: int) -> str:
        vocab: list[str] = self.data.setdefault(name, [])
        if category in vocab:
            return category
        if len(vocab) < cap:
            vocab.append(category)
            return category
        return OTHER


def _aggregate(stats: list[float], aggs: Iterable[Agg]) -> dict[str, float]:
    n, total, sumsq, lo, hi = stats
    mean = total / n if n else 0.0
    values = {
        "count": n,
        "sum": total,
        "mean": mean,
        "std": math.sqrt(max(0.0, sumsq / n - mean * mean)) if n else 0.0,
        "min": lo if n else 0.0,
        "max": hi if n else 0.0,
    }
    return {agg: float(values[agg]) for agg in aggs}


def _merge(stats: list[float], x: float) -> list[float]:
    n, total, sumsq, lo, hi = stats
    if n == 0:
        return [1, x, x * x, x, x]
    return [n + 1, total + x, sumsq + x * x, min(lo, x), max(hi, x)]


def window_update(
    state: dict[str, Any], feature: WindowFeature, ts_ms: int, x: float
) -> dict[str, float]:
    """Add ``x`` at ``ts_ms`` to the entity's window; return the aggregates including it.

    Tumbling: one bucket per window; a new window resets it. Hopping: buckets of
    ``step_s``; the window ending at the event covers the buckets of the last ``size_s``.
    """
    spec = feature.window
    step_ms = int((spec.step_s if spec.type == "hopping" and spec.step_s else spec.size_s) * 1000)
    size_ms = int(spec.size_s * 1000)
    bucket = ts_ms - ts_ms % step_ms
    buckets: list[list[float]] = state.setdefault(
        feature.name, []
    )  # [start, n, sum, sumsq, lo, hi]
    if buckets and buckets[-1][0] == bucket:
        buckets[-1][1:] = _merge(buckets[-1][1:], x)
    elif not buckets or bucket > buckets[-1][0]:
        buckets.append([bucket, *_merge([0, 0.0, 0.0, 0.0, 0.0], x)])
    else:  # a late event: add it to its bucket if still kept, else to the oldest
        target = next((b for b in buckets if b[0] == bucket), buckets[0])
        target[1:] = _merge(target[1:], x)
    newest = buckets[-1][0]
    keep_from = newest - size_ms + step_ms
    state[feature.name] = [b for b in buckets if b[0] >= keep_from]
    total = [0, 0.0, 0.0, 0.0, 0.0]
    for b in state[feature.name]:
        if total[0] == 0:
            total = list(b[1:])
        else:
            total = [
                total[0] + b[1],
                total[1] + b[2],
                total[2] + b[3],
                min(total[3], b[4]),
                max(total[4], b[5]),
            ]
    return {f"{feature.name}_{k}": v for k, v in _aggregate(total, feature.aggs).items()}


def last_n_update(state: dict[str, Any], feature: LastNFeature, x: float) -> dict[str, float]:
    values: list[float] = state.setdefault(feature.name, [])
    values.append(x)
    del values[: max(0, len(values) - feature.n)]
    stats = [0, 0.0, 0.0, 0.0, 0.0]
    for v in values:
        stats = _merge(stats, v)
    return {f"{feature.name}_{k}": v for k, v in _aggregate(stats, feature.aggs).items()}


def _num(value: Any, fill: float = 0.0) -> float:
    if value is None or isinstance(value, str):
        return fill
    x = float(value)
    return x if math.isfinite(x) else fill


def _hash_bucket(text: str, buckets: int) -> int:
    return zlib.crc32(text.encode("utf-8")) % buckets


class Featurizer:
    """Turns records into feature vectors as the spec declares."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        # text features are computed per batch (streamml.models.text), not here
        self.features: list[FeatureSpec] = [
            f for f in spec.features if not isinstance(f, TEXT_FEATURES)
        ]
        self._select = set(spec.select) if spec.select is not None else None
        self._exclude = set(spec.exclude)
        self._keep: dict[str, bool] = {}
        self._entity = any(isinstance(f, WindowFeature | LastNFeature) for f in self.features)

    @property
    def needs_entity_state(self) -> bool:
        return self._entity

    def transform(
        self, record: Record, global_state: GlobalState, entity_state: dict[str, Any]
    ) -> Vector:
        """The feature vector of one record; updates both states in place."""
        out: Vector = {}
        fields = record.fields
        if self._entity:  # the event times the entity TTL is measured with
            if record.ts_ms > entity_state.get(SEEN, -1):
                entity_state[SEEN] = record.ts_ms
            global_state.advance(record.ts_ms)
        for feature in self.features:
            if isinstance(feature, NumericFeature):
                x = _num(fields.get(feature.field), feature.fill)
                if feature.kind == "log1p":
                    x = math.log1p(max(x, 0.0))
                elif feature.kind == "clip":
                    lo = -math.inf if feature.lower is None else feature.lower
                    hi = math.inf if feature.upper is None else feature.upper
                    x = min(max(x, lo), hi)
                elif feature.kind == "standardize":
                    x = global_state.standardize(feature.name, x)
                out[feature.name] = x
            elif isinstance(feature, CategoricalFeature):
                raw = fields.get(feature.field)
                category = "" if raw is None else str(raw)
                if feature.kind == "onehot":
                    kept = global_state.onehot(feature.name, category, feature.max_categories)
                    out[f"{feature.name}={kept}"] = 1.0
                elif feature.kind == "frequency":
                    out[feature.name] = global_state.frequency(feature.name, category)
                else:
                    out[f"{feature.name}#{_hash_bucket(category, feature.buckets)}"] = 1.0
            elif isinstance(feature, TimeFeature):
                ts_ms = record.ts_ms if feature.field is None else fields.get(feature.field)
                moment = dt.datetime.fromtimestamp((ts_ms or 0) / 1000, dt.UTC)
                hour = moment.hour + moment.minute / 60
                dow = moment.weekday()
                out[f"{feature.name}_hour_sin"] = math.sin(2 * math.pi * hour / 24)
                out[f"{feature.name}_hour_cos"] = math.cos(2 * math.pi * hour / 24)
                out[f"{feature.name}_dow_sin"] = math.sin(2 * math.pi * dow / 7)
                out[f"{feature.name}_dow_cos"] = math.cos(2 * math.pi * dow / 7)
            elif isinstance(feature, ConstructedFeature):
                a, b = (_num(fields.get(f)) for f in feature.fields)
                if feature.kind == "ratio":
                    out[feature.name] = a / b if b != 0 else 0.0
                elif feature.kind == "interaction":
                    out[feature.name] = a * b
                else:
                    out[feature.name] = a - b
            elif isinstance(feature, WindowFeature):
                x = _num(fields.get(feature.field))
                out.update(window_update(entity_state, feature, record.ts_ms, x))
            elif isinstance(feature, LastNFeature):
                out.update(last_n_update(entity_state, feature, _num(fields.get(feature.field))))
        return self.select(out)

    def select(self, vector: Vector) -> Vector:
        """Feature selection: keep ``select`` (names or their expansions), drop ``exclude``."""
        keep = self._keep
        out: Vector = {}
        for k, v in vector.items():
            kept = keep.get(k)
            if kept is None:  # decided once per key: the keys of a spec are a small set
                kept = keep[k] = (
                    self._select is None or _matches(k, self._select)
                ) and not _matches(k, self._exclude)
            if kept:
                out[k] = v
        return out


def _matches(key: str, names: set[str]) -> bool:
    """Does ``key`` name one of ``names`` or an expansion (name=cat, name#bucket, name_<agg>)?"""
    for n in names:
        if key == n or key.startswith((n + "=", n + "#")):
            return True
        if key.startswith(n + "_"):
            suffix = key[len(n) + 1 :]
            if suffix in EXPANSION_SUFFIXES or suffix.isdigit():  # aggregates, embedding dims
                return True
    return False

"""Per-pipeline and per-partition state of one worker, and how it is logged to Kafka.

Each source partition owns its state: the entity windows, the featurizer's running
statistics, its online model, the features waiting for their label (joins) and the labels
that came before their event (early). Raw records and labels are keyed alike, so a
partition's events and labels meet in the worker that owns the partition.

Every change is also written to the pipeline's compacted state changelog
(``<app_id>-<pipeline>-state``, partitioned like the raw topic) under one of the keys
below, so the worker a partition moves to, or a restarted one, rebuilds it
(:meth:`PartitionState.restore`). Entity windows expire after the spec's entity TTL in
event time (``streamml.agents.expiry``), so neither memory nor the changelog grows with
the number of entities ever seen.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from streamml.models.drift import Detection, DriftMonitor
from streamml.models.features import SEEN, Featurizer, GlobalState
from streamml.models.online import OnlineLearner, Prediction
from streamml.models.text import TextFeaturizer, labeller_source, labeller_version
from streamml.schemas.pii import NO_PII, Protector, marked
from streamml.schemas.spec import PipelineSpec
from streamml.secrets import pii_key
from streamml.streams.topics import pipeline_topics, state_topic
from streamml.telemetry import Telemetry

if TYPE_CHECKING:
    from streamml.agents.annotate import Annotator
    from streamml.config import Settings


def _default_cache_dir() -> Path:
    from streamml.config import Settings

    return Settings().cache_dir


# Changelog keys: a one-letter kind, a colon, then the entity or event id.
WINDOW, JOIN, EARLY = b"w:", b"j:", b"e:"
STATS, MODEL, FRESH = b"s:", b"m:", b"f:"  # FRESH: an online model started at a change


@dataclass(frozen=True)
class Made:
    """One model's prediction for an event, as made when the event arrived: what the
    learn step scores once the label comes (never a re-prediction)."""

    version: str
    role: str  # champion | shadow | canary, at the time it was made
    served: bool
    prediction: Prediction

    def to_json(self) -> list[Any]:
        p = self.prediction
        return [self.version, self.role, self.served, p.score, p.predicted_class]

    @classmethod
    def from_json(cls, row: list[Any]) -> Made:
        version, role, served, score, predicted = row
        return cls(str(version), str(role), bool(served), Prediction(float(score), predicted, {}))


@dataclass
class MinuteMetrics:
    """One partition's metrics of one model (version and role) over the labels of one
    wall-clock minute."""

    version: str
    role: str
    start_ms: int
    metrics: dict[str, Any]
    n: int = 0


@dataclass(order=True)
class Held:
    """A fetched raw record or label, sortable into the order it was produced: record
    timestamp, then the producer's sequence header (``streamml-seq``, which orders records
    of one producer within a millisecond), then raw before label, then offset."""

    key: tuple[int, int, int, int]
    is_label: bool = field(compare=False)
    message: Any = field(compare=False)  # aiokafka ConsumerRecord
    fetched_at: float = field(compare=False)  # time.monotonic() when it was fetched


class EntityWindows(dict[str, dict[str, Any]]):
    """Entity -> window state, in the order the entities were last stored: storing a key
    again moves it to the end, so the entities longest untouched come first and expiry
    reads only the front (amortised O(1) per event, never a scan of every entity).

    >>> w = EntityWindows(a={}, b={})
    >>> w["a"] = {}
    >>> list(w)
    ['b', 'a']
    """

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        if key in self:
            super().__delitem__(key)
        super().__setitem__(key, value)


def last_seen_ms(window: dict[str, Any]) -> int:
    """The newest event time of an entity's window state (0 when it never recorded one)."""
    return int(window.get(SEEN, 0))


@dataclass
class PartitionState:
    partition: int
    learner: OnlineLearner
    stats: GlobalState
    fresh: OnlineLearner | None = None  # a new online model started at a confirmed change
    windows: EntityWindows = field(default_factory=EntityWindows)
    # entities dropped on restore as already past the TTL, to tombstone in the changelog
    stale: list[str] = field(default_factory=list)
    # event_id -> (stored at, ms; features; event time, ms; the predictions made then)
    joins: dict[str, tuple[int, dict[str, float], int, list[Made]]] = field(default_factory=dict)
    # event_id -> (stored at, ms; label)
    early: dict[str, tuple[int, Any]] = field(default_factory=dict)
    dirty_windows: set[str] = field(default_factory=set)
    stats_dirty: bool = False
    minutes: dict[tuple[str, str], MinuteMetrics] = field(default_factory=dict)
    snapshot_at: float = field(default_factory=time.monotonic)
    snapshot_learned: int = 0
    monitor: DriftMonitor | None = None
    # drift detections of this batch, with the event time they fired at and the event
    # time where the detector estimates the change began (None: no estimate)
    detections: list[tuple[Detection, int, int | None]] = field(default_factory=list)
    metrics_sent_at: float = field(default_factory=time.monotonic)
    # fetched records not applied yet, waiting for the other topic to catch up in event
    # order (not logged: their offsets are not committed, a new owner reads them again)
    held: list[Held] = field(default_factory=list)

    @classmethod
    def restore(
        cls, spec: PipelineSpec, partition: int, log: dict[bytes, tuple[bytes, int]]
    ) -> PartitionState:
        """Rebuild a partition from the latest changelog value of each key. Windows are
        ordered by their entity's newest event; those already past the entity TTL (against
        the newest event restored) are left out and listed in ``stale`` to tombstone.
        Joins and early labels keep the time they were logged at (their wall-clock TTL)."""
        model = log.get(MODEL)
        learner = OnlineLearner.restore(spec, model[0]) if model else OnlineLearner(spec)
        stats = log.get(STATS)
        state = cls(partition, learner, GlobalState(orjson.loads(stats[0]) if stats else None))
        state.snapshot_learned = learner.learned
        fresh = log.get(FRESH)
        if fresh:
            state.fresh = OnlineLearner.restore(spec, fresh[0])
        state.monitor = DriftMonitor(spec)
        windows: list[tuple[int, str, dict[str, Any]]] = []
        for key, (value, ts_ms) in log.items():
            kind, ident = key[:2], key[2:].decode("utf-8")
            if kind == WINDOW:
                window = orjson.loads(value)
                windows.append((last_seen_ms(window), ident, window))
            elif kind == JOIN:
                stored = orjson.loads(value)
                made = [Made.from_json(row) for row in stored.get("predictions") or ()]
                state.joins[ident] = (
                    ts_ms,
                    stored["features"],
                    int(stored.get("ts_ms") or 0),
                    made,
                )
            elif kind == EARLY:
                state.early[ident] = (ts_ms, orjson.loads(value)["label"])
        state._restore_windows(spec, windows)
        return state

    def _restore_windows(
        self, spec: PipelineSpec, windows: list[tuple[int, str, dict[str, Any]]]
    ) -> None:
        clock = max(self.stats.clock_ms, max((w[0] for w in windows), default=0))
        self.stats.advance(clock)
        cutoff = clock - spec.entity_ttl_s * 1000
        for seen, ident, window in sorted(windows, key=lambda w: w[0] or clock):
            if not seen:  # logged before entities kept their event time: from now on
                window[SEEN] = clock
            elif seen < cutoff:
                self.stale.append(ident)
                continue
            self.windows[ident] = window


@dataclass
class PipelineRuntime:
    spec: PipelineSpec
    featurizer: Featurizer
    topics: dict[str, str]
    partitions: int
    telemetry: Telemetry
    states: dict[int, PartitionState] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    # dead letters since the engine last read them, by error class (its circuit breaker)
    failures: Counter[str] = field(default_factory=Counter)
    # protects the spec's pii fields right after validation, and every dead letter
    pii: Protector = NO_PII
    # the spec's text features, computed per batch (None: the spec has none)
    text: TextFeaturizer | None = None
    labeller_source: str = ""  # zero_shot:<feature> when the spec asks for weak labels
    labeller_version: str = ""  # the labeller's model version (computed once, not per event)
    annotator: Annotator | None = None  # sampled background jobs (summaries, judge)

    @classmethod
    def from_spec(
        cls,
        spec: PipelineSpec,
        app_id: str,
        default_partitions: int,
        telemetry: Telemetry,
        settings: Settings | None = None,
    ) -> PipelineRuntime:
        """The runtime of one pipeline; ``settings`` give the PII key, read (or generated)
        only when the spec marks a field pii, which then needs them."""
        partitions = spec.topics.partitions or default_partitions
        topics = {**pipeline_topics(spec), "state": state_topic(app_id, spec)}
        pii = NO_PII
        if marked(spec):
            if settings is None:
                raise ValueError(f"{spec.name}: fields marked pii need the settings' PII key")
            pii = Protector.for_spec(spec, pii_key(settings))
        featurizer = Featurizer(spec)
        text = None
        if spec.text_features:
            cache_dir = settings.cache_dir if settings is not None else _default_cache_dir()
            text = TextFeaturizer(spec, cache_dir, select=featurizer.select)
        return cls(
            spec,
            featurizer,
            topics,
            partitions,
            telemetry,
            pii=pii,
            text=text,
            labeller_source=labeller_source(spec) or "",
            labeller_version=labeller_version(spec) if spec.annotate.weak_labels else "",
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def learners(self) -> dict[int, OnlineLearner]:
        return {p: s.learner for p, s in sorted(self.states.items())}

    def online(self, state: PartitionState, version: str) -> OnlineLearner | None:
        """The partition's online model of that version: the pipeline's, or a fresh one."""
        if state.learner.version == version:
            return state.learner
        if state.fresh is not None and state.fresh.version == version:
            return state.fresh
        return None

"""Per-pipeline and per-partition state of one worker, and how it is logged to Kafka.

Each source partition owns its state: the entity windows, the featurizer's running
statistics, its online model, the features waiting for their label (joins) and the labels
that came before their event (early). Raw records and labels are keyed alike, so a
partition's events and labels meet in the worker that owns the partition.

Every change is also written to the pipeline's compacted state changelog
(``<app_id>-<pipeline>-state``, partitioned like the raw topic) under one of the keys
below, so the worker a partition moves to, or a restarted one, rebuilds it
(:meth:`PartitionState.restore`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from streamml.models.drift import Detection, DriftMonitor
from streamml.models.features import Featurizer, GlobalState
from streamml.models.online import OnlineLearner, Prediction
from streamml.schemas.spec import PipelineSpec
from streamml.streams.topics import pipeline_topics, state_topic
from streamml.telemetry import Telemetry

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


@dataclass
class PartitionState:
    partition: int
    learner: OnlineLearner
    stats: GlobalState
    fresh: OnlineLearner | None = None  # a new online model started at a confirmed change
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)
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
        """Rebuild a partition from the latest changelog value of each key."""
        model = log.get(MODEL)
        learner = OnlineLearner.restore(spec, model[0]) if model else OnlineLearner(spec)
        stats = log.get(STATS)
        state = cls(partition, learner, GlobalState(orjson.loads(stats[0]) if stats else None))
        state.snapshot_learned = learner.learned
        fresh = log.get(FRESH)
        if fresh:
            state.fresh = OnlineLearner.restore(spec, fresh[0])
        state.monitor = DriftMonitor(spec)
        for key, (value, ts_ms) in log.items():
            kind, ident = key[:2], key[2:].decode("utf-8")
            if kind == WINDOW:
                state.windows[ident] = orjson.loads(value)
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
        return state


@dataclass
class PipelineRuntime:
    spec: PipelineSpec
    featurizer: Featurizer
    topics: dict[str, str]
    partitions: int
    telemetry: Telemetry
    states: dict[int, PartitionState] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)

    @classmethod
    def from_spec(
        cls, spec: PipelineSpec, app_id: str, default_partitions: int, telemetry: Telemetry
    ) -> PipelineRuntime:
        partitions = spec.topics.partitions or default_partitions
        topics = {**pipeline_topics(spec), "state": state_topic(app_id, spec)}
        return cls(spec, Featurizer(spec), topics, partitions, telemetry)

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

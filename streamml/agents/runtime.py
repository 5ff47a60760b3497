"""Per-pipeline state shared by the agents of one worker: spec, featurizer, online models.

Each source partition has its own online model (labels are keyed like raw records, so a
partition's features and labels meet in the same worker); the model and the
featurizer's running statistics are snapshotted to changelogged Faust tables, so a
restarted worker, or the worker a partition moves to, resumes them.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from streamml import telemetry
from streamml.models.features import Featurizer, GlobalState
from streamml.models.online import OnlineLearner
from streamml.schemas.spec import PipelineSpec
from streamml.streams.topics import pipeline_topics
from streamml.telemetry import Telemetry


@dataclass
class PipelineRuntime:
    spec: PipelineSpec
    featurizer: Featurizer
    topics: dict[str, str]
    partitions: int
    telemetry: Telemetry
    learners: dict[int, OnlineLearner] = field(default_factory=dict)
    feature_states: dict[int, GlobalState] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)

    @classmethod
    def from_spec(
        cls, spec: PipelineSpec, default_partitions: int, telemetry: Telemetry
    ) -> PipelineRuntime:
        partitions = spec.topics.partitions or default_partitions
        return cls(spec, Featurizer(spec), pipeline_topics(spec), partitions, telemetry)

    @property
    def name(self) -> str:
        return self.spec.name

    def learner(self, partition: int, load: Callable[[], Any]) -> OnlineLearner:
        """The partition's online model; ``load`` reads its snapshot, only the first time."""
        learner = self.learners.get(partition)
        if learner is None:
            snapshot = load()
            if isinstance(snapshot, str) and snapshot:
                learner = OnlineLearner.restore(self.spec, base64.b64decode(snapshot))
                self.counters["model_restored"] += 1
            else:
                learner = OnlineLearner(self.spec)
            self.learners[partition] = learner
        return learner

    def feature_state(self, partition: int, load: Callable[[], Any]) -> GlobalState:
        """The partition's running statistics; ``load`` reads its snapshot the first time."""
        state = self.feature_states.get(partition)
        if state is None:
            snapshot = load()
            state = GlobalState(dict(snapshot) if isinstance(snapshot, dict) else None)
            self.feature_states[partition] = state
        return state


Handler = Callable[[Any], Awaitable[str | None]]


async def run_step(stream: Any, rt: PipelineRuntime, step: str, handle: Handler) -> None:
    """Feed a Faust stream to ``handle`` one event at a time, each in its own span
    (continuing the trace in the record's headers), counted and timed per outcome.

    One event at a time: batching with take_events() lost records (docs/architecture.md);
    the accounting tests hold with this."""
    tel = rt.telemetry
    span_name = f"{rt.name}.{step}"
    async for event in stream.events():
        message = event.message
        t0 = time.perf_counter()
        with tel.tracer.start_as_current_span(
            span_name, context=telemetry.extract(message.headers)
        ):
            outcome = await handle(message)
        tel.count(rt.name, step, outcome or "ok")
        tel.observe(rt.name, step, (time.perf_counter() - t0) * 1000)

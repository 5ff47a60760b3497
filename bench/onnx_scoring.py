"""Per-event cost of scoring with the ONNX champion inside the agent vs raw onnxruntime.

    ~/.cache/streamml/venv/bin/python bench/onnx_scoring.py [--events 5000] [--batch 500]

Trains the demo spec's MLP on synthetic payments (featurized by the pipeline's own
featurizer), exports it to ONNX, then measures on the same model and the same vectors:

* raw: ``session.run`` on prepared float32 arrays (one row per call, and ``--batch`` rows);
* in-agent: the score step's call (``agents.score.batch_outputs``: feature dicts -> array ->
  onnxruntime -> Prediction objects), one event per call and ``--batch`` per call;
* in-agent, whole step: ``batch_outputs`` + ``serve`` per event, also encoding the features
  and prediction records
  for Kafka (what a batch of the engine costs per event).

Prints microseconds per event and the ratios in-agent / raw. No Kafka needed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from streamml import telemetry
from streamml.agents.runtime import PartitionState, PipelineRuntime
from streamml.agents.score import Scored, batch_outputs, serve
from streamml.config import Settings
from streamml.models.features import Featurizer, GlobalState
from streamml.models.online import OnlineLearner
from streamml.models.onnx_model import OnnxScorer, export_onnx
from streamml.models.serving import Deployment, Slot
from streamml.models.synthetic import payments
from streamml.models.training import frame_from_rows, train
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.records import Source, validate
from streamml.streams.topics import dumps

ROOT = Path(__file__).resolve().parents[1]


class _NullOutbox:
    """Counts what the step would send; the bench measures the step, not Kafka."""

    records = 0

    def add(self, *args: object, **kwargs: object) -> None:
        self.records += 1


def _step(
    rt: PipelineRuntime,
    state: PartitionState,
    items: list[Scored],
    deployment: Deployment,
    out: _NullOutbox,
) -> None:
    """The score step as the engine runs it: one batch call, then each event served."""
    batch = batch_outputs(deployment, items)
    for i, it in enumerate(items):
        serve(rt, state, it, i, batch, deployment, out)  # type: ignore[arg-type]


def _per_event_us(fn, n_events: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / n_events * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    [spec] = load_pipelines(ROOT / "pipelines", ["demo"])
    assert spec.batch_model is not None
    spec = spec.model_copy(
        update={"batch_model": spec.batch_model.model_copy(update={"search": None, "epochs": 5})}
    )
    featurizer, stats, windows = Featurizer(spec), GlobalState(), {}
    rows, records = [], []
    for i, ex in enumerate(payments(args.events, seed=5)):
        record = validate(spec, dumps(ex.record), Source("raw", 0, i, 0, None))
        vector = featurizer.transform(record, stats, windows.setdefault(record.entity_key, {}))
        rows.append((record.event_id, record.ts_ms, vector, ex.label))
        records.append((record, vector))
    result = train(spec, frame_from_rows(rows))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(result, path)
        scorer = OnnxScorer(
            path, result.feature_names, result.classes, spec.task, positive=spec.label.positive
        )
        vectors = [v for _, v in records]
        held = [Scored(None, r, v, (), "") for r, v in records]  # type: ignore[arg-type]
        X = np.stack([scorer.vectorize(v) for v in vectors]).astype(scorer.dtype)
        session, name = scorer.session, scorer.session.get_inputs()[0].name
        n, b = len(vectors), args.batch

        raw_single = _per_event_us(
            lambda: [session.run(None, {name: X[i : i + 1]}) for i in range(n)], n
        )
        raw_batch = _per_event_us(
            lambda: [session.run(None, {name: X[i : i + b]}) for i in range(0, n, b)], n
        )
        slot = Slot("champion", "batch", "mlp", "v1", scorer=scorer)
        deployment = Deployment(slot)
        state = PartitionState(0, OnlineLearner(spec), GlobalState())
        agent_single = _per_event_us(lambda: [batch_outputs(deployment, [it]) for it in held], n)
        agent_batch = _per_event_us(
            lambda: [batch_outputs(deployment, held[i : i + b]) for i in range(0, n, b)], n
        )
        settings = Settings(state_dir=Path(tmp))
        rt = PipelineRuntime.from_spec(spec, "bench", 1, telemetry.setup(settings))

        class _Message:
            def __init__(self, i: int) -> None:
                self.key, self.timestamp, self.partition, self.offset = b"k", 0, 0, i

        items = [Scored(_Message(i), r, v, (), "") for i, (r, v) in enumerate(records)]  # type: ignore[arg-type]
        out = _NullOutbox()
        step_batch = _per_event_us(
            lambda: [
                _step(rt, state, items[i : i + b], deployment, out)  # type: ignore[arg-type]
                for i in range(0, n, b)
            ],
            n,
        )
    print(f"features {len(result.feature_names)}  events {n}  batch {b}")
    print(f"raw_onnxruntime_single_us_per_event {raw_single:.1f}")
    print(f"in_agent_single_us_per_event {agent_single:.1f}")
    print(f"ratio_in_agent_over_raw_single {agent_single / raw_single:.2f}")
    print(f"raw_onnxruntime_batch_us_per_event {raw_batch:.2f}")
    print(f"in_agent_batch_us_per_event {agent_batch:.2f}")
    print(f"ratio_in_agent_over_raw_batch {agent_batch / raw_batch:.2f}")
    print(f"in_agent_whole_score_step_batch_us_per_event {step_batch:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

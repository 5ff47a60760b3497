"""The model lifecycle as users drive it: train from the warehouse, evaluate, export and
check ONNX, register, deploy, promote, roll back, archive.

Every step that changes something is also an event on ``streamml.control`` (the audit
trail; scorers hot-swap on the deployment ones). ``streamml train`` and ``streamml
models ...`` call these functions; so does the demo.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # type: ignore[import-untyped]

from streamml import sql
from streamml.config import Settings
from streamml.errors import RegistryError, TrainingError
from streamml.models import evaluation, training
from streamml.models.drift import Reference
from streamml.models.onnx_model import OnnxScorer, check_parity, export_onnx
from streamml.models.registry import ModelVersion, Registry
from streamml.models.serving import load_scorer, online_version
from streamml.schemas.control import ControlEvent
from streamml.schemas.records import label_problem
from streamml.schemas.spec import PipelineSpec
from streamml.streams import control
from streamml.streams.warehouse import run_query

log = logging.getLogger("streamml.lifecycle")
Progress = Callable[[int, int, float, float], None]


@dataclass(frozen=True)
class Window:
    """Which labelled events to train on: a time range (ms) and/or the last N events.
    ``cutoff_ms``: only labels the warehouse knew by then count (point in time)."""

    since_ms: int | None = None
    until_ms: int | None = None
    last_events: int | None = None
    cutoff_ms: int | None = None


@dataclass
class Outcome:
    version: ModelVersion
    report: evaluation.EvaluationReport
    report_dir: Path
    parity_max_diff: float
    deployed_as: str  # challenger-shadow | challenger-canary | champion | archived
    champion_version: str
    champion_metrics: dict[str, float] | None
    events: list[ControlEvent] = field(default_factory=list)


def _label(text: str) -> Any:
    """A label as the warehouse stores it (text) back to its value."""
    if text in ("True", "False"):
        return text == "True"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def training_query(spec: PipelineSpec, window: Window) -> sql.Query:
    """Features joined with labels, point-in-time correct: each event's features as the
    pipeline computed them at event time, and only labels known by the cutoff."""
    cutoff = window.cutoff_ms if window.cutoff_ms is not None else window.until_ms
    return sql.training_rows(
        spec.name, window.since_ms, window.until_ms, cutoff, window.last_events
    )


Query = sql.Runner


def _query(settings: Settings, query: Query | None) -> Query:
    return query if query is not None else lambda text, params: run_query(settings, text, params)


def read_training_rows(
    settings: Settings, spec: PipelineSpec, window: Window, query: Query | None = None
) -> Any:
    """The training frame (one row per labelled event, a column per feature)."""
    result = sql.run(_query(settings, query), training_query(spec, window))
    rows, refused = [], Counter[str]()
    for e, ts, f, y in result.rows:
        label = _label(str(y))
        problem = label_problem(spec, label)
        if problem is None:
            rows.append((str(e), int(ts), dict(f), label))
        else:  # stored before labels were validated: not something to learn
            refused[problem] += 1
    if refused:
        log.warning(
            "%s: %d labelled events left out of training, their labels do not fit the spec: %s",
            spec.name,
            refused.total(),
            "; ".join(f"{n} x {why}" for why, n in refused.most_common(5)),
        )
    if not rows:
        raise TrainingError(
            f"{spec.name}: no labelled events with features in the warehouse for this window",
            hint="stream events and labels through the pipeline first (streamml produce)",
        )
    return training.frame_from_rows(rows)


def champion_metrics(
    settings: Settings,
    spec: PipelineSpec,
    registry: Registry,
    result: training.TrainResult,
    frame: Any,
    query: Query | None = None,
) -> tuple[str, dict[str, float] | None]:
    """The serving champion measured on the candidate's test rows: a batch champion is
    re-scored; the online champion by the predictions it served for those events."""
    data = training.prepare(spec, frame, feature_names=result.feature_names, classes=result.classes)
    start = int(np.searchsorted(data.ts_ms, result.splits.test.ts_min_ms, side="left"))
    test = data.take(slice(start, None))
    entry = registry.champion(spec.name)
    if entry is not None:
        scorer = OnnxScorer(
            entry.artifact, entry.feature_names, list(entry.classes or []), entry.task
        )
        X = np.zeros((len(test), len(entry.feature_names)), dtype=np.float32)
        index = {n: j for j, n in enumerate(entry.feature_names)}
        for j, name in enumerate(result.feature_names):
            if name in index:
                X[:, index[name]] = test.X[:, j]
        outputs = scorer.predict_batch(X)
        threshold = _champion_threshold(scorer, result)
        aligned = _align(outputs, entry, result)
        return entry.version, evaluation.metrics_for(test, aligned, threshold)
    version = online_version(spec)
    served = sql.run(
        _query(settings, query), sql.served_scores(spec.name, version, list(test.event_ids))
    )
    found = {str(r[0]): (float(r[1]), dict(r[2])) for r in served.rows}
    keep = [i for i, e in enumerate(test.event_ids) if e in found]
    if len(keep) < max(1, len(test) // 2):
        return version, None  # the online model did not serve these events
    subset = test.take(keep)
    if spec.task == "regression":
        outputs = np.asarray([[found[subset.event_ids[i]][0]] for i in range(len(subset))])
    else:
        keys = [str(c) for c in result.classes]
        outputs = np.asarray(
            [[found[e][1].get(k, 0.0) for k in keys] for e in subset.event_ids], dtype=np.float32
        )
    return version, evaluation.metrics_for(subset, outputs.astype(np.float32))


def _champion_threshold(scorer: OnnxScorer, result: training.TrainResult) -> float | None:
    """The champion's own decision threshold, when it cuts the candidate's positive class
    (so its metrics are those it serves); otherwise None (most probable class)."""
    if scorer.threshold is None or scorer.threshold_index is None:
        return None
    if result.positive_index is None:
        return None
    same = scorer.class_keys[scorer.threshold_index] == str(result.classes[result.positive_index])
    return scorer.threshold if same else None


def _align(outputs: Any, entry: ModelVersion, result: training.TrainResult) -> Any:
    """A champion's class columns in the candidate's class order."""
    if result.task == "regression":
        return outputs
    theirs = [str(c) for c in (entry.classes or [])]
    cols = [theirs.index(str(c)) if str(c) in theirs else None for c in result.classes]
    aligned = np.zeros((len(outputs), len(cols)), dtype=np.float32)
    for j, col in enumerate(cols):
        if col is not None:
            aligned[:, j] = outputs[:, col]
    return aligned


# train + cross-validate (evaluation.fit_and_validate, or the same in another process) on
# the labelled frame and the weakly labelled one (or None)
Fit = Callable[
    [PipelineSpec, pd.DataFrame, pd.DataFrame | None],
    tuple[training.TrainResult, evaluation.CVResult | None],
]


def read_weak_rows(
    settings: Settings, spec: PipelineSpec, window: Window, query: Query | None = None
) -> pd.DataFrame | None:
    """The weakly labelled events of the window with no true label (a frame with a
    ``confidence`` column), when the spec trains on weak labels; else None."""
    weak = spec.annotate.weak_labels
    if weak is None or not weak.train or spec.task != "classification":
        return None
    cutoff = window.cutoff_ms if window.cutoff_ms is not None else window.until_ms
    found = sql.weak_training_rows(
        spec.name, f"zero_shot:{weak.feature}", window.since_ms, window.until_ms, cutoff
    )
    rows = sql.run(_query(settings, query), found).rows
    usable = [(str(e), int(ts), dict(f), _label(str(y)), float(c)) for e, ts, f, y, c in rows]
    usable = [
        r for r in usable if r[4] >= weak.min_confidence and label_problem(spec, r[3]) is None
    ]
    if not usable:
        return None
    frame = training.frame_from_rows([r[:4] for r in usable])
    frame["confidence"] = [r[4] for r in usable]
    return frame


class _Clock:
    """Seconds per phase of a retrain, for the log."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.t))
        self.t = now

    def __str__(self) -> str:
        return ", ".join(f"{name} {s:.1f} s" for name, s in self.laps)


def train_and_register(
    settings: Settings,
    spec: PipelineSpec,
    window: Window,
    *,
    progress: Progress | None = None,
    reason: str = "manual",
    deploy: bool = True,
    query: Query | None = None,
    fit: Fit | None = None,
) -> Outcome:
    """Train, evaluate against the champion, export + parity-check ONNX, register; then
    deploy per the decision (challenger, or champion when the spec serves batch and none
    exists yet) or archive. ``fit`` trains on the frame (default: :func:`training.train`
    here; the trainer role runs it in a process of its own)."""
    if spec.batch_model is None:
        raise TrainingError(f"{spec.name}: the spec has no batch_model section")
    registry = Registry.from_settings(settings)
    cutoff = window.cutoff_ms or int(time.time() * 1000)
    window = Window(window.since_ms, window.until_ms, window.last_events, cutoff)
    clock = _Clock()
    frame = read_training_rows(settings, spec, window, query)
    weak = read_weak_rows(settings, spec, window, query)
    clock.lap("read")
    cv = None
    if fit is not None:
        result, cv = fit(spec, frame, weak)
    else:
        result = training.train(spec, frame, progress=progress, weak=weak)
    clock.lap("fit")
    champ_version, champ = champion_metrics(settings, spec, registry, result, frame, query)
    report = evaluation.evaluate(spec, result, frame, champion_metrics=champ, cv=cv)
    clock.lap("evaluate")
    events = [
        ControlEvent.new(
            spec.name,
            "trained",
            reason=reason,
            details={
                "rows": len(frame),
                "weak_rows": result.weak_rows,
                "best_params": report.best_params,
                "seed": result.seed,
                "threshold": result.threshold,
                "window": {"since_ms": window.since_ms, "until_ms": window.until_ms},
            },
        )
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(result, path)
        data = training.prepare(spec, frame, feature_names=result.feature_names)
        test_rows = data.take(result.splits.test.slice)
        tolerance = spec.batch_model.onnx.parity_tolerance
        diff = check_parity(result, path, test_rows.X, tolerance)
        ts = data.ts_ms
        parent = registry.champion(spec.name)
        version = registry.register(
            spec.name,
            path,
            kind="batch",
            model_name=spec.batch_model.kind,
            spec_hash=spec.spec_hash,
            feature_names=list(result.feature_names),
            classes=[str(c) for c in result.classes] if spec.task == "classification" else None,
            task=spec.task,
            training_window={
                "start": int(ts.min()),
                "end": int(ts.max()),
                "rows": len(frame),
            },
            metrics=report.metrics,
            params=dict(report.best_params),
            parent_version=parent.version if parent else None,
            extra={
                "parity_max_abs_diff": diff,
                "champion_compared": champ_version,
                # binary: positive iff p(positive) >= threshold; the ONNX file carries it too
                "threshold": result.threshold,
                "threshold_metric": result.threshold_metric,
                "reference": drift_reference(spec, result, data),
            },
        )
    clock.lap("export+register")
    report_dir = settings.reports_path / spec.name / version.version
    decision = report.decision
    assert decision is not None
    events.append(
        ControlEvent.new(
            spec.name,
            "evaluated",
            version=version.version,
            previous=champ_version,
            reason=decision.reason,
            details={"metrics": report.metrics, "champion": champ, "deploy": decision.deploy},
        )
    )
    events.append(_event(spec, "registered", version, reason=f"parity max diff {diff:.2e}"))
    deployed_as = "registered"
    if deploy:
        deployed_as, event = _deploy(registry, spec, version, decision.deploy, decision.reason)
        events.append(event)
    asyncio.run(control.publish(settings, *events))
    # the report after the model is out: its pictures take seconds the loop need not wait
    evaluation.write_report(report, report_dir)
    clock.lap("deploy+report")
    log.info("%s %s: %d rows, %s", spec.name, version.version, len(frame), clock)
    return Outcome(
        registry.get(spec.name, version.version),
        report,
        report_dir,
        diff,
        deployed_as,
        champ_version,
        champ,
        events,
    )


def drift_reference(
    spec: PipelineSpec, result: training.TrainResult, data: training.Dataset
) -> dict[str, Any] | None:
    """The training rows' distribution of the monitored features and of the model's score,
    stored with the model: data and prediction drift are measured against it."""
    drift = spec.drift
    if drift.data is None and drift.prediction is None:
        return None
    train = data.take(result.splits.train.slice)
    wanted = drift.data.features if drift.data is not None and drift.data.features else None
    columns: dict[str, list[float]] = {
        name: train.X[:, j].tolist()
        for j, name in enumerate(result.feature_names)
        if drift.data is not None and (wanted is None or name in wanted)
    }
    if drift.prediction is not None:
        outputs = training.predict(result.model, train.X)
        column = result.positive_index if result.positive_index is not None else 0
        columns["score"] = outputs[:, column if outputs.shape[1] > 1 else 0].tolist()
    bins = drift.data.bins if drift.data is not None else drift.prediction.bins  # type: ignore[union-attr]
    return Reference.from_columns(columns, bins=bins).to_json()


def _deploy(
    registry: Registry, spec: PipelineSpec, version: ModelVersion, accept: bool, why: str
) -> tuple[str, ControlEvent]:
    name = spec.name
    if not accept:
        entry = registry.archive(name, version.version, reason=why)
        return "archived", _event(spec, "archived", entry, reason=why)
    if spec.serving.champion == "batch" and registry.champion(name) is None:
        entry = registry.promote(name, version.version, reason=why)
        return "champion", _event(spec, "promoted", entry, reason=why)
    mode = spec.serving.challenger_mode
    share = spec.serving.canary_share if mode == "canary" else None
    entry = registry.set_challenger(name, version.version, mode, share, reason=why)
    return f"challenger-{mode}", _event(spec, "challenger_set", entry, reason=why)


def _event(
    spec: PipelineSpec, action: str, entry: ModelVersion, *, reason: str, previous: str = ""
) -> ControlEvent:
    return ControlEvent.new(
        spec.name,
        action,
        version=entry.version,
        previous=previous,
        reason=reason,
        model={**entry.to_row(), **entry.extra_columns()},
    )


# --- operations of `streamml models` ------------------------------------------------
def promote(
    settings: Settings, spec: PipelineSpec, version: str | None, reason: str
) -> ModelVersion:
    registry = Registry.from_settings(settings)
    before = registry.champion(spec.name)
    if version is not None:  # refuse a model that would not load, before any stage changes
        load_scorer(registry, spec, registry.get(spec.name, version))
    entry = registry.promote(spec.name, version, reason=reason)
    events = [
        _event(spec, "promoted", entry, reason=reason, previous=before.version if before else "")
    ]
    if before is not None:  # the old champion's row changes stage too
        events.append(
            _event(spec, "archived", registry.get(spec.name, before.version), reason="replaced")
        )
    asyncio.run(control.publish(settings, *events))
    return entry


def rollback(settings: Settings, spec: PipelineSpec, reason: str) -> str:
    """Bring back the previous champion; after the first batch champion that is the online
    model. Returns the version now serving."""
    registry = Registry.from_settings(settings)
    before = registry.champion(spec.name)
    if before is None:
        raise RegistryError(
            f"{spec.name} has no batch champion to roll back: the online model serves",
            hint="see `streamml models list " + spec.name + "`",
        )
    if registry.can_roll_back(spec.name):
        serving = registry.rollback(spec.name, reason=reason)
        now = serving.version
        events = [_event(spec, "rolled_back", serving, reason=reason, previous=before.version)]
    else:
        retired = registry.retire_champion(spec.name, reason=reason)
        now = online_version(spec)
        events = [
            ControlEvent.new(
                spec.name, "rolled_back", version=now, previous=before.version, reason=reason
            )
        ]
        del retired
    archived = registry.get(spec.name, before.version)
    events.append(_event(spec, "archived", archived, reason=f"rolled back: {reason}"))
    asyncio.run(control.publish(settings, *events))
    return now


def serve_online(
    settings: Settings, spec: PipelineSpec, reason: str, fresh: str | None = None
) -> str:
    """Let the pipeline's online model serve: the batch champion, if any, is retired
    (archived, and still in ``rollback``'s history). With ``fresh``, the fresh online model
    started at the last change is promoted: the engines give its weights to the online
    model. Returns the version promoted."""
    registry = Registry.from_settings(settings)
    before = registry.champion(spec.name)
    if before is None and fresh is None:
        raise RegistryError(f"{spec.name}: the online model serves already")
    if before is not None:
        registry.retire_champion(spec.name, reason=reason)
    now = fresh or online_version(spec)
    previous = before.version if before is not None else online_version(spec)
    events = [
        ControlEvent.new(spec.name, "promoted", version=now, previous=previous, reason=reason)
    ]
    if before is not None:
        events.append(
            _event(spec, "archived", registry.get(spec.name, before.version), reason="replaced")
        )
    asyncio.run(control.publish(settings, *events))
    return now


def archive(settings: Settings, spec: PipelineSpec, version: str, reason: str) -> ModelVersion:
    registry = Registry.from_settings(settings)
    entry = registry.archive(spec.name, version, reason=reason)
    asyncio.run(control.publish(settings, _event(spec, "archived", entry, reason=reason)))
    return entry


def set_challenger(
    settings: Settings,
    spec: PipelineSpec,
    version: str,
    mode: str,
    share: float | None,
    reason: str,
) -> ModelVersion:
    registry = Registry.from_settings(settings)
    load_scorer(registry, spec, registry.get(spec.name, version))  # refuse a bad artifact
    entry = registry.set_challenger(spec.name, version, mode, share, reason=reason)
    asyncio.run(control.publish(settings, _event(spec, "challenger_set", entry, reason=reason)))
    return entry


def request_retrain(settings: Settings, spec: PipelineSpec, reason: str) -> ControlEvent:
    """Ask the trainer for a retrain now (the same event drift and the schedule send)."""
    event = ControlEvent.new(
        spec.name,
        "retrain_requested",
        reason=reason,
        details={"source": "manual", "since_ms": None, "last_events": spec.retrain.last_events},
    )
    asyncio.run(control.publish(settings, event))
    return event

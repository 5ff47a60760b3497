"""Drift monitors: delays on known change points, quiet on stationary streams, PSI."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamml.models import synthetic
from streamml.models.drift import (
    SCORE,
    Detection,
    DriftMonitor,
    Reference,
    change_point,
    kolmogorov_tail,
    latest_rise,
    psi,
)
from streamml.models.features import Featurizer, GlobalState
from streamml.models.online import OnlineLearner
from streamml.schemas.records import Record, Source, validate
from streamml.schemas.spec import PipelineSpec, load_spec, parse_spec

PIPELINES = Path(__file__).resolve().parents[3] / "pipelines"
CHANGE = 3000  # the error rate jumps from 0.1 to 0.4 after this many errors
# Delays measured over 50 seeds of the stream below (river 0.26, default params), in
# errors: adwin 40-136, page_hinkley 82-225, ddm 19-1099. The bounds leave a margin.
DELAY_BOUND = {"adwin": 250, "page_hinkley": 400, "ddm": 1600}


def _spec(drift: dict[str, Any], task: str = "classification", **more: Any) -> PipelineSpec:
    kind = "logistic_regression" if task == "classification" else "linear_regression"
    return parse_spec(
        {
            "name": "t",
            "task": task,
            "schema": {"fields": {"x": {"type": "float"}, "y": {"type": "float"}}},
            "features": [
                {"name": "x", "kind": "numeric", "field": "x"},
                {"name": "y", "kind": "numeric", "field": "y"},
            ],
            "online_model": {"kind": kind},
            "drift": drift,
            **more,
        }
    )


def _errors(seed: int, n: int = 6000, before: float = 0.1, after: float = 0.4) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < (before if i < CHANGE else after)) for i in range(n)]


def _concept_hits(monitor: DriftMonitor, errors: list[float]) -> list[Detection]:
    return [d for e in errors for d in monitor.observe_error(e)]


# --- concept drift -------------------------------------------------------------------------


@pytest.mark.parametrize("detector", ["adwin", "page_hinkley", "ddm"])
def test_concept_drift_is_found_within_a_bounded_delay(detector: str) -> None:
    delays = []
    for seed in range(5):
        monitor = DriftMonitor(_spec({"concept": {"detector": detector}}))
        hits = [d for d in _concept_hits(monitor, _errors(seed)) if d.at > CHANGE]
        assert hits, f"{detector} missed the change (seed {seed})"
        first = hits[0]
        assert (first.detector, first.kind, first.target) == (detector, "concept", "error")
        assert first.window > 0
        delays.append(first.at - CHANGE)
    print(f"{detector}: detection delays {delays} errors after the change")
    assert max(delays) < DELAY_BOUND[detector]


# DDM is left out: it raised 15 false alarms over 50 such stationary streams (ADWIN and
# Page-Hinkley none), which docs/pipeline-spec.md mentions.
@pytest.mark.parametrize("detector", ["adwin", "page_hinkley"])
@pytest.mark.parametrize("seed", [1000, 1001, 1002, 1003, 1004])
def test_no_concept_drift_on_a_stationary_error_stream(detector: str, seed: int) -> None:
    monitor = DriftMonitor(_spec({"concept": {"detector": detector}}))
    assert _concept_hits(monitor, _errors(seed, after=0.1)) == []
    assert monitor.observed["concept"] == 6000


def test_a_falling_error_is_not_a_drift() -> None:
    # The error drops (a retrain worked): ADWIN sees the change, the monitor ignores it.
    monitor = DriftMonitor(_spec({"concept": {"detector": "adwin"}}))
    assert _concept_hits(monitor, _errors(3, before=0.4, after=0.1)) == []


def test_no_concept_detection_within_min_events() -> None:
    errors = [0.0] * 60 + [1.0] * 600  # a rise ADWIN finds within a few dozen errors
    eager = _concept_hits(DriftMonitor(_spec({"concept": {"min_events": 1}})), errors)
    assert eager and eager[0].at < 100
    # With min_events 200 the same rise falls into the warm-up: river's detection resets
    # the detector, nothing is reported, and the all-wrong stream that follows is level.
    warm = _concept_hits(DriftMonitor(_spec({"concept": {"min_events": 200}})), errors)
    assert warm == []
    later = [0.0] * 400 + [1.0] * 200  # a rise after the warm-up is reported
    hits = _concept_hits(DriftMonitor(_spec({"concept": {"min_events": 200}})), later)
    assert hits and 400 < hits[0].at < 500


def test_adwin_reports_the_error_after_the_change() -> None:
    monitor = DriftMonitor(_spec({"concept": {"detector": "adwin"}}))
    first = next(d for d in _concept_hits(monitor, _errors(0)) if d.at > CHANGE)
    # the mean error of the window ADWIN kept: above the old rate 0.1, toward the new 0.4
    assert 0.12 < first.statistic < 0.4
    assert first.threshold == 0.002  # river's default delta


def test_ddm_takes_0_1_errors_only() -> None:
    monitor = DriftMonitor(_spec({"concept": {"detector": "ddm"}}))
    with pytest.raises(ValueError, match="0/1"):
        monitor.observe_error(0.3)


def test_a_new_serving_model_restarts_the_concept_detector() -> None:
    spec = _spec({"concept": {"detector": "adwin", "min_events": 100}})
    monitor = DriftMonitor(spec)
    _concept_hits(monitor, [0.0] * 1000)
    monitor.set_reference(None)
    # After the restart the new model's first errors are its baseline, not a change.
    assert _concept_hits(monitor, [1.0] * 99) == []


def _demo_errors(seed: int, drift_at: float, n: int = 2000) -> list[Detection]:
    """The demo pipeline on one partition: validate, featurize, learn prequentially until
    the change, then serve as a frozen model would (an online model with the demo's
    learning rate adapts so fast that some seeds show no change in its errors at all)."""
    spec = load_spec(PIPELINES / "demo.yaml")
    featurizer, state, entities = Featurizer(spec), GlobalState(), {}
    learner, monitor = OnlineLearner(spec), DriftMonitor(spec)
    found = []
    for i, example in enumerate(synthetic.payments(n, seed=seed, drift_at=drift_at)):
        record = validate(spec, json.dumps(example.record).encode(), Source("demo.raw", 0, i, 0))
        assert isinstance(record, Record)
        vector = featurizer.transform(record, state, entities.setdefault(record.entity_key, {}))
        before = learner.predict(vector)
        if i < n * drift_at:  # then frozen, as a batch champion is: the change shows in full
            learner.learn(vector, example.label, before)
        error = float(before.predicted_class != str(example.label))
        found += monitor.observe_error(error) + monitor.observe_features(vector)
    return found


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_demo_spec_finds_the_demo_drift_and_only_it(seed: int) -> None:
    # Measured on seeds 1-8: 24-120 labels after the drift; never on stationary payments.
    drifted = _demo_errors(seed, drift_at=0.5)
    concept = [d.at - 1000 for d in drifted if d.kind == "concept"]
    print(f"demo seed {seed}: concept drift detected {concept} labels after the change")
    assert concept and 0 < concept[0] < 250
    # amount and risk keep their distribution through the concept drift: no data drift.
    assert [d for d in drifted if d.kind == "data"] == []
    assert _demo_errors(seed, drift_at=1.0) == []


# --- PSI and references --------------------------------------------------------------------


def test_reference_bins_by_quantiles_without_empty_bins() -> None:
    rng = random.Random(0)
    ref = Reference.from_columns({"x": [rng.gauss(0, 1) for _ in range(5000)], "c": [1.0] * 50})
    assert len(ref.edges["x"]) == 9 and len(ref.fractions["x"]) == 10
    assert all(abs(f - 0.1) < 0.01 for f in ref.fractions["x"])
    assert ref.edges["c"] == [1.0]  # a constant column collapses to one cut point
    assert min(ref.fractions["c"]) > 0 and abs(sum(ref.fractions["c"]) - 1) < 1e-9


def test_reference_survives_json() -> None:
    ref = Reference.from_columns({"x": [float(i) for i in range(100)], SCORE: [0.1, 0.9]}, 4)
    assert Reference.from_json(json.loads(json.dumps(ref.to_json()))) == ref


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"edges": {"x": [1.0]}, "fractions": {"x": [1.0]}},
        {"edges": {"x": []}, "fractions": {}},
        {"edges": {"x": [2.0, 1.0]}, "fractions": {"x": [0.3, 0.3, 0.4]}},
    ],
)
def test_a_broken_reference_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Reference.from_json(data)


def test_psi_of_known_distributions() -> None:
    assert psi([0.25] * 4, [0.25] * 4) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * 0.5878 + 0.4 * 1.6094, abs=1e-3)
    assert psi([1.0, 0.0], [0.0, 1.0]) > 10  # empty bins are floored, not log(0)
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1.0])


def _vectors(seed: int, n: int, shift_at: int | None, shift: float = 1.0) -> list[dict[str, float]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        moved = shift_at is not None and i >= shift_at
        out.append({"x": rng.gauss(0, 1), "y": rng.gauss(shift if moved else 0.0, 1)})
    return out


def _data_hits(monitor: DriftMonitor, vectors: list[dict[str, float]]) -> list[Detection]:
    return [d for v in vectors for d in monitor.observe_features(v)]


@pytest.mark.parametrize("seed", range(5))
def test_psi_flags_the_shifted_feature_once_and_not_the_stationary_one(seed: int) -> None:
    monitor = DriftMonitor(_spec({"data": {"method": "psi", "window": 500}}))
    hits = _data_hits(monitor, _vectors(seed, 6000, shift_at=3000))
    # the first window after the shift decides; the shift persists but fires only once
    assert [(d.target, d.at, d.detector, d.kind) for d in hits] == [("y", 3500, "psi", "data")]
    assert hits[0].statistic > 0.2 and hits[0].window == 500


def test_psi_against_a_training_reference_fires_in_the_first_window() -> None:
    rng = random.Random(1)
    reference = Reference.from_columns({"y": [rng.gauss(0, 1) for _ in range(2000)]})
    monitor = DriftMonitor(_spec({"data": {"features": ["y"], "window": 200}}), reference)
    hits = _data_hits(monitor, _vectors(2, 1000, shift_at=0))
    assert [(d.target, d.at) for d in hits] == [("y", 200)]


def test_without_named_features_every_numeric_key_is_watched() -> None:
    monitor = DriftMonitor(_spec({"data": {"window": 100}}))
    rng = random.Random(3)
    vectors = [{"x": rng.random(), "merchant=m1": 1.0, "device#3": 1.0} for _ in range(100)]
    vectors += [{"x": rng.random() + 5, "merchant=m1": 1.0} for _ in range(100)]
    assert [d.target for d in _data_hits(monitor, vectors)] == ["x"]  # no indicator keys


def test_kswin_flags_a_shifted_feature() -> None:
    spec = _spec({"data": {"method": "kswin", "features": ["y"], "window": 100}})
    monitor = DriftMonitor(spec)
    vectors = _vectors(4, 1600, shift_at=1000, shift=3.0)
    hits = [d for d in _data_hits(monitor, vectors) if d.at > 1000]
    assert hits and hits[0].detector == "kswin" and hits[0].target == "y"
    assert hits[0].at - 1000 < 100 and hits[0].statistic <= 0.005  # p-value <= alpha


def test_prediction_drift_on_the_score() -> None:
    monitor = DriftMonitor(_spec({"prediction": {"window": 300}}))
    rng = random.Random(5)
    scores = [rng.betavariate(2, 8) for _ in range(1500)] + [
        rng.betavariate(5, 5) for _ in range(1500)
    ]
    hits = [d for s in scores for d in monitor.observe_score(s)]
    assert [(d.kind, d.target, d.at) for d in hits] == [("prediction", "score", 1800)]
    assert monitor.observed == {"concept": 0, "data": 0, "prediction": 3000}


def test_a_new_model_reference_replaces_the_score_baseline() -> None:
    rng = random.Random(6)
    monitor = DriftMonitor(_spec({"prediction": {"window": 200}}))
    for _ in range(400):
        assert monitor.observe_score(rng.betavariate(2, 8)) == []
    new_model = Reference.from_columns({SCORE: [rng.betavariate(8, 2) for _ in range(1000)]})
    monitor.set_reference(new_model)
    # the new model's scores match its own reference: no drift, though they moved a lot
    assert [d for _ in range(600) for d in monitor.observe_score(rng.betavariate(8, 2))] == []


def test_monitors_left_out_of_the_spec_do_nothing() -> None:
    monitor = DriftMonitor(_spec({"concept": None}, retrain={"on_drift": False}))
    assert monitor.observe_error(1.0) == [] and monitor.observe_features({"x": 1.0}) == []
    assert monitor.observe_score(0.5) == []
    assert monitor.observed == {"concept": 1, "data": 1, "prediction": 1}


def test_regression_watches_the_absolute_error() -> None:
    rng = random.Random(8)
    errors = [abs(rng.gauss(0, 0.1 if i < CHANGE else 0.3)) for i in range(5000)]
    monitor = DriftMonitor(_spec({"concept": {"detector": "adwin"}}, task="regression"))
    delays = [d.at - CHANGE for d in _concept_hits(monitor, errors)]
    print(f"regression (adwin, |error| sd 0.1 -> 0.3): detections {delays} after the change")
    assert delays and 0 < delays[0] < 250
    quiet = [abs(rng.gauss(0, 0.1)) for _ in range(5000)]
    assert _concept_hits(DriftMonitor(_spec({"concept": {}}, task="regression")), quiet) == []


def test_a_feature_missing_from_the_vectors_is_not_observed() -> None:
    monitor = DriftMonitor(_spec({"data": {"features": ["x", "y"], "window": 500}}))
    rng = random.Random(9)
    vectors = [{"x": rng.random()} for _ in range(1500)]  # y selected out, say
    vectors += [{"x": rng.random() + 5} for _ in range(500)]
    # y never fills a window (no constant-0 reference that could fire); x drifts
    assert [(d.target, d.at) for d in _data_hits(monitor, vectors)] == [("x", 2000)]


# --- change points: dating and confirming a drift ------------------------------------------


def test_a_detection_is_dated_by_the_change_point_test_not_by_adwins_cut() -> None:
    """ADWIN's cut (carried as ``since``) dates a change too early: its kept window still
    holds hundreds of pre-change errors. The CUSUM test the trainer runs over the latest
    errors at the detection dates it within a few dozen events."""
    spec = load_spec(PIPELINES / "demo.yaml")
    adwin: list[int] = []
    cusum: list[int] = []
    confirmed_after: list[int] = []
    for seed in range(20):
        rng = random.Random(seed)
        monitor = DriftMonitor(spec)
        errors = [float(rng.random() < 0.1) for _ in range(3000)]
        errors += [float(rng.random() < 0.4) for _ in range(1000)]
        for i, error in enumerate(errors):
            found = monitor.observe_error(error, ts_ms=1_000 + i)
            if found:
                assert i >= 3000  # no false alarm here
                change = monitor.change_ts_ms(found[0])
                assert change is not None and change <= 1_000 + i
                adwin.append(change - 1_000 - 3000)
                for j in range(i, len(errors), 25):  # the trainer re-tests as labels come
                    point = change_point(errors[: j + 1], min_segment=30)
                    if point is not None and point.p_value < 1e-3 and point.after > point.before:
                        cusum.append(point.index - 3000)
                        confirmed_after.append(j - 3000)
                        break
                break
    assert len(cusum) == 20 and max(confirmed_after) < 400, confirmed_after
    assert sorted(abs(c) for c in cusum)[-1] < 80, cusum
    assert sum(abs(a) for a in adwin) > 5 * sum(abs(c) for c in cusum), (adwin, cusum)


def test_change_point_finds_a_rise_and_stays_quiet_without_one() -> None:
    rng = np.random.default_rng(5)
    alarms = 0
    for _ in range(300):
        flat = (rng.random(2000) < 0.1).astype(float)
        point = change_point(list(flat))
        assert point is not None
        alarms += point.p_value < 1e-3
    assert alarms <= 3  # ~0.1% expected: 0.3 of 300
    jumped = np.r_[rng.random(1500) < 0.1, rng.random(500) < 0.35].astype(float)
    point = change_point(list(jumped))
    assert point is not None and point.p_value < 1e-6
    assert 1400 <= point.index <= 1560 and point.after > point.before


def test_change_point_needs_enough_varying_values() -> None:
    assert change_point([1.0] * 20) is None
    assert change_point([0.0] * 500) is None  # constant: nothing to test
    assert kolmogorov_tail(0.0) == 1.0 and kolmogorov_tail(3.0) < 1e-6


def test_latest_rise_dates_the_newest_regime_and_keeps_a_single_rise_where_it_was() -> None:
    """With a long mildly worse stretch before the real change, one split can land on the
    first, mild rise; the retrain must start at the last one. With one rise, the
    refinement changes nothing (a false further split is a p < 1e-4 event)."""
    rng = np.random.default_rng(11)
    moved = 0
    for _ in range(40):
        single = np.r_[rng.random(3000) < 0.1, rng.random(800) < 0.4].astype(float)
        one, refined = change_point(list(single), 50), latest_rise(list(single), 50)
        assert one is not None and refined is not None
        assert refined.index == one.index and 2900 <= refined.index <= 3100
        two = np.r_[rng.random(1500) < 0.02, rng.random(3000) < 0.15, rng.random(600) < 0.5].astype(
            float
        )
        first, last = change_point(list(two), 50), latest_rise(list(two), 50)
        assert first is not None and last is not None
        assert 4400 <= last.index <= 4600, (first.index, last.index)
        assert last.after > last.before and last.p_value == first.p_value
        moved += first.index < 4400
    assert moved >= 1  # the single split did land early on some of these


def test_latest_rise_leaves_an_unconfirmed_sequence_alone() -> None:
    flat = [0.0, 0.0, 0.0, 1.0] * 500
    assert latest_rise(flat) == change_point(flat)
    assert latest_rise([0.0] * 10) is None

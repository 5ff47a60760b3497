"""Evaluation: metrics against hand counts, time-series CV folds in time order, error
analysis finds the bad slice, compare() honours the margin and direction, reports land."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from streamml.errors import ModelError
from streamml.models.evaluation import (
    classification_metrics,
    compare,
    confusion_matrix,
    evaluate,
    largest_errors,
    regression_metrics,
    roc_auc,
    time_series_cv,
    worst_slices,
    write_report,
)
from streamml.models.training import frame_from_rows, prepare, train
from streamml.schemas.operations import PromotionSpec
from tests.unit.models.test_training import make_rows, make_spec

PNG = b"\x89PNG\r\n\x1a\n"

# --- metrics -----------------------------------------------------------------------------


def test_confusion_matrix_counts_every_row_once_in_its_cell() -> None:
    y_true = np.array([0, 0, 1, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 2])
    cm = confusion_matrix(y_true, y_pred, ["a", "b", "c"])
    assert cm.classes == ["a", "b", "c"]
    assert cm.counts == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    assert sum(map(sum, cm.counts)) == len(y_true)


def test_classification_metrics_for_the_positive_class() -> None:
    # positive class index 1: 3 true positives, 1 false positive, 1 false negative
    y_true = np.array([1, 1, 1, 1, 0, 0, 0])
    proba1 = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.3], dtype=np.float32)
    proba = np.stack([1 - proba1, proba1], axis=1)
    m = classification_metrics(y_true, proba, positive_index=1)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    # pairs (pos, neg) ranked correctly: 0.9, 0.8, 0.7 beat all 3; 0.2 beats 0.1 only
    assert m["roc_auc"] == pytest.approx(10 / 12)
    # the same data with the other class as positive
    m0 = classification_metrics(y_true, proba, positive_index=0)
    assert m0["precision"] == pytest.approx(2 / 3) and m0["recall"] == pytest.approx(2 / 3)


def test_roc_auc_edges() -> None:
    pos = np.array([True, True, False, False])
    assert roc_auc(pos, np.array([0.9, 0.8, 0.2, 0.1], dtype=np.float32)) == 1.0
    assert roc_auc(pos, np.array([0.1, 0.2, 0.8, 0.9], dtype=np.float32)) == 0.0
    assert roc_auc(pos, np.full(4, 0.5, dtype=np.float32)) == 0.5
    assert roc_auc(np.array([True, True]), np.array([0.1, 0.2], dtype=np.float32)) == 0.0


def test_regression_metrics() -> None:
    m = regression_metrics(
        np.array([1.0, 2.0, 3.0], dtype=np.float32), np.array([[2.0], [2.0], [1.0]], np.float32)
    )
    assert m == {"mse": pytest.approx(5 / 3), "rmse": pytest.approx(math.sqrt(5 / 3)), "mae": 1.0}


# --- compare -----------------------------------------------------------------------------


def test_without_a_champion_the_candidate_deploys() -> None:
    d = compare({"roc_auc": 0.6}, None, PromotionSpec(metric="roc_auc", min_delta=0.5))
    assert d.deploy and d.champion is None and "no champion" in d.reason


@pytest.mark.parametrize(
    ("candidate", "deploy"), [(0.79, False), (0.80, False), (0.815, False), (0.83, True)]
)
def test_the_candidate_must_beat_the_champion_by_more_than_min_delta(
    candidate: float, deploy: bool
) -> None:
    promotion = PromotionSpec(metric="f1", min_delta=0.02)
    d = compare({"f1": candidate}, {"f1": 0.80}, promotion)
    assert d.deploy is deploy, d.reason
    assert d.margin == pytest.approx(candidate - 0.80)
    assert (d.metric, d.candidate, d.champion) == ("f1", candidate, 0.80)


@pytest.mark.parametrize(("candidate", "deploy"), [(1.0, True), (1.15, False), (1.3, False)])
def test_lower_is_better_for_rmse(candidate: float, deploy: bool) -> None:
    promotion = PromotionSpec(metric="rmse", min_delta=0.1)
    d = compare({"rmse": candidate, "mae": 0.0}, {"rmse": 1.2, "mae": 9.0}, promotion)
    assert d.deploy is deploy, d.reason
    assert d.margin == pytest.approx(1.2 - candidate)


def test_too_few_labelled_events_keep_the_champion() -> None:
    promotion = PromotionSpec(metric="accuracy", min_labeled_events=500)
    d = compare({"accuracy": 0.99}, {"accuracy": 0.5}, promotion, labeled_events=499)
    assert not d.deploy and "499" in d.reason
    assert compare({"accuracy": 0.99}, {"accuracy": 0.5}, promotion, labeled_events=500).deploy


def test_a_missing_metric_is_an_error() -> None:
    with pytest.raises(ModelError, match="roc_auc"):
        compare({"f1": 0.9}, None, PromotionSpec(metric="roc_auc"))


# --- error analysis ----------------------------------------------------------------------


def test_worst_slices_group_one_hot_columns_and_rank_by_error_rate() -> None:
    spec = make_spec()
    data = prepare(spec, frame_from_rows(make_rows(400)))
    # A "model" that is right everywhere except on merchant m2, where it is always wrong.
    on_m2 = data.X[:, data.feature_names.index("merchant=m2")] == 1
    said = np.where(on_m2, 1 - data.y, data.y)
    outputs = np.stack([1.0 - said, said], axis=1).astype(np.float32)
    slices = worst_slices(data, outputs, min_rows=20)
    top = slices[0]
    assert (top.feature, top.value, top.error) == ("merchant", "m2", 1.0)
    assert top.rows == int(on_m2.sum())
    assert top.overall_error == pytest.approx(on_m2.mean())
    assert {s.value for s in slices[1:]} == {"m0", "m1", "m3"}
    assert all(s.error == 0.0 for s in slices[1:])
    assert worst_slices(data, outputs, min_rows=len(data) + 1) == []


def test_largest_errors_are_the_most_confidently_wrong_rows() -> None:
    spec = make_spec()
    data = prepare(spec, frame_from_rows(make_rows(60)))
    p_true = np.full(len(data), 0.9, dtype=np.float32)
    p_true[[5, 17, 40]] = [0.3, 0.05, 0.45]  # wrong, very wrong, barely wrong
    proba = np.where(data.y == 1, p_true, 1 - p_true).astype(np.float32)
    outputs = np.stack([1 - proba, proba], axis=1)
    cases = largest_errors(data, outputs, top=10)
    assert [c.event_id for c in cases] == [data.event_ids[i] for i in (17, 5, 40)]
    assert cases[0].error == pytest.approx(0.95)
    assert cases[0].label == data.labels[17] and cases[0].prediction != cases[0].label


# --- time-series CV and the report -------------------------------------------------------


def test_time_series_cv_tests_each_fold_on_later_rows() -> None:
    spec, frame = make_spec(), frame_from_rows(make_rows(300))
    cv = time_series_cv(spec, frame, 3, epochs=3)
    assert [f.fold for f in cv.folds] == [1, 2, 3]
    assert [f.train_rows for f in cv.folds] == [75, 150, 225]  # expanding window
    assert all(f.test_rows == 75 for f in cv.folds)
    for fold in cv.folds:
        assert fold.test_start_ms >= 1_700_000_000_000 + fold.train_rows * 1000
    starts = [f.test_start_ms for f in cv.folds]
    assert starts == sorted(starts)
    acc = [f.metrics["accuracy"] for f in cv.folds]
    assert cv.mean["accuracy"] == pytest.approx(np.mean(acc))
    assert cv.std["accuracy"] == pytest.approx(np.std(acc))


def test_evaluate_and_write_report_for_classification(tmp_path: Path) -> None:
    spec, frame = make_spec(), frame_from_rows(make_rows(300))
    result = train(spec, frame)
    report = evaluate(spec, result, frame, cv_folds=2, cv_epochs=2, min_slice_rows=5)
    assert report.metrics["accuracy"] >= 0.85
    assert report.confusion is not None
    assert sum(map(sum, report.confusion.counts)) == result.splits.test.rows
    assert report.cv is not None and len(report.cv.folds) == 2
    assert report.decision is not None and report.decision.deploy  # no champion given
    written = write_report(report, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == [
        "confusion_matrix.png",
        "learning_curve.png",
        "loss_curves.png",
        "report.json",
        "summary.md",
    ]
    for png in ("confusion_matrix.png", "learning_curve.png", "loss_curves.png"):
        assert (tmp_path / "out" / png).read_bytes().startswith(PNG)
    body = json.loads((tmp_path / "out" / "report.json").read_text())
    assert body["metrics"] == pytest.approx(report.metrics)
    assert body["splits"]["test"]["rows"] == result.splits.test.rows
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "accuracy" in summary and "decision: deploy" in summary


def test_evaluate_regression_writes_residuals_and_decides_against_a_champion(
    tmp_path: Path,
) -> None:
    spec = make_spec("regression", hidden=[], epochs=30)
    frame = frame_from_rows(make_rows(300, kind="regression"))
    result = train(spec, frame)
    report = evaluate(spec, result, frame, cv_folds=0, champion_metrics={"rmse": 100.0})
    assert report.confusion is None and report.cv is None
    assert report.metrics["rmse"] < 3.0
    assert report.decision is not None and report.decision.metric == "rmse"
    # the offline gate compares on the test rows; the labelled-events bar
    # (promotion.min_labeled_events) applies when a challenger is judged online
    assert report.decision.deploy and report.decision.margin is not None
    names = sorted(p.name for p in write_report(report, tmp_path))
    assert names == [
        "learning_curve.png",
        "loss_curves.png",
        "report.json",
        "residuals.png",
        "summary.md",
    ]

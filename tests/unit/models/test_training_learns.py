"""Training that learns on a small imbalanced window: it matches a logistic regression,
weighs the classes, and picks a decision threshold that evaluation and serving share."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import torch

from streamml.config import load_settings
from streamml.lifecycle import champion_metrics
from streamml.models.evaluation import (
    classification_metrics,
    evaluate,
    roc_auc,
    time_series_cv,
    write_report,
)
from streamml.models.onnx_model import OnnxScorer, export_onnx, read_metadata
from streamml.models.registry import Registry
from streamml.models.synthetic import payments
from streamml.models.training import (
    TrainResult,
    choose_threshold,
    class_weights,
    classify,
    epoch_budget,
    frame_from_rows,
    predict,
    prepare,
    train,
)
from streamml.testing import TEST_SIGNING_KEY
from tests.unit.models.test_training import T0_MS, Row, make_rows, make_spec

# The demo's batch_model settings at the slow end of its search space (lr 0.0003): before
# min_steps this was ~220 Adam steps on 2,000 rows, AUC ~0.88 and F1 ~0.25.
DEMO_LIKE = {
    "hidden": [32, 16],
    "lr": 0.0003,
    "batch_size": 128,
    "epochs": 20,
    "early_stopping_patience": 4,
    "weight_decay": 0.0001,
    "seed": 7,
}


def payment_rows(n: int, seed: int) -> list[Row]:
    """Synthetic payments under the demo's post-drift rule (a logistic rule in amount, items
    and country; ~29% fraud) with plain features."""
    rows: list[Row] = []
    for i, example in enumerate(payments(n, seed=seed, drift_at=0.0)):
        r = example.record
        assert isinstance(r, dict)
        features = {
            "amount": r["amount"],
            "amount_log": math.log1p(r["amount"]),
            "items": float(r["items"]),
            "risk": r["risk"],
            f"country={r['country']}": 1.0,
            f"merchant={r['merchant']}": 1.0,
        }
        rows.append((r["event_id"], T0_MS + i * 1000, features, example.label))
    return rows


def logistic_regression_scores(
    X: npt.NDArray[np.float32], y: npt.NDArray[np.bool_], X_new: npt.NDArray[np.float32]
) -> npt.NDArray[np.float64]:
    """Logits of an L2-regularised logistic regression (L-BFGS on standardised inputs)."""
    mean, std = X.mean(axis=0), X.std(axis=0)
    std = np.where(std > 1e-3, std, 1.0)
    Z = torch.from_numpy((X - mean) / std).double()
    target = torch.from_numpy(y).double()
    w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = Z @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + 1e-4 * (w @ w)
        torch.autograd.backward(loss)
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        out: npt.NDArray[np.float64] = (
            torch.from_numpy((X_new - mean) / std).double() @ w + b
        ).numpy()
    return out


@pytest.fixture(scope="module")
def learned() -> tuple[Any, Any, TrainResult]:
    spec = make_spec(**DEMO_LIKE)
    frame = frame_from_rows(payment_rows(2000, seed=3))
    return spec, frame, train(spec, frame)


# --- learning ----------------------------------------------------------------------------


def test_the_mlp_ranks_as_well_as_a_logistic_regression_on_a_small_imbalanced_window(
    learned: tuple[Any, Any, TrainResult],
) -> None:
    spec, frame, result = learned
    data = prepare(spec, frame)
    assert 0.25 < float((data.y == 1).mean()) < 0.33  # imbalanced, as the demo's window
    train_rows, test = data.take(result.splits.train.slice), data.take(result.splits.test.slice)
    positive = test.y == result.positive_index
    mlp = roc_auc(positive, predict(result.model, test.X)[:, 1])
    logreg = roc_auc(positive, logistic_regression_scores(train_rows.X, train_rows.y == 1, test.X))
    assert logreg > 0.95  # the rule is learnable from these rows
    assert mlp >= logreg - 0.02, (mlp, logreg)
    # more than min_steps optimizer steps, although 20 epochs are only 220 of them
    (trial,) = result.trials
    steps_per_epoch = math.ceil(result.splits.train.rows / 128)
    assert trial.epochs_run * steps_per_epoch >= 1000 and trial.min_epochs > 20


def test_the_served_classes_find_the_minority_class(
    learned: tuple[Any, Any, TrainResult],
) -> None:
    spec, frame, result = learned
    report = evaluate(spec, result, frame, cv_folds=0)
    assert report.metrics["f1"] > 0.75 and report.metrics["recall"] > 0.7, report.metrics
    assert report.confusion is not None
    assert sum(row[1] for row in report.confusion.counts) > 0  # the positive class is predicted


def test_min_steps_sets_the_epoch_budget_and_when_early_stopping_may_stop() -> None:
    spec = make_spec(epochs=20, min_steps=1000, batch_size=128)
    assert spec.batch_model is not None
    assert epoch_budget(spec.batch_model, 1400, 128) == (91, 91)  # 11 steps an epoch
    assert epoch_budget(spec.batch_model, 100_000, 128) == (20, 2)  # large: epochs rule
    assert epoch_budget(spec.batch_model, 1400, 128, epochs=5) == (5, 5)  # a caller's cap
    off = make_spec(epochs=20, min_steps=0)
    assert off.batch_model is not None and epoch_budget(off.batch_model, 1400, 128) == (20, 1)


def test_early_stopping_waits_for_min_steps() -> None:
    # noise labels: validation loss stops improving at once
    noise = np.random.default_rng(3).integers(2, size=200).tolist()
    rows = [(e, ts, x, y) for (e, ts, x, _), y in zip(make_rows(200), noise, strict=True)]
    spec = make_spec(epochs=200, early_stopping_patience=3, hidden=[32], lr=0.05, min_steps=150)
    (trial,) = train(spec, frame_from_rows(rows)).trials  # 140 rows: 5 steps an epoch
    assert trial.min_epochs == 30
    assert trial.stopped_early and trial.epochs_run == max(30, trial.best_epoch + 3)


# --- class weights -----------------------------------------------------------------------


def test_balanced_class_weights_follow_the_class_frequencies() -> None:
    y = np.array([0] * 72 + [1] * 28, dtype=np.int64)
    w = class_weights(y, 2)
    assert w.tolist() == pytest.approx([100 / (2 * 72), 100 / (2 * 28)])
    assert float(w[y].mean()) == pytest.approx(1.0)
    # a class absent from the training rows keeps weight 1; the others share the rest
    assert class_weights(np.array([0, 0, 2], dtype=np.int64), 3).tolist() == pytest.approx(
        [0.75, 1.0, 1.5]
    )


@pytest.mark.parametrize("loss", ["bce", "cross_entropy"])
def test_the_loss_is_weighted_by_the_training_class_frequencies(loss: str) -> None:
    rows = make_rows(300)  # ~2/3 positives
    spec = make_spec(loss=loss, epochs=3, min_steps=0)
    frame = frame_from_rows(rows)
    result = train(spec, frame)
    data = prepare(spec, frame)
    tr, va = data.take(result.splits.train.slice), data.take(result.splits.validation.slice)
    w = torch.from_numpy(class_weights(tr.y.astype(np.int64), 2))
    logits = result.model.logits(torch.from_numpy(va.X)).detach()
    target = torch.from_numpy(va.y)
    if loss == "bce":
        per_row = torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0].double(), target.double(), reduction="none"
        )
    else:
        per_row = torch.nn.functional.cross_entropy(logits, target, reduction="none").double()
    weighted = per_row * w[target].double()
    # bce: the mean of weighted rows; cross-entropy: normalised by the weights' sum
    expected = weighted.mean() if loss == "bce" else weighted.sum() / w[target].double().sum()
    (trial,) = result.trials
    assert trial.best_val_loss == pytest.approx(float(expected), rel=1e-4)
    assert trial.best_val_loss != pytest.approx(float(per_row.mean()), rel=1e-3)


def test_class_weight_none_and_regression_are_unweighted() -> None:
    frame = frame_from_rows(make_rows(200, kind="regression"))
    kw: dict[str, Any] = {"epochs": 3, "hidden": [], "min_steps": 0}
    balanced = train(make_spec("regression", class_weight="balanced", **kw), frame)
    none = train(make_spec("regression", class_weight="none", **kw), frame)
    assert balanced.history == none.history
    assert balanced.threshold is None and balanced.threshold_metric is None


# --- the decision threshold --------------------------------------------------------------


def test_choose_threshold_maximises_the_metric_on_the_rows() -> None:
    rng = np.random.default_rng(0)
    positive = rng.random(400) < 0.3
    score = np.clip(0.3 * positive + rng.normal(0.35, 0.15, 400), 0, 1)
    for metric in ("accuracy", "f1"):
        cut = choose_threshold(positive, score, metric)
        best = classification_metrics(positive.astype(np.int64), _proba(score), 1, cut)[metric]
        for other in np.linspace(0.05, 0.95, 91):
            got = classification_metrics(positive.astype(np.int64), _proba(score), 1, other)
            assert got[metric] <= best + 1e-12, (metric, other)
    # precision leans to higher cuts, recall to lower ones; roc_auc cuts as accuracy does
    cuts = {m: choose_threshold(positive, score, m) for m in ("precision", "f1", "recall")}
    assert cuts["precision"] > cuts["f1"] > cuts["recall"]
    assert choose_threshold(positive, score, "roc_auc") == choose_threshold(
        positive, score, "accuracy"
    )


def test_choose_threshold_cuts_between_scores_and_falls_back_to_one_half() -> None:
    positive = np.array([True, True, False, False])
    assert choose_threshold(positive, np.array([0.9, 0.7, 0.3, 0.1]), "f1") == 0.5
    assert choose_threshold(positive, np.array([0.9, 0.8, 0.6, 0.1]), "f1") == pytest.approx(0.7)
    assert choose_threshold(positive, np.full(4, 0.4), "f1") == 0.5  # no cut separates rows
    assert choose_threshold(np.array([False, False]), np.array([0.9, 0.1]), "f1") == 0.5


def test_classify_cuts_the_positive_class_at_the_threshold() -> None:
    proba = _proba(np.array([0.2, 0.45, 0.55, 0.9]))
    assert classify(proba, 1, None).tolist() == [0, 0, 1, 1]
    assert classify(proba, 1, 0.4).tolist() == [0, 1, 1, 1]
    assert classify(proba, 0, 0.5).tolist() == [0, 0, 1, 1]  # p(class 0): 0.8, 0.55, 0.45, 0.1
    assert classify(proba, 0, 0.6).tolist() == [0, 1, 1, 1]
    three = np.array([[0.2, 0.5, 0.3]], dtype=np.float32)
    assert classify(three, 0, 0.1).tolist() == [1]  # multiclass: always the most probable


def test_train_chooses_the_threshold_for_the_promotion_metric(
    learned: tuple[Any, Any, TrainResult],
) -> None:
    spec, frame, result = learned
    assert spec.promotion.metric == "roc_auc" and result.threshold_metric == "roc_auc"
    assert result.threshold is not None and 0.0 < result.threshold < 1.0
    val = prepare(spec, frame).take(result.splits.validation.slice)
    score = predict(result.model, val.X)[:, 1]
    assert result.threshold == choose_threshold(val.y == 1, score, "accuracy")
    f1_spec = spec.model_copy(
        update={"promotion": spec.promotion.model_copy(update={"metric": "f1"})}
    )
    assert train(f1_spec, frame).threshold == choose_threshold(val.y == 1, score, "f1")
    multiclass = make_spec(loss="cross_entropy", epochs=2, min_steps=0)
    assert train(multiclass, frame_from_rows(make_rows(200, kind="multiclass"))).threshold is None


def test_evaluation_reports_the_classes_the_threshold_serves(
    learned: tuple[Any, Any, TrainResult],
) -> None:
    spec, frame, result = learned
    strict = dataclasses.replace(result, threshold=0.95)
    report = evaluate(spec, strict, frame, cv_folds=0)
    test = prepare(spec, frame).take(result.splits.test.slice)
    p = predict(result.model, test.X)[:, 1]
    assert report.threshold == 0.95
    assert report.confusion is not None
    assert sum(row[1] for row in report.confusion.counts) == int((p >= 0.95).sum())
    assert report.metrics == classification_metrics(test.y.astype(np.int64), _proba(p), 1, 0.95)
    argmax = classification_metrics(test.y.astype(np.int64), _proba(p), 1)
    assert report.metrics["recall"] < argmax["recall"]
    assert all(e.prediction != e.label for e in report.errors)


def test_each_cv_fold_cuts_at_a_threshold_of_its_own(
    learned: tuple[Any, Any, TrainResult],
) -> None:
    spec, frame, _ = learned
    cv = time_series_cv(spec, frame, 2)
    assert all(f.threshold is not None and 0 < f.threshold < 1 for f in cv.folds)
    assert all(f.metrics["f1"] > 0.6 for f in cv.folds), [f.metrics for f in cv.folds]


# --- the threshold travels with the model ------------------------------------------------


def test_the_onnx_file_carries_the_threshold_and_the_scorer_applies_it(
    learned: tuple[Any, Any, TrainResult], tmp_path: Path
) -> None:
    spec, _, result = learned
    vectors = [x for _, _, x, _ in payment_rows(300, seed=9)]
    strict = dataclasses.replace(result, threshold=0.8)
    export_onnx(strict, tmp_path / "model.onnx")
    meta = read_metadata(tmp_path / "model.onnx")
    assert (meta["threshold"], meta["threshold_class"]) == ("0.8", "True")
    assert meta["threshold_metric"] == "roc_auc"
    scorer = OnnxScorer.from_file(tmp_path / "model.onnx", positive=spec.label.positive)
    assert scorer.threshold == 0.8
    predictions = scorer.predict_many(vectors)
    assert all((p.predicted_class == "True") == (p.score >= 0.8) for p in predictions)
    # rows argmax would call positive, the threshold does not: the threshold is in force
    assert any(0.5 < p.score < 0.8 and p.predicted_class == "False" for p in predictions)

    # a file without the threshold (older exports) keeps the most probable class
    graph = onnx.load(str(tmp_path / "model.onnx"))
    kept = [p for p in graph.metadata_props if not p.key.startswith("streamml.threshold")]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    onnx.save(graph, str(tmp_path / "old.onnx"))
    old = OnnxScorer.from_file(tmp_path / "old.onnx", positive=spec.label.positive)
    assert old.threshold is None
    for p in old.predict_many(vectors):
        assert p.predicted_class == max(p.probabilities, key=p.probabilities.__getitem__)


def test_a_batch_champion_is_measured_with_its_own_threshold(
    learned: tuple[Any, Any, TrainResult], tmp_path: Path
) -> None:
    spec, frame, result = learned
    export_onnx(dataclasses.replace(result, threshold=0.9), tmp_path / "champion.onnx")
    registry = Registry(tmp_path / "models", signing_key=TEST_SIGNING_KEY)
    registry.register(
        spec.name,
        tmp_path / "champion.onnx",
        kind="batch",
        spec_hash=spec.spec_hash,
        feature_names=result.feature_names,
        classes=[str(c) for c in result.classes],
        task=spec.task,
        training_window={"start": T0_MS, "end": T0_MS + 1, "rows": len(frame)},
        metrics={},
        params={},
        parent_version=None,
    )
    registry.promote(spec.name, "v1")
    version, metrics = champion_metrics(load_settings(), spec, registry, result, frame)
    test = prepare(spec, frame).take(result.splits.test.slice)
    p = predict(result.model, test.X)[:, 1]
    assert version == "v1" and metrics is not None
    y = test.y.astype(np.int64)
    assert metrics == pytest.approx(classification_metrics(y, _proba(p), 1, 0.9), abs=1e-6)
    assert metrics["recall"] < classification_metrics(y, _proba(p), 1)["recall"]


def test_the_report_shows_the_threshold_and_the_learning_curve(
    learned: tuple[Any, Any, TrainResult], tmp_path: Path
) -> None:
    spec, frame, result = learned
    report = evaluate(spec, result, frame, cv_folds=0)
    curve = report.learning_curve
    assert curve is not None and curve.trial == report.best_trial
    (trial,) = result.trials
    assert curve.best_epoch == trial.best_epoch and len(curve.val_loss) == trial.epochs_run
    assert curve.val_loss == [e.val_loss for e in result.history]
    assert curve.train_loss[-1] < curve.train_loss[0]  # it learned
    written = {p.name for p in write_report(report, tmp_path)}
    assert "learning_curve.png" in written
    assert (tmp_path / "learning_curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    body = json.loads((tmp_path / "report.json").read_text())
    assert body["threshold"] == result.threshold and body["threshold_metric"] == "roc_auc"
    assert body["learning_curve"]["val_loss"] == pytest.approx(curve.val_loss)
    assert body["learning_curve"]["best_epoch"] == trial.best_epoch
    summary = (tmp_path / "summary.md").read_text()
    assert f"True iff its probability >= {result.threshold:.4f}" in summary
    assert f"| {trial.best_epoch} (best) | " in summary
    assert f"{curve.val_loss[trial.best_epoch - 1]:.4f}" in summary


def _proba(p: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    return np.stack([1 - p, p], axis=1).astype(np.float32)

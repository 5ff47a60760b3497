"""Batch training: a learnable problem is learned, runs repeat exactly, the split never
leaks the future, early stopping stops, search picks the best trial, bad input is named."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from streamml.errors import TrainingError
from streamml.models.training import (
    MIN_ROWS,
    TrainResult,
    frame_from_rows,
    plan_trials,
    predict,
    prepare,
    train,
)
from streamml.schemas.spec import PipelineSpec, parse_spec

T0_MS = 1_700_000_000_000
Row = tuple[str, int, dict[str, float], Any]


def make_spec(task: str = "classification", **batch: Any) -> PipelineSpec:
    """A pipeline over x1, x2 and a one-hot merchant, with a small fast MLP."""
    settings = {"hidden": [8], "epochs": 15, "batch_size": 32, "lr": 0.03, **batch}
    return parse_spec(
        {
            "name": "t",
            "task": task,
            "schema": {
                "fields": {
                    "x1": {"type": "float"},
                    "x2": {"type": "float"},
                    "merchant": {"type": "string"},
                }
            },
            "features": [
                {"name": "x1", "kind": "numeric", "field": "x1"},
                {"name": "x2", "kind": "numeric", "field": "x2"},
                {"name": "merchant", "kind": "onehot", "field": "merchant"},
            ],
            "online_model": {
                "kind": "logistic_regression" if task == "classification" else "linear_regression"
            },
            "batch_model": settings,
        }
    )


def make_rows(
    n: int = 300, *, kind: str = "binary", seed: int = 0, step_ms: int = 1000
) -> list[Row]:
    """Feature vectors as the pipeline emits them (one-hot keys, some missing) and labels:
    binary 0/1 (``x1 + x2 > 0``, except merchant m3 which is always 1), three classes, or a
    regression target around 1000."""
    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    for i in range(n):
        x1, x2 = float(rng.normal()), float(rng.normal())
        merchant = f"m{int(rng.integers(4))}"
        features = {"x1": x1, f"merchant={merchant}": 1.0}
        if x2 != 0.0:
            features["x2"] = x2  # a zero would simply be left out
        label: Any
        if kind == "binary":
            label = int(x1 + x2 > 0 or merchant == "m3")
        elif kind == "multiclass":
            label = ["low", "mid", "high"][int(x1 > -0.5) + int(x1 > 0.5)]
        else:
            label = 1000.0 + 30.0 * x1 - 20.0 * x2 + float(rng.normal()) * 0.5
        rows.append((f"e{i:05d}", T0_MS + i * step_ms, features, label))
    return rows


def accuracy_on_test(result: TrainResult, spec: PipelineSpec, frame: pd.DataFrame) -> float:
    """Accuracy of ``result`` on its own test split."""
    test = prepare(spec, frame).take(result.splits.test.slice)
    return float((predict(result.model, test.X).argmax(axis=1) == test.y).mean())


# --- frames ------------------------------------------------------------------------------


def test_frame_from_rows_orders_features_and_fills_missing_keys_with_zero() -> None:
    frame = frame_from_rows(
        [("a", T0_MS, {"x2": 2.0, "merchant=m1": 1.0}, 1), ("b", T0_MS + 1, {"x1": 5.0}, 0)]
    )
    assert list(frame.columns) == ["event_id", "ts", "label", "merchant=m1", "x1", "x2"]
    assert frame.loc[1, ["merchant=m1", "x1", "x2"]].tolist() == [0.0, 5.0, 0.0]
    assert frame["ts"].tolist() == [T0_MS, T0_MS + 1]


def test_a_feature_named_like_a_frame_column_is_refused() -> None:
    with pytest.raises(TrainingError, match=r"\['label'\]"):
        frame_from_rows([("a", T0_MS, {"label": 1.0}, 1)])


# --- learning ----------------------------------------------------------------------------


def test_a_learnable_binary_problem_is_learned() -> None:
    spec, frame = make_spec(), frame_from_rows(make_rows(400))
    result = train(spec, frame)
    assert result.classes == [False, True]  # 0/1 labels become booleans, as online
    assert result.positive_index == 1
    assert accuracy_on_test(result, spec, frame) >= 0.9
    assert not result.model.training
    proba = predict(result.model, prepare(spec, frame).X[:5])
    assert proba.shape == (5, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)


def test_a_learnable_multiclass_problem_is_learned_with_cross_entropy() -> None:
    spec = make_spec(loss="cross_entropy")
    frame = frame_from_rows(make_rows(400, kind="multiclass"))
    result = train(spec, frame)
    assert result.classes == ["high", "low", "mid"]
    assert accuracy_on_test(result, spec, frame) >= 0.85
    assert predict(result.model, prepare(spec, frame).X[:3]).shape == (3, 3)


def test_regression_predicts_in_the_target_scale() -> None:
    spec = make_spec("regression", epochs=40, hidden=[])
    frame = frame_from_rows(make_rows(300, kind="regression"))
    assert spec.batch_model is not None and spec.batch_model.loss == "mse"  # task default
    result = train(spec, frame)
    test = prepare(spec, frame).take(result.splits.test.slice)
    pred = predict(result.model, test.X)
    assert pred.shape == (len(test), 1)
    rmse = math.sqrt(float(((pred.ravel() - test.y) ** 2).mean()))
    assert rmse < 3.0, rmse  # the target's own spread is ~36


def test_same_seed_gives_identical_weights_and_history() -> None:
    spec, frame = make_spec(epochs=5), frame_from_rows(make_rows(200))
    torch.manual_seed(1)  # whatever the caller's global RNG state: only the spec's seed counts
    first = train(spec, frame)
    torch.manual_seed(2)
    second = train(spec, frame)
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert first.history == second.history
    other = train(make_spec(epochs=5, seed=1), frame)
    assert not torch.equal(first.model.net[0].weight, other.model.net[0].weight)
    assert other.seed == 1


def test_training_leaves_the_global_torch_seed_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(make_spec(epochs=1), frame_from_rows(make_rows(100)))
    assert torch.equal(torch.rand(3), expected)


# --- time split --------------------------------------------------------------------------


def test_split_is_time_ordered_whatever_the_row_order_of_the_frame() -> None:
    spec = make_spec(epochs=1)
    frame = frame_from_rows(make_rows(200)).sample(frac=1.0, random_state=7)
    result = train(spec, frame)
    s = result.splits
    assert s.train.ts_max_ms < s.validation.ts_min_ms
    assert s.validation.ts_max_ms < s.test.ts_min_ms
    assert s.train.rows + s.validation.rows + s.test.rows == 200
    assert (s.validation.rows, s.test.rows) == (30, 30)  # 15% each by default
    data = prepare(spec, frame)
    train_ts, test_ts = data.ts_ms[s.train.slice], data.ts_ms[s.test.slice]
    assert train_ts.max() < test_ts.min()


def test_equal_timestamps_never_straddle_the_split() -> None:
    rows = [(eid, T0_MS + (i // 7) * 1000, x, y) for i, (eid, _, x, y) in enumerate(make_rows(210))]
    spec = make_spec(epochs=1)
    result = train(spec, frame_from_rows(rows))
    s = result.splits
    assert s.train.ts_max_ms < s.validation.ts_min_ms <= s.validation.ts_max_ms < s.test.ts_min_ms
    assert s.train.rows % 7 == 0 and s.test.rows % 7 == 0


def test_datetime_timestamps_split_like_epoch_milliseconds() -> None:
    spec, frame = make_spec(epochs=2), frame_from_rows(make_rows(120))
    dated = frame.assign(ts=pd.to_datetime(frame["ts"], unit="ms", utc=True))
    assert train(spec, dated).splits == train(spec, frame).splits


# --- early stopping and search -----------------------------------------------------------


def test_early_stopping_stops_and_restores_the_best_weights() -> None:
    # Pure noise labels: validation loss soon stops improving while training loss falls.
    noise = np.random.default_rng(3).integers(2, size=200).tolist()
    rows = [(e, ts, x, y) for (e, ts, x, _), y in zip(make_rows(200), noise, strict=True)]
    spec = make_spec(
        epochs=200,
        early_stopping_patience=3,
        hidden=[32],
        lr=0.05,
        min_steps=0,
        class_weight="none",
    )
    frame = frame_from_rows(rows)
    result = train(spec, frame)
    (trial,) = result.trials
    assert trial.stopped_early and trial.epochs_run < 200
    assert trial.epochs_run == trial.best_epoch + 3
    val_losses = [e.val_loss for e in result.history]
    assert trial.best_val_loss == min(val_losses)
    # The returned model is the best epoch's, not the last one's.
    val = prepare(spec, frame).take(result.splits.validation.slice)
    logits = result.model.logits(torch.from_numpy(val.X)).detach()
    y = torch.from_numpy(val.y == 1).float().unsqueeze(1)
    loss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
    assert loss == pytest.approx(trial.best_val_loss, rel=1e-5)
    assert loss < val_losses[-1]


def test_grid_search_tries_every_combination_and_keeps_the_lowest_validation_loss() -> None:
    space = {"lr": [0.0001, 0.03], "hidden": [[4], [8, 4]]}
    spec = make_spec(epochs=4, search={"method": "grid", "space": space})
    calls: list[tuple[int, int, float, float]] = []
    result = train(spec, frame_from_rows(make_rows(200)), progress=lambda *a: calls.append(a))
    assert [(t.params.lr, t.params.hidden) for t in result.trials] == [
        (0.0001, (4,)),
        (0.0001, (8, 4)),
        (0.03, (4,)),
        (0.03, (8, 4)),
    ]
    best = min(result.trials, key=lambda t: t.best_val_loss)
    assert result.best_params == best.params and best.params.lr == 0.03
    assert calls == [(e.trial, e.epoch, e.train_loss, e.val_loss) for e in result.history]
    assert {c[0] for c in calls} == {1, 2, 3, 4}


def test_random_search_draws_distinct_trials_reproducibly() -> None:
    space = {"lr": [0.001, 0.01, 0.1], "batch_size": [16, 32, 64], "activation": ["relu", "tanh"]}
    spec = make_spec(search={"method": "random", "trials": 5, "space": space})
    assert spec.batch_model is not None
    plans = plan_trials(spec.batch_model)
    assert len(plans) == len(set(plans)) == 5
    assert plans == plan_trials(spec.batch_model)
    reseeded = make_spec(seed=9, search={"method": "random", "trials": 5, "space": space})
    assert reseeded.batch_model is not None and plan_trials(reseeded.batch_model) != plans


# --- refusals ----------------------------------------------------------------------------


def test_too_few_rows_is_refused_with_a_hint() -> None:
    with pytest.raises(TrainingError) as info:
        train(make_spec(), frame_from_rows(make_rows(MIN_ROWS - 1)))
    assert f"only {MIN_ROWS - 1} labelled rows" in str(info.value)
    assert info.value.hint


def test_a_single_class_in_the_training_window_is_refused() -> None:
    rows = [(e, ts, x, int(i >= 150)) for i, (e, ts, x, _) in enumerate(make_rows(200))]
    with pytest.raises(TrainingError, match="single class") as info:
        train(make_spec(), frame_from_rows(rows))
    assert info.value.hint


def test_bce_with_three_classes_points_to_cross_entropy() -> None:
    frame = frame_from_rows(make_rows(200, kind="multiclass"))
    with pytest.raises(TrainingError) as info:
        train(make_spec(), frame)
    assert "cross_entropy" in str(info.value)


def test_a_pipeline_without_batch_model_cannot_train() -> None:
    spec = make_spec().model_copy(update={"batch_model": None})
    with pytest.raises(TrainingError, match="no batch model"):
        train(spec, frame_from_rows(make_rows(100)))


def test_non_numeric_features_are_refused() -> None:
    frame = frame_from_rows(make_rows(100)).assign(x1="high")
    with pytest.raises(TrainingError, match="numeric"):
        train(make_spec(), frame)

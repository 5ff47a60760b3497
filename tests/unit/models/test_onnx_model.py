"""ONNX export: the file reproduces torch within 1e-5, a tampered file is caught, and the
scorer serves Predictions shaped exactly like the online model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from streamml.errors import ModelError, OnnxParityError
from streamml.models.online import OnlineLearner, Prediction
from streamml.models.onnx_model import (
    OnnxScorer,
    check_parity,
    export_onnx,
    read_metadata,
)
from streamml.models.training import TrainResult, frame_from_rows, predict, prepare, train
from streamml.schemas.spec import PipelineSpec
from tests.unit.models.test_training import make_rows, make_spec

CASES = {
    "bce": ("classification", "binary", {}),
    "cross_entropy": ("classification", "multiclass", {"loss": "cross_entropy"}),
    "mse": ("regression", "regression", {"activation": "gelu"}),
}


@pytest.fixture(scope="module", params=list(CASES))
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PipelineSpec, TrainResult, np.ndarray, Path]:
    task, kind, extra = CASES[request.param]
    spec = make_spec(task, epochs=4, **extra)
    frame = frame_from_rows(make_rows(200, kind=kind))
    result = train(spec, frame)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(result, path)
    X = prepare(spec, frame).X
    return spec, result, X, path


def test_exported_model_matches_torch_within_1e_5(
    trained: tuple[PipelineSpec, TrainResult, np.ndarray, Path],
) -> None:
    _, result, X, path = trained
    assert check_parity(result, path, X, 1e-5) <= 1e-5


def test_graph_has_one_named_input_and_output_with_a_dynamic_batch(
    trained: tuple[PipelineSpec, TrainResult, np.ndarray, Path],
) -> None:
    spec, result, X, path = trained
    scorer = OnnxScorer(path, result.feature_names, result.classes, result.task)
    (inp,), (out,) = scorer.session.get_inputs(), scorer.session.get_outputs()
    assert inp.name == "features" and inp.shape[1] == len(result.feature_names)
    width = len(result.classes) if spec.task == "classification" else 1
    assert out.name == ("probabilities" if spec.task == "classification" else "predictions")
    for n in (1, 7):
        assert scorer.predict_batch(X[:n]).shape == (n, width)
    meta = read_metadata(path)
    assert meta["task"] == spec.task and meta["loss"] == result.loss


def test_a_tampered_model_fails_parity(
    trained: tuple[PipelineSpec, TrainResult, np.ndarray, Path], tmp_path: Path
) -> None:
    _, result, X, path = trained
    graph = onnx.load(str(path))
    weights = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    changed = numpy_helper.to_array(weights) + np.float32(0.05)
    weights.CopyFrom(numpy_helper.from_array(changed, weights.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(graph, str(tampered))
    with pytest.raises(OnnxParityError, match="tolerance"):
        check_parity(result, tampered, X, 1e-5)


def test_a_model_from_another_training_run_fails_parity(tmp_path: Path) -> None:
    frame = frame_from_rows(make_rows(200))
    first = train(make_spec(epochs=3), frame)
    other = train(make_spec(epochs=3, seed=5), frame)
    export_onnx(other, tmp_path / "other.onnx")
    with pytest.raises(OnnxParityError):
        check_parity(first, tmp_path / "other.onnx", prepare(make_spec(), frame).X, 1e-5)


def test_parity_needs_rows(trained: tuple[PipelineSpec, TrainResult, np.ndarray, Path]) -> None:
    _, result, X, path = trained
    with pytest.raises(ModelError):
        check_parity(result, path, X[:0], 1e-5)


# --- the scorer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineSpec, TrainResult, Path]:
    spec = make_spec(epochs=8)
    result = train(spec, frame_from_rows(make_rows(300)))
    path = tmp_path_factory.mktemp("binary") / "model.onnx"
    export_onnx(result, path)
    return spec, result, path


def test_vectorize_orders_features_fills_zero_and_ignores_unknown_keys(
    binary: tuple[PipelineSpec, TrainResult, Path],
) -> None:
    _, result, path = binary
    scorer = OnnxScorer(path, result.feature_names, result.classes, result.task)
    assert result.feature_names == [
        "merchant=m0",
        "merchant=m1",
        "merchant=m2",
        "merchant=m3",
        "x1",
        "x2",
    ]
    row = scorer.vectorize({"x2": 2.5, "merchant=m1": 1.0, "merchant=m9": 1.0, "zzz": 7.0})
    assert row.dtype == np.float32
    assert row.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 2.5]


def test_predictions_are_shaped_like_the_online_models(
    binary: tuple[PipelineSpec, TrainResult, Path],
) -> None:
    spec, result, path = binary
    scorer = OnnxScorer(
        path, result.feature_names, result.classes, result.task, positive=spec.label.positive
    )
    online = OnlineLearner(spec)
    for _, _, x, y in make_rows(100):
        online.learn(x, y)
    vectors = [{"x1": 2.0, "x2": 1.0, "merchant=m0": 1.0}, {"x1": -2.0, "x2": -1.5}]
    ours, theirs = scorer.predict_many(vectors), [online.predict(v) for v in vectors]
    for mine, river in zip(ours, theirs, strict=True):
        assert isinstance(mine, Prediction)
        assert set(mine.probabilities) == set(river.probabilities) == {"False", "True"}
        assert mine.predicted_class == river.predicted_class
        assert mine.score == mine.probabilities["True"]
        # the model's decision threshold (chosen on its validation rows) cuts the score
        assert scorer.threshold is not None
        assert (mine.predicted_class == "True") == (mine.score >= scorer.threshold)
        assert all(isinstance(v, float) for v in mine.probabilities.values())
        assert sum(mine.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert [p.predicted_class for p in ours] == ["True", "False"]
    assert scorer.predict(vectors[0]) == ours[0]
    assert scorer.predict_many([]) == []


def test_scores_match_the_torch_model(binary: tuple[PipelineSpec, TrainResult, Path]) -> None:
    spec, result, path = binary
    scorer = OnnxScorer.from_file(path, positive=spec.label.positive)
    vectors = [x for _, _, x, _ in make_rows(20, seed=4)]
    X = np.stack([scorer.vectorize(v) for v in vectors])
    frame = frame_from_rows(make_rows(20, seed=4))
    assert np.array_equal(X, prepare(spec, frame, feature_names=result.feature_names).X)
    torch_pos = predict(result.model, X)[:, 1]
    scores = [p.score for p in scorer.predict_many(vectors)]
    np.testing.assert_allclose(scores, torch_pos, atol=1e-5)


@pytest.mark.parametrize("trained", ["mse"], indirect=True)
def test_regression_predictions_carry_the_value_only(
    trained: tuple[PipelineSpec, TrainResult, np.ndarray, Path],
) -> None:
    _, result, _, path = trained
    scorer = OnnxScorer(path, result.feature_names, result.classes, result.task)
    (p,) = scorer.predict_many([{"x1": 0.0, "x2": 0.0}])
    assert p.predicted_class == "" and p.probabilities == {}
    assert 950 < p.score < 1050


def test_threads_are_applied_to_the_session(binary: tuple[PipelineSpec, TrainResult, Path]) -> None:
    _, result, path = binary
    scorer = OnnxScorer(path, result.feature_names, result.classes, result.task, threads=2)
    options = scorer.session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)


def test_a_feature_list_of_the_wrong_width_is_refused(
    binary: tuple[PipelineSpec, TrainResult, Path],
) -> None:
    _, result, path = binary
    with pytest.raises(ModelError, match="takes 6 features, 5 given"):
        OnnxScorer(path, result.feature_names[:5], result.classes, result.task)
    with pytest.raises(ModelError, match="cannot load"):
        OnnxScorer(path.with_name("missing.onnx"), result.feature_names, result.classes, "x")

"""ONNX export of a trained batch model, a parity check, and the scorer that serves it.

The exported graph has one input ``features`` (float32 ``[n, d]``, in ``feature_names``
order) and one output: ``probabilities`` ``[n, k]`` in ``classes`` order for
classification (``k = 2`` for a binary bce model too), or ``predictions`` ``[n, 1]``
for regression. The input standardisation is part of the graph.

A binary model's decision threshold travels as metadata (``threshold`` on the
probability of ``threshold_class``); :class:`OnnxScorer` predicts that class iff its
probability reaches the threshold, and the most probable class for files without one.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch

from streamml.errors import ModelError, OnnxParityError
from streamml.models.online import Prediction, positive_label
from streamml.models.training import FloatArray, Label, TrainResult, predict

INPUT = "features"
OPSET = 17
META = "streamml."  # prefix of the metadata keys export_onnx writes


def output_name(task: str) -> str:
    return "probabilities" if task == "classification" else "predictions"


def export_onnx(result: TrainResult, path: Path | str) -> None:
    """Write ``result.model`` as ONNX (dynamic batch axis) with its feature names, classes,
    task and (binary classification) decision threshold as metadata.

    The graph computes in float64 where onnxruntime can: the trained float32 weights
    convert exactly, and torch and onnxruntime then agree to ~1e-12 instead of differing by
    up to a few 1e-5 (float32 matmuls accumulate in different orders), so the parity check
    has a real margin. GELU has no double kernel in onnxruntime: such models stay float32."""
    try:  # float64 unless onnxruntime's CPU kernels lack an op in double (e.g. GELU's Erf)
        _export(_double(result.model), torch.float64, result, path)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:
        _export(copy.deepcopy(result.model).float().eval(), torch.float32, result, path)
    graph = onnx.load(str(path))
    meta = {
        "feature_names": json.dumps(result.feature_names),
        "classes": json.dumps(result.classes),
        "task": result.task,
        "loss": result.loss,
    }
    if result.threshold is not None and result.positive_index is not None:
        meta["threshold"] = repr(float(result.threshold))
        meta["threshold_class"] = str(result.classes[result.positive_index])
        meta["threshold_metric"] = str(result.threshold_metric)
    onnx.helper.set_model_props(graph, {META + k: v for k, v in meta.items()})
    onnx.save(graph, str(path))


def _export(
    model: torch.nn.Module, dtype: torch.dtype, result: TrainResult, path: Path | str
) -> None:
    out = output_name(result.task)
    dummy = torch.zeros(2, len(result.feature_names), dtype=dtype)
    with warnings.catch_warnings():
        # dynamo=False asks for the TorchScript exporter on purpose; it warns that it is legacy.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=[INPUT],
            output_names=[out],
            dynamic_axes={INPUT: {0: "batch"}, out: {0: "batch"}},
            opset_version=OPSET,
        )


def _double(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).double().eval()


def _torch_outputs(model: torch.nn.Module, X: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    with torch.no_grad():
        out: npt.NDArray[np.float64] = _double(model)(torch.from_numpy(X)).numpy()
    return out


def read_metadata(path: Path | str) -> dict[str, str]:
    """The ``streamml.*`` metadata of an exported model, without the prefix."""
    props = onnx.load(str(path), load_external_data=False).metadata_props
    return {p.key.removeprefix(META): p.value for p in props if p.key.startswith(META)}


def check_parity(
    result: TrainResult, onnx_path: Path | str, X_test: FloatArray, tolerance: float
) -> float:
    """Largest difference between the torch and ONNX outputs on ``X_test``; raises
    OnnxParityError above ``tolerance``. Probabilities are compared absolutely, regression
    predictions relative to ``max(1, |prediction|)`` (float32 cannot hold 1e-5 at 1e3)."""
    if len(X_test) == 0:
        raise ModelError("parity needs at least one row")
    X = np.ascontiguousarray(X_test, dtype=np.float64)
    scorer = OnnxScorer(onnx_path, result.feature_names, result.classes, result.task)
    if scorer.dtype is np.float64:
        want = _torch_outputs(result.model, X)
    else:
        want = predict(result.model, X.astype(np.float32)).astype(np.float64)
    got = np.asarray(scorer.session.run(None, {INPUT: X.astype(scorer.dtype)})[0])
    if got.shape != want.shape:
        raise OnnxParityError(f"ONNX output shape {got.shape} != torch {want.shape}")
    scale = np.maximum(1.0, np.abs(want)) if result.task == "regression" else 1.0
    diff = float(np.max(np.abs(got.astype(np.float64) - want) / scale))
    if not diff <= tolerance:  # also catches NaN
        raise OnnxParityError(
            f"ONNX output differs from torch by {diff:.3g} (tolerance {tolerance:.3g})",
            hint="re-export the model; the file may be stale or from another training run",
        )
    return diff


class OnnxScorer:
    """Serve an exported model: vectors in, :class:`Prediction` out, interchangeable with
    :meth:`streamml.models.online.OnlineLearner.predict`. The decision threshold is read
    from the file's metadata (:attr:`threshold`, None without one)."""

    def __init__(
        self,
        path: Path | str,
        feature_names: Sequence[str],
        classes: Sequence[Label],
        task: str,
        threads: int = 1,
        *,
        positive: str | None = None,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot load ONNX model {path}: {exc}") from exc
        self.feature_names = list(feature_names)
        self.index = {name: j for j, name in enumerate(self.feature_names)}
        # float64 graphs (export_onnx) and float32 ones (older or foreign files) both load
        double = self.session.get_inputs()[0].type == "tensor(double)"
        self.dtype: type[np.floating[Any]] = np.float64 if double else np.float32
        self.class_keys = [str(c) for c in classes]
        self.classification = task == "classification"
        self.positive_key = str(positive_label(positive))
        self.threshold, self.threshold_index = self._threshold(path)
        width = self.session.get_inputs()[0].shape[1]
        if isinstance(width, int) and width != len(self.feature_names):
            raise ModelError(
                f"ONNX model {path} takes {width} features, {len(self.feature_names)} given"
            )

    def _threshold(self, path: Path | str) -> tuple[float | None, int | None]:
        """(threshold, index of its class) from the metadata; (None, None) when the file has
        none or it does not fit this binary model (then the most probable class wins)."""
        meta = self.session.get_modelmeta().custom_metadata_map
        raw, key = meta.get(META + "threshold"), meta.get(META + "threshold_class")
        if not self.classification or raw is None or len(self.class_keys) != 2:
            return None, None
        if key not in self.class_keys:
            raise ModelError(f"{path}: threshold class {key!r} is not among {self.class_keys}")
        try:
            value = float(raw)
        except ValueError:
            raise ModelError(f"{path}: threshold {raw!r} is not a number") from None
        return value, self.class_keys.index(key)

    @classmethod
    def from_file(
        cls, path: Path | str, threads: int = 1, *, positive: str | None = None
    ) -> OnnxScorer:
        """A scorer configured from the metadata :func:`export_onnx` wrote."""
        meta = read_metadata(path)
        try:
            names, classes = json.loads(meta["feature_names"]), json.loads(meta["classes"])
            task = meta["task"]
        except (KeyError, ValueError) as exc:
            raise ModelError(f"{path} has no streamml metadata: {exc}") from None
        return cls(path, names, classes, task, threads, positive=positive)

    def vectorize(self, features: Mapping[str, float]) -> FloatArray:
        """One feature dict as a row in model order (missing: 0.0, unknown keys ignored)."""
        return np.asarray(self._row(features), dtype=np.float32)

    def _row(self, features: Mapping[str, float]) -> list[float]:
        # a Python list filled then converted once: item assignment into numpy is slower
        row = [0.0] * len(self.feature_names)
        index = self.index
        for name, value in features.items():
            j = index.get(name)
            if j is not None:
                row[j] = value
        return row

    def predict_batch(self, X: FloatArray) -> FloatArray:
        """Raw model output for rows ``X``: probabilities ``[n, k]`` or predictions ``[n, 1]``."""
        X = np.ascontiguousarray(X, dtype=self.dtype)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise ModelError(f"expected rows of {len(self.feature_names)} features, got {X.shape}")
        out: FloatArray = np.asarray(self.session.run(None, {INPUT: X})[0], dtype=np.float32)
        return out

    def predict_many(self, vectors: Sequence[Mapping[str, float]]) -> list[Prediction]:
        """Predictions for feature dicts, built as OnlineLearner.predict builds them."""
        if not vectors:
            return []
        X = np.asarray([self._row(v) for v in vectors], dtype=self.dtype)
        out: FloatArray = np.asarray(self.session.run(None, {INPUT: X})[0], dtype=np.float32)
        if not self.classification:
            return [Prediction(float(row[0]), "", {}) for row in out]
        keys = self.class_keys
        if self.threshold_index is not None and self.threshold is not None:
            t = self.threshold_index
            chosen = np.where(out[:, t] >= self.threshold, t, 1 - t)
        else:
            chosen = out.argmax(axis=1)
        best = [keys[j] for j in chosen.tolist()]
        positive = keys.index(self.positive_key) if self.positive_key in keys else None
        return [
            Prediction(
                row[positive] if positive is not None else 0.0,
                top,
                dict(zip(keys, row, strict=True)),
            )
            for row, top in zip(out.tolist(), best, strict=True)
        ]

    def predict(self, features: Mapping[str, float]) -> Prediction:
        return self.predict_many([features])[0]

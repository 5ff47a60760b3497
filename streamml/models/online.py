"""Online models (river) built from the spec, with prequential metrics per model version."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from river import compose, linear_model, metrics, naive_bayes, optim, preprocessing, tree

from streamml.schemas.spec import OnlineModelSpec, PipelineSpec

Factory = Callable[[dict[str, Any]], Any]


def _linear(cls: Any) -> Factory:
    """A river linear model; ``lr`` in the params is plain SGD's learning rate (river's
    default optimizer, SGD(0.01), otherwise)."""

    def build(params: dict[str, Any]) -> Any:
        params = dict(params)
        if "lr" in params:
            params["optimizer"] = optim.SGD(float(params.pop("lr")))
        return cls(**params)

    return build


MODELS: dict[str, Factory] = {
    "logistic_regression": _linear(linear_model.LogisticRegression),
    "softmax_regression": _linear(linear_model.SoftmaxRegression),
    "hoeffding_tree": lambda p: tree.HoeffdingTreeClassifier(**p),
    "hoeffding_adaptive_tree": lambda p: tree.HoeffdingAdaptiveTreeClassifier(**p),
    "gaussian_nb": lambda p: naive_bayes.GaussianNB(**p),
    "linear_regression": _linear(linear_model.LinearRegression),
    "hoeffding_tree_regressor": lambda p: tree.HoeffdingTreeRegressor(**p),
}


def build_model(spec: OnlineModelSpec) -> Any:
    """The river model the spec names, behind a StandardScaler when ``scale`` is set."""
    model = MODELS[spec.kind](dict(spec.params))
    if spec.scale:
        return compose.Pipeline(preprocessing.StandardScaler(), model)
    return model


@dataclass(frozen=True)
class Prediction:
    score: float
    predicted_class: str
    probabilities: dict[str, float]


class OnlineLearner:
    """One online model and its prequential metrics (test, then train, on every label)."""

    def __init__(
        self,
        spec: PipelineSpec,
        model: Any | None = None,
        learned: int = 0,
        version: str | None = None,
    ) -> None:
        self.spec = spec
        self.model = model if model is not None else build_model(spec.online_model)
        self.learned = learned
        self.metrics = new_metrics(spec)
        self.classification = spec.task == "classification"
        self.positive = spec.label.positive
        self.positive_key = str(positive_label(spec.label.positive))
        classes = spec.label.classes
        self.multiclass = (
            self.classification and classes is not None and len(classes) > 2 and not self.positive
        )
        # hashing the spec per call is slow; a fresh model started at a change has its own
        self.version = version or f"online-{spec.spec_hash[:8]}"

    def predict(self, x: dict[str, float]) -> Prediction:
        if not self.classification:
            y = self.model.predict_one(x)
            value = float(y) if y is not None else 0.0
            return Prediction(value, "", {})
        proba = {str(k): float(v) for k, v in self.model.predict_proba_one(x).items()}
        if not proba:
            return Prediction(0.0, "", {})
        best = max(proba, key=lambda k: proba[k])
        if self.multiclass:  # no positive class: the score is the confidence in the class
            return Prediction(proba[best], best, proba)
        return Prediction(proba.get(self.positive_key, 0.0), best, proba)

    def learn(self, x: dict[str, float], y: Any, served: Prediction | None = None) -> None:
        """Train on one labelled event. ``served`` is what this model predicted when the event
        arrived (kept with the join state): the prequential metrics score that prediction,
        never a re-prediction at label time -- with labels that come late, the model has
        learned from other events in between, and a second predict would flatter it."""
        target = coerce_label(y, self.classification)
        if served is not None:
            self.score_into(self.metrics, served, target)
        self.model.learn_one(x, target)
        self.learned += 1

    def score_into(self, metrics: dict[str, Any], before: Prediction, target: Any) -> None:
        """Update ``metrics`` (e.g. this learner's, or one minute's) with a prediction made
        before learning ``target`` (already coerced by :func:`coerce_label`)."""
        if not self.classification:
            for metric in metrics.values():
                metric.update(target, before.score)
            return
        predicted = _like(before.predicted_class, target) if before.predicted_class else None
        for name, metric in metrics.items():
            if name == "roc_auc":
                metric.update(
                    _is_positive(target, self.positive),
                    {True: before.score, False: 1 - before.score},
                )
            elif predicted is not None:
                metric.update(target, predicted)

    def metric_values(self) -> dict[str, float]:
        return metric_values(self.metrics)

    def snapshot(self) -> bytes:
        return pickle.dumps(
            {
                "model": self.model,
                "learned": self.learned,
                "metrics": self.metrics,
                "version": self.version,
            }
        )

    @classmethod
    def restore(cls, spec: PipelineSpec, blob: bytes) -> OnlineLearner:
        state = pickle.loads(blob)  # our own snapshot from the changelog, not user input
        learner = cls(spec, state["model"], state["learned"], state.get("version"))
        learner.metrics = state["metrics"]
        return learner


def metric_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Current values, with NaN/inf (e.g. AUC before both classes were seen) as 0."""
    values = {}
    for name, metric in metrics.items():
        value = float(metric.get())
        values[name] = value if math.isfinite(value) else 0.0
    return values


def new_metrics(spec: PipelineSpec) -> dict[str, Any]:
    if spec.task == "regression":
        return {"mae": metrics.MAE(), "rmse": metrics.RMSE()}
    pos = positive_label(spec.label.positive)
    return {
        "accuracy": metrics.Accuracy(),
        "precision": metrics.Precision(pos_val=pos),
        "recall": metrics.Recall(pos_val=pos),
        "f1": metrics.F1(pos_val=pos),
        "roc_auc": metrics.ROCAUC(pos_val=True),
    }


def positive_label(positive: str | None) -> Any:
    """The positive class as labels are coerced: "true"/"1" -> True, "false"/"0" -> False."""
    if positive is None or positive.lower() in ("true", "1"):
        return True
    if positive.lower() in ("false", "0"):
        return False
    return positive


def coerce_label(y: Any, classification: bool) -> Any:
    """Labels arrive as JSON: keep booleans and strings; numbers become classes or targets."""
    if not classification:
        return float(y)
    if isinstance(y, bool | str):
        return y
    if isinstance(y, int | float) and y in (0, 1):
        return bool(y)  # binary 0/1 labels are booleans, as river's binary models predict
    if isinstance(y, float) and y.is_integer():
        return int(y)
    return y


def _like(predicted: str, target: Any) -> Any:
    """Predicted classes travel as strings; compare them as the label's type."""
    if isinstance(target, bool):
        return predicted == "True"
    if isinstance(target, int):
        try:
            return int(predicted)
        except ValueError:
            return predicted
    return predicted


def _is_positive(target: Any, positive: str | None) -> bool:
    pos = positive_label(positive)
    return bool(target == pos or str(target) == str(pos))

"""Spec sections for the model's operations: batch model, promotion, serving, drift
monitors, retraining and alerts.

Split from :mod:`streamml.schemas.spec`, which composes them into a PipelineSpec.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from streamml.schemas.base import Strict as _Strict

Activation = Literal["relu", "tanh", "gelu"]
Loss = Literal["bce", "cross_entropy", "mse"]
PromotionMetric = Literal["accuracy", "precision", "recall", "f1", "roc_auc", "rmse", "mae"]

# Losses and promotion metrics per task; the first one is the default when a key is omitted.
TASK_LOSSES: dict[str, tuple[Loss, ...]] = {
    "classification": ("bce", "cross_entropy"),
    "regression": ("mse",),
}
TASK_METRICS: dict[str, tuple[PromotionMetric, ...]] = {
    "classification": ("roc_auc", "f1", "accuracy", "precision", "recall"),
    "regression": ("rmse", "mae"),
}
LOWER_IS_BETTER: frozenset[str] = frozenset({"rmse", "mae"})


class SearchSpace(_Strict):
    """Candidate values per hyperparameter; a key left out keeps the batch_model value."""

    lr: list[Annotated[float, Field(gt=0)]] | None = Field(default=None, min_length=1)
    hidden: list[list[Annotated[int, Field(ge=1, le=4096)]]] | None = Field(
        default=None, min_length=1
    )
    weight_decay: list[Annotated[float, Field(ge=0)]] | None = Field(default=None, min_length=1)
    batch_size: list[Annotated[int, Field(ge=1)]] | None = Field(default=None, min_length=1)
    activation: list[Activation] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _not_empty(self) -> SearchSpace:
        if not self.axes():
            raise ValueError(
                "name at least one of lr, hidden, weight_decay, batch_size, activation"
            )
        return self

    def axes(self) -> dict[str, list[Any]]:
        """The searched keys (in declaration order) and their candidate values."""
        return {k: list(v) for k, v in self if v is not None}


class SearchSpec(_Strict):
    method: Literal["grid", "random"] = "grid"
    trials: int = Field(default=10, ge=1, le=1000)  # random search only
    space: SearchSpace

    @model_validator(mode="after")
    def _usable(self) -> SearchSpec:
        if self.method == "grid" and "trials" in self.model_fields_set:
            raise ValueError("trials applies to method random only (grid tries every combination)")
        return self


class SplitSpec(_Strict):
    """Time-ordered split: the latest ``test`` share is the test set, the share before it
    the validation set, everything earlier the training set."""

    validation: float = Field(default=0.15, gt=0, lt=0.5)
    test: float = Field(default=0.15, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _train_left(self) -> SplitSpec:
        if self.validation + self.test > 0.6:
            raise ValueError("validation + test must leave at least 40% of the rows for training")
        return self


class OnnxSpec(_Strict):
    threads: int = Field(default=1, ge=1, le=64)
    parity_tolerance: float = Field(default=1e-5, gt=0)


class BatchModelSpec(_Strict):
    """A torch MLP trained offline on labelled features, exported to ONNX for serving."""

    kind: Literal["mlp"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default_factory=lambda: [32, 16])
    activation: Activation = "relu"
    loss: Loss = "bce"  # when omitted: the first of TASK_LOSSES for the pipeline's task
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=64, ge=1)
    epochs: int = Field(default=30, ge=1, le=10_000)
    early_stopping_patience: int = Field(default=5, ge=1)
    seed: int = Field(default=0, ge=0)
    split: SplitSpec = SplitSpec()
    search: SearchSpec | None = None
    onnx: OnnxSpec = OnnxSpec()
    cv_folds: int = Field(default=3, ge=2, le=20)
    # classification: "balanced" weighs each class's loss by n / (classes * n_class) of the
    # training split, so a minority class is not drowned out; regression ignores it
    class_weight: Literal["balanced", "none"] = "balanced"
    # a trial takes at least this many optimizer steps (minibatches) before early stopping
    # or the epoch budget ends it: a small window is only a few minibatches per epoch
    min_steps: int = Field(default=1000, ge=0, le=1_000_000)


class PromotionSpec(_Strict):
    """When a trained candidate replaces the champion."""

    metric: PromotionMetric = "roc_auc"  # when omitted: the first of TASK_METRICS for the task
    min_delta: float = Field(default=0.0, ge=0)
    min_labeled_events: int = Field(default=500, ge=0)
    # judge on the latest this many labelled events since the change (None: 3 x
    # min_labeled_events): a model that adapts is judged on what it does now
    judge_events: int | None = Field(default=None, ge=1)

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    @property
    def window(self) -> int:
        """Labelled events a review judges on: the latest since the change."""
        return self.judge_events or max(3 * self.min_labeled_events, 100)


class ServingSpec(_Strict):
    """Which model answers (champion) and which one runs beside it (challenger)."""

    champion: Literal["online", "batch"] = "online"
    challenger: Literal["none", "online", "batch"] = "none"
    challenger_mode: Literal["shadow", "canary"] = "shadow"
    canary_share: float = Field(default=0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> ServingSpec:
        if self.challenger == self.champion:
            raise ValueError(f"challenger {self.challenger!r} is already the champion")
        if self.challenger == "none" and "challenger_mode" in self.model_fields_set:
            raise ValueError("challenger_mode needs a challenger")
        if "canary_share" in self.model_fields_set and self.challenger_mode != "canary":
            raise ValueError("canary_share applies to challenger_mode canary only")
        return self


# --- drift, retraining and alerts (Step 4) --------------------------------------------


class KeyProblem(ValueError):
    """A problem at ``path`` below the key being validated; parse_spec appends the path to
    the location it reports, so cross-field checks still name the key in the file."""

    def __init__(self, path: tuple[str | int, ...], detail: str) -> None:
        super().__init__(f"{'.'.join(map(str, path))}: {detail}")
        self.path = path
        self.detail = detail


# The river parameters each concept-drift detector accepts (numbers only).
CONCEPT_PARAMS: dict[str, tuple[str, ...]] = {
    "adwin": ("delta", "clock", "max_buckets", "min_window_length", "grace_period"),
    "page_hinkley": ("min_instances", "delta", "threshold", "alpha"),
    "ddm": ("warm_start", "warning_threshold", "drift_threshold"),
}


def _param_problem(detector: str, key: str, value: float) -> str | None:
    if (detector, key) == ("adwin", "delta"):  # a confidence
        return None if 0 < value < 1 else "must be between 0 and 1"
    if (detector, key) == ("page_hinkley", "alpha"):  # a forgetting factor; 1: none
        return None if 0 < value <= 1 else "must be above 0 and at most 1"
    if (detector, key) == ("page_hinkley", "delta"):  # the change tolerated
        return None if value >= 0 else "must be 0 or more"
    return None if value > 0 else "must be above 0"


DriftKind = Literal["concept", "data", "prediction"]
AlertMetric = Literal[
    "accuracy",
    "f1",
    "roc_auc",
    "rmse",
    "mae",
    "dead_letter_rate",
    "p99_latency_ms",
    "consumer_lag",
]
TASK_ALERT_METRICS: dict[str, frozenset[str]] = {
    "classification": frozenset({"accuracy", "f1", "roc_auc"}),
    "regression": frozenset({"rmse", "mae"}),
}


class ConceptDriftSpec(_Strict):
    """A river detector over the prequential error stream (0/1 or absolute error)."""

    detector: Literal["adwin", "page_hinkley", "ddm"] = "adwin"
    params: dict[str, float | int] = Field(default_factory=dict)
    min_events: int = Field(default=100, ge=1)  # no detection before this many errors

    @model_validator(mode="after")
    def _known_params(self) -> ConceptDriftSpec:
        allowed = CONCEPT_PARAMS[self.detector]
        for key, value in self.params.items():
            if key not in allowed:
                raise KeyProblem(
                    ("params", key), f"not a parameter of {self.detector} (one of {list(allowed)})"
                )
            problem = _param_problem(self.detector, key, value)
            if problem is not None:
                raise KeyProblem(("params", key), problem)
        return self


class DataDriftSpec(_Strict):
    """Feature distributions against the training reference (PSI) or recent past (KSWIN)."""

    method: Literal["psi", "kswin"] = "psi"
    features: list[str] | None = Field(default=None, min_length=1)  # None: every numeric key
    threshold: float = Field(default=0.2, gt=0)  # psi
    window: int = Field(default=500, ge=50, le=1_000_000)
    bins: int = Field(default=10, ge=2, le=100)  # psi
    alpha: float = Field(default=0.005, gt=0, lt=1)  # kswin

    @model_validator(mode="after")
    def _method_keys(self) -> DataDriftSpec:
        only = {"threshold": "psi", "bins": "psi", "alpha": "kswin"}
        for key, method in only.items():
            if key in self.model_fields_set and self.method != method:
                raise KeyProblem((key,), f"applies to method {method} only")
        return self


class PredictionDriftSpec(_Strict):
    """The served score's distribution against the training reference (PSI)."""

    method: Literal["psi"] = "psi"
    threshold: float = Field(default=0.2, gt=0)
    window: int = Field(default=500, ge=50, le=1_000_000)
    bins: int = Field(default=10, ge=2, le=100)


class DriftSpec(_Strict):
    concept: ConceptDriftSpec | None = ConceptDriftSpec()
    data: DataDriftSpec | None = None
    prediction: PredictionDriftSpec | None = None


class RetrainSpec(_Strict):
    """When drift (or a schedule) retrains the batch model, and on which rows."""

    on_drift: bool = True
    kinds: list[DriftKind] = Field(default_factory=lambda: list[DriftKind](["concept"]))
    cooldown_s: float = Field(default=300.0, ge=0)
    since_drift: bool = True  # train on events since the drift point ...
    last_events: int = Field(default=5000, ge=1)  # ... and at most the last N labelled events
    min_events: int = Field(default=300, ge=1)  # fewer labelled rows: wait, do not train
    interval_s: float | None = Field(default=None, gt=0)  # scheduled retraining

    @model_validator(mode="after")
    def _consistent(self) -> RetrainSpec:
        if len(set(self.kinds)) != len(self.kinds):
            raise KeyProblem(("kinds",), "list each kind once")
        if self.min_events > self.last_events:
            raise KeyProblem(("min_events",), f"must not exceed last_events ({self.last_events})")
        return self


class AlertRule(_Strict):
    name: str = Field(min_length=1, max_length=128)
    metric: AlertMetric
    op: Literal["below", "above"]
    threshold: float
    window_s: float = Field(default=300.0, gt=0)
    min_events: int = Field(default=50, ge=0)  # fewer events in the window: no change


class AlertsSpec(_Strict):
    rules: list[AlertRule] = Field(default_factory=list)
    webhook: str | None = None  # http(s) URL that receives alert transitions
    interval_s: float = Field(default=10.0, gt=0)

    @field_validator("rules")
    @classmethod
    def _unique(cls, rules: list[AlertRule]) -> list[AlertRule]:
        names = [r.name for r in rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique: {dupes}")
        return rules

    @field_validator("webhook")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("an http:// or https:// URL with a host")
        return url

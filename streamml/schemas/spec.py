"""Pipeline specs: one YAML file per ML service, loaded with precise errors.

A spec names the raw record's fields and types, the entity key, event-id and
timestamp fields, the label, the features, the online model, the optional batch
model with its promotion rule and serving roles, and the topic layout.
Everything else (topic names, the validator, the JSON Schema for producers, the
ClickHouse rows) is derived from it.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from streamml.errors import SpecError
from streamml.schemas.base import Strict as _Strict
from streamml.schemas.operations import (
    TASK_ALERT_METRICS,
    TASK_LOSSES,
    TASK_METRICS,
    AlertsSpec,
    BatchModelSpec,
    DriftSpec,
    KeyProblem,
    PromotionSpec,
    RetrainSpec,
    ServingSpec,
)

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

FieldType = Literal["float", "int", "bool", "string", "timestamp"]
# How a field marked personal data is protected right after validation (streamml.schemas.pii)
PiiMode = Literal["hash", "redact", "drop"]


class FieldSpec(_Strict):
    """One field of the raw record. ``pii`` marks personal data: never written in clear
    (``hash``: a keyed hash, still usable as entity key or category; ``redact``: a fixed
    marker; ``drop``: removed)."""

    type: FieldType
    required: bool = True
    nullable: bool = False
    allow_nan: bool = False
    min: float | None = None
    max: float | None = None
    choices: list[str] | None = None
    max_length: int | None = Field(default=None, ge=1)
    pii: PiiMode | None = None


class SchemaSpec(_Strict):
    fields: dict[str, FieldSpec]
    entity_key: str | None = None
    event_id: str = "event_id"
    timestamp: str = "ts"
    unknown_fields: Literal["reject", "drop"] = "reject"
    max_record_bytes: int = Field(default=65_536, ge=64)

    @field_validator("fields")
    @classmethod
    def _names(cls, value: dict[str, FieldSpec]) -> dict[str, FieldSpec]:
        if not value:
            raise ValueError("declare at least one field")
        bad = [n for n in value if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n)]
        if bad:
            raise ValueError(f"field names must be identifiers: {bad}")
        return value

    @model_validator(mode="after")
    def _keys_exist(self) -> SchemaSpec:
        if self.entity_key is not None and self.entity_key not in self.fields:
            raise ValueError(f"entity_key {self.entity_key!r} is not one of the fields")
        ek = self.fields.get(self.entity_key or "")
        if ek is not None and ek.pii not in (None, "hash"):
            raise ValueError(
                f"entity_key {self.entity_key!r} is pii {ek.pii!r}: every entity would become "
                "one (use pii: hash, which keeps entities apart)"
            )
        for role, name in (("event_id", self.event_id), ("timestamp", self.timestamp)):
            marked = self.fields.get(name)
            if marked is not None and marked.pii is not None:
                raise ValueError(
                    f"the {role} field {name!r} cannot be pii: labels join on the event id and "
                    "the event time is on every output (use a random event id)"
                )
        return self


BOOLEAN_TEXT = {"true": True, "false": False, "1": True, "0": False}


class LabelSpec(_Strict):
    field: str = "label"
    # For classification: the class treated as positive in precision/recall/F1/AUC.
    positive: str | None = None
    ttl_s: float = Field(default=3600.0, gt=0)
    # Classification: the label's class set. Left out, a binary task (``positive`` left
    # out, or true/false/1/0) takes true/false; with another ``positive``, any string or
    # integer is a class. Labels outside the set are dead letters.
    classes: list[str] | None = Field(default=None, min_length=2)
    # Regression: the range a label must lie in (always finite).
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> LabelSpec:
        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("label.classes must not repeat a class")
            if self.positive is not None and self.positive not in self.classes:
                raise ValueError(f"label.positive {self.positive!r} is not one of label.classes")
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError("label.min must be below label.max")
        return self

    @property
    def boolean(self) -> bool:
        """True when labels are the booleans (true/false, 1/0)."""
        if self.classes is not None:
            return {c.lower() for c in self.classes} == {"true", "false"}
        return self.positive is None or self.positive.lower() in BOOLEAN_TEXT


class StateSpec(_Strict):
    # Per-entity state (windows, last-n values) of an entity not seen for this long, in
    # event time, is dropped and tombstoned in the changelog. Default: the longest window
    # plus a margin (see PipelineSpec.entity_ttl_s).
    ttl_s: float | None = Field(default=None, gt=0)


# The default entity TTL: the longest window plus this margin for late events, and at
# least a day when a last_n feature (no time window of its own) keeps values per entity.
ENTITY_TTL_MARGIN_S = 3600.0
LAST_N_TTL_S = 86_400.0


class WindowSpec(_Strict):
    type: Literal["tumbling", "hopping"] = "tumbling"
    size_s: float = Field(gt=0)
    step_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _hopping(self) -> WindowSpec:
        if self.type == "hopping" and self.step_s is None:
            raise ValueError("a hopping window needs step_s")
        if self.step_s is not None and self.step_s > self.size_s:
            raise ValueError("step_s must not exceed size_s")
        return self


Agg = Literal["count", "sum", "mean", "std", "min", "max"]


class NumericFeature(_Strict):
    kind: Literal["numeric", "log1p", "clip", "standardize"]
    name: str
    field: str
    lower: float | None = None
    upper: float | None = None
    fill: float = 0.0


class CategoricalFeature(_Strict):
    kind: Literal["onehot", "frequency", "hashing"]
    name: str
    field: str
    max_categories: int = Field(default=20, ge=1, le=10_000)
    buckets: int = Field(default=16, ge=2, le=1 << 20)


class TimeFeature(_Strict):
    kind: Literal["cyclic_time"]
    name: str
    field: str | None = None  # default: the record's timestamp


class ConstructedFeature(_Strict):
    kind: Literal["ratio", "interaction", "difference"]
    name: str
    fields: list[str] = Field(min_length=2, max_length=2)


class WindowFeature(_Strict):
    kind: Literal["window"]
    name: str
    field: str
    aggs: list[Agg] = Field(min_length=1)
    window: WindowSpec


class LastNFeature(_Strict):
    kind: Literal["last_n"]
    name: str
    field: str
    n: int = Field(ge=1, le=10_000)
    aggs: list[Agg] = Field(min_length=1)


# --- text features (Step 8): computed per engine batch by streamml.models.text -------


class EmbeddingFeature(_Strict):
    """The field's MiniLM sentence embedding: ``<name>_0 .. <name>_<dims-1>``, reduced from
    384 dimensions by a fixed random projection when ``dims`` is set."""

    kind: Literal["embedding"]
    name: str
    field: str
    dims: int | None = Field(default=None, ge=2, le=384)
    seed: int = 0


class WordsFeature(_Strict):
    """Tokens of the field (river's BagOfWords tokenizer) hashed into ``buckets``:
    ``<name>#<bucket>`` = count (``bag_of_words``) or tf-idf weight with the partition's
    running document frequencies (``tfidf``)."""

    kind: Literal["bag_of_words", "tfidf"]
    name: str
    field: str
    buckets: int = Field(default=256, ge=8, le=1 << 16)
    ngram_range: tuple[int, int] = (1, 1)
    lowercase: bool = True


class ZeroShotFeature(_Strict):
    """Similarity of the field's embedding to each label description, as a softmax over
    the classes (``<name>=<class>``) and as the argmax class (``<name>#top=<class>``)."""

    kind: Literal["zero_shot"]
    name: str
    field: str
    labels: dict[str, str] = Field(min_length=2)  # class -> a description of it
    temperature: float = Field(default=0.05, gt=0, le=10)


class EntitiesFeature(_Strict):
    """spaCy named-entity counts of the field, per type (``<name>=<TYPE>``)."""

    kind: Literal["entities"]
    name: str
    field: str
    types: list[str] = Field(
        default_factory=lambda: ["PERSON", "ORG", "PRODUCT", "GPE", "MONEY", "DATE"], min_length=1
    )


class ClusterFeature(_Strict):
    """Online clustering of the field's embedding: the cluster id as a one-hot
    (``<name>#<id>``); a new cluster is reported as data drift."""

    kind: Literal["cluster"]
    name: str
    field: str
    threshold: float = Field(default=0.3, gt=0, lt=1)  # cosine similarity to join (MiniLM)
    max_clusters: int = Field(default=32, ge=2, le=1024)
    min_events: int = Field(default=200, ge=0)  # no drift reported before this many


TEXT_FEATURES = (EmbeddingFeature, WordsFeature, ZeroShotFeature, EntitiesFeature, ClusterFeature)
TextFeatureSpec = (
    EmbeddingFeature | WordsFeature | ZeroShotFeature | EntitiesFeature | ClusterFeature
)

FEATURE_CLASSES = (
    NumericFeature,
    CategoricalFeature,
    TimeFeature,
    ConstructedFeature,
    WindowFeature,
    LastNFeature,
    *TEXT_FEATURES,
)

FeatureSpec = Annotated[
    NumericFeature
    | CategoricalFeature
    | TimeFeature
    | ConstructedFeature
    | WindowFeature
    | LastNFeature
    | EmbeddingFeature
    | WordsFeature
    | ZeroShotFeature
    | EntitiesFeature
    | ClusterFeature,
    Field(discriminator="kind"),
]


class TextSpec(_Strict):
    """How the text model runs: ``device: auto`` is CUDA fp16 where torch sees a GPU and
    int8 onnxruntime on the CPU elsewhere."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_length: int = Field(default=128, ge=8, le=512)  # tokens per text
    threads: int = Field(default=1, ge=1, le=64)  # onnxruntime intra-op threads
    cache_size: int = Field(default=20_000, ge=0)  # embeddings kept by text hash


class WeakLabelSpec(_Strict):
    """Weak labels for every event from a zero_shot feature (``annotations`` table);
    ``generative_sample`` of the events are also labelled by the generative model, off
    the hot path. ``train``: batch training uses them where no true label came, weighted
    by their confidence."""

    feature: str
    min_confidence: float = Field(default=0.0, ge=0, le=1)
    generative_sample: float = Field(default=0.0, ge=0, le=1)
    train: bool = False


class FlagSpec(_Strict):
    """An event whose served class and weak label differ, both with at least
    ``min_confidence``, is flagged (``flags`` table); ``judge_sample`` of the flags go
    to the generative judge."""

    min_confidence: float = Field(default=0.7, ge=0, le=1)
    judge_sample: float = Field(default=0.0, ge=0, le=1)


class SummarySpec(_Strict):
    """Summaries of ``sample`` of the events' ``field``, made off the hot path
    (``summaries`` table, by event id): extractive (the sentence nearest the text's
    embedding) or generative (the small instruct model)."""

    field: str
    sample: float = Field(default=0.1, ge=0, le=1)
    method: Literal["extractive", "generative"] = "extractive"
    queue: int = Field(default=1000, ge=1)  # waiting texts; past it a sample is dropped


class AnnotateSpec(_Strict):
    weak_labels: WeakLabelSpec | None = None
    flags: FlagSpec | None = None
    summaries: SummarySpec | None = None
    # the background jobs (summaries, generative labels, the judge) run in a child process
    # at the lowest CPU priority, and keep one core busy at most this share of the time:
    # past it they wait, their queue fills and samples are dropped (counted). Priority
    # does not help where a container's CPU limit is shared: the child's time counts too
    max_busy_share: float = Field(default=0.25, gt=0, le=1)


class OnlineModelSpec(_Strict):
    kind: Literal[
        "logistic_regression",
        "softmax_regression",  # multiclass
        "hoeffding_adaptive_tree",
        "hoeffding_tree",
        "gaussian_nb",
        "linear_regression",
        "hoeffding_tree_regressor",
    ]
    scale: bool = True
    params: dict[str, float | int | str | bool] = Field(default_factory=dict)
    # Snapshot the model to its changelog every N labels or T seconds, whichever is first.
    snapshot_every: int = Field(default=500, ge=1)
    snapshot_interval_s: float = Field(default=5.0, gt=0)


# Operational sections, left out of PipelineSpec.spec_hash (see there).
_NOT_HASHED = {
    "batch_model",
    "promotion",
    "serving",
    "drift",
    "retrain",
    "alerts",
    "state",
    "text",
    "annotate",
}


class TopicsSpec(_Strict):
    partitions: int | None = Field(default=None, ge=1, le=1024)


class PipelineSpec(_Strict):
    name: str
    description: str = ""
    task: Literal["classification", "regression"]
    topics: TopicsSpec = TopicsSpec()
    schema_: SchemaSpec = Field(alias="schema")
    label: LabelSpec = LabelSpec()
    state: StateSpec = StateSpec()
    features: list[FeatureSpec] = Field(min_length=1)
    select: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    online_model: OnlineModelSpec
    batch_model: BatchModelSpec | None = None
    promotion: PromotionSpec = PromotionSpec()
    serving: ServingSpec = ServingSpec()
    drift: DriftSpec = DriftSpec()
    retrain: RetrainSpec = RetrainSpec()
    alerts: AlertsSpec = AlertsSpec()
    text: TextSpec = TextSpec()
    annotate: AnnotateSpec = AnnotateSpec()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("lower-case letters, digits and underscores, starting with a letter")
        return value

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Fill in the loss and promotion metric the task implies when they are omitted."""
        if not isinstance(data, dict) or data.get("task") not in TASK_LOSSES:
            return data
        task = data["task"]
        out = dict(data)
        batch = out.get("batch_model")
        if isinstance(batch, dict) and "loss" not in batch:
            out["batch_model"] = {**batch, "loss": TASK_LOSSES[task][0]}
        promotion = out.get("promotion", {})
        if isinstance(promotion, dict) and "metric" not in promotion:
            out["promotion"] = {**promotion, "metric": TASK_METRICS[task][0]}
        return out

    @model_validator(mode="after")
    def _references(self) -> PipelineSpec:
        fields = self.schema_.fields
        names: list[str] = []
        for i, feature in enumerate(self.features):
            where = f"features[{i}] ({feature.name})"
            used = _fields_used(feature, self.schema_.timestamp)
            for name in used:
                if name not in fields and name != self.schema_.timestamp:
                    raise ValueError(f"{where}: field {name!r} is not in schema.fields")
                pii = fields[name].pii if name in fields else None
                if pii == "hash" and not isinstance(feature, CategoricalFeature):
                    raise ValueError(
                        f"{where}: field {name!r} is pii 'hash' (a keyed-hash string): only "
                        "onehot, frequency and hashing features can use it"
                    )
                if pii in ("redact", "drop"):
                    raise ValueError(
                        f"{where}: field {name!r} is pii {pii!r}: no feature can use it "
                        "(mark it pii: hash to use it as a category)"
                    )
            names.append(feature.name)
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"feature names must be unique: {sorted(dupes)}")
        for i, feature in enumerate(self.features):
            if isinstance(feature, TEXT_FEATURES) and fields[feature.field].type != "string":
                raise KeyProblem(
                    ("features", i, "field"),
                    f"{feature.kind} needs a string field; {feature.field!r} is "
                    f"{fields[feature.field].type}",
                )
        self._check_annotate(fields)
        windowed = [f for f in self.features if isinstance(f, WindowFeature | LastNFeature)]
        if windowed and self.schema_.entity_key is None:
            raise ValueError(f"{windowed[0].name}: per-entity aggregates need schema.entity_key")
        model = self.online_model.kind
        regression = model in {"linear_regression", "hoeffding_tree_regressor"}
        if regression != (self.task == "regression"):
            raise ValueError(f"online_model.kind {model!r} does not fit task {self.task!r}")
        if self.task == "regression" and self.label.classes is not None:
            raise ValueError("label.classes is for classification; use label.min/max")
        if self.task == "classification" and (
            self.label.min is not None or self.label.max is not None
        ):
            raise ValueError("label.min/max are for regression; use label.classes")
        self._check_batch()
        self._check_operations()
        return self

    def _check_batch(self) -> None:
        if self.batch_model is not None and self.batch_model.loss not in TASK_LOSSES[self.task]:
            raise ValueError(
                f"batch_model.loss {self.batch_model.loss!r} does not fit task {self.task!r} "
                f"(use one of {list(TASK_LOSSES[self.task])})"
            )
        if self.promotion.metric not in TASK_METRICS[self.task]:
            raise ValueError(
                f"promotion.metric {self.promotion.metric!r} does not fit task {self.task!r} "
                f"(use one of {list(TASK_METRICS[self.task])})"
            )
        if self.batch_model is None:
            for role in ("champion", "challenger"):
                if getattr(self.serving, role) == "batch":
                    raise ValueError(f"serving.{role} 'batch' needs a batch_model section")

    def _check_operations(self) -> None:
        concept = self.drift.concept
        if concept is not None and concept.detector == "ddm" and self.task != "classification":
            raise KeyProblem(
                ("drift", "concept", "detector"),
                "ddm watches 0/1 errors: use it with task classification (adwin or page_hinkley "
                "for regression)",
            )
        data = self.drift.data
        if data is not None and data.features is not None:
            keys = self.numeric_keys(selected=False)  # select/exclude may change: not an error
            for i, name in enumerate(data.features):
                if name not in keys:
                    raise KeyProblem(
                        ("drift", "data", "features", i),
                        f"{name!r} is not a numeric feature (one of {sorted(keys)})",
                    )
        if self.retrain.on_drift:
            for i, kind in enumerate(self.retrain.kinds):
                if getattr(self.drift, kind) is None:
                    raise KeyProblem(
                        ("retrain", "kinds", i), f"{kind!r} needs a drift.{kind} section"
                    )
        for i, rule in enumerate(self.alerts.rules):
            other = next(t for t in TASK_ALERT_METRICS if t != self.task)
            if rule.metric in TASK_ALERT_METRICS[other]:
                raise KeyProblem(
                    ("alerts", "rules", i, "metric"),
                    f"{rule.metric!r} does not fit task {self.task!r} "
                    f"(use one of {sorted(TASK_ALERT_METRICS[self.task])} or an operational one)",
                )

    def _check_annotate(self, fields: dict[str, FieldSpec]) -> None:
        weak, summaries = self.annotate.weak_labels, self.annotate.summaries
        if weak is not None:
            found = [f for f in self.features if f.name == weak.feature]
            if not found or not isinstance(found[0], ZeroShotFeature):
                raise KeyProblem(
                    ("annotate", "weak_labels", "feature"),
                    f"{weak.feature!r} is not a zero_shot feature of this spec",
                )
            if self.task != "classification":
                raise KeyProblem(("annotate", "weak_labels"), "weak labels need classification")
            classes = self.label.classes
            extra = sorted(set(found[0].labels) - set(classes or found[0].labels))
            if extra:
                raise KeyProblem(
                    ("annotate", "weak_labels", "feature"),
                    f"zero_shot classes {extra} are not in label.classes: a weak label must "
                    "be a class a true label can be",
                )
        if self.annotate.flags is not None and weak is None:
            raise KeyProblem(
                ("annotate", "flags"), "flags compare with weak labels: set weak_labels"
            )
        if summaries is not None:
            spec = fields.get(summaries.field)
            if spec is None or spec.type != "string" or spec.pii is not None:
                raise KeyProblem(
                    ("annotate", "summaries", "field"),
                    f"{summaries.field!r} must be a string field of the schema without pii",
                )

    @property
    def text_features(self) -> list[TextFeatureSpec]:
        """The features computed from text (per batch, by streamml.models.text)."""
        return [f for f in self.features if isinstance(f, TEXT_FEATURES)]

    # --- derived ---------------------------------------------------------------
    def numeric_keys(self, selected: bool = True) -> set[str]:
        """Keys of the feature vector that carry a number (not one-hot or hashing
        indicators); after ``select`` and ``exclude`` unless ``selected`` is False."""
        suffixes = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
        keys: set[str] = set()
        for f in self.features:
            if isinstance(f, CategoricalFeature) and f.kind != "frequency":
                continue
            if isinstance(f, WordsFeature | EntitiesFeature | ClusterFeature):
                continue  # indicators and counts
            if isinstance(f, EmbeddingFeature):
                expanded = {f"{f.name}_{i}" for i in range(f.dims or 384)}
            elif isinstance(f, ZeroShotFeature):
                expanded = {f"{f.name}={c}" for c in f.labels}
            elif isinstance(f, WindowFeature | LastNFeature | TimeFeature):
                expanded = {
                    f"{f.name}_{s}" for s in (suffixes if isinstance(f, TimeFeature) else f.aggs)
                }
            else:
                expanded = {f.name}
            if selected and self.select is not None and f.name not in self.select:
                expanded &= set(self.select)
            if selected:
                expanded = set() if f.name in self.exclude else expanded - set(self.exclude)
            keys |= expanded
        return keys

    @model_validator(mode="after")
    def _state_ttl(self) -> PipelineSpec:
        longest = self.longest_window_s
        if self.state.ttl_s is not None and self.state.ttl_s < longest:
            raise KeyProblem(
                ("state", "ttl_s"),
                f"{self.state.ttl_s:g} s is shorter than the longest window ({longest:g} s): "
                "an entity would be forgotten while its window still holds events",
            )
        return self

    @property
    def longest_window_s(self) -> float:
        """The size of the longest window feature, 0 without one."""
        return max(
            (f.window.size_s for f in self.features if isinstance(f, WindowFeature)), default=0.0
        )

    @property
    def entity_ttl_s(self) -> float:
        """Event time after an entity's newest event when its windows and last-n values
        are dropped: ``state.ttl_s``, or the longest window plus ENTITY_TTL_MARGIN_S (at
        least LAST_N_TTL_S with a last_n feature, whose values have no window)."""
        if self.state.ttl_s is not None:
            return self.state.ttl_s
        ttl = self.longest_window_s + ENTITY_TTL_MARGIN_S
        if any(isinstance(f, LastNFeature) for f in self.features):
            ttl = max(ttl, LAST_N_TTL_S)
        return ttl

    def topic(self, suffix: str) -> str:
        return f"{self.name}.{suffix}"

    @property
    def topics_by_role(self) -> dict[str, str]:
        roles = ["raw", "dlq", "features", "predictions", "labels"]
        if self.annotated:
            roles.append("annotations")  # weak labels, flags and summaries
        return {r: self.topic(r) for r in roles}

    @property
    def annotated(self) -> bool:
        """Whether the spec asks for weak labels, flags or summaries."""
        a = self.annotate
        return a.weak_labels is not None or a.flags is not None or a.summaries is not None

    @property
    def spec_hash(self) -> str:
        """Identity of the data contract and online model. Batch training settings, the
        promotion rule, serving roles, drift monitors, retraining and alerts are left out:
        changing them (promoting the batch model, tuning a detector) neither renames the
        online model nor invalidates trained artifacts."""
        data = self.model_dump(mode="json", by_alias=True, exclude=_NOT_HASHED)
        if self.text_features:  # the token limit changes what text features are
            data["text_max_length"] = self.text.max_length
        for field_data in data["schema"]["fields"].values():  # unmarked: the hash as before
            if field_data.get("pii") is None:
                field_data.pop("pii", None)
        canonical = json.dumps(data, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _fields_used(feature: Any, timestamp: str) -> list[str]:
    if isinstance(feature, ConstructedFeature):
        return list(feature.fields)
    if isinstance(feature, TimeFeature):
        return [feature.field or timestamp]
    return [feature.field]


def parse_spec(data: Any, source: str = "<spec>") -> PipelineSpec:
    """Validate spec data; a problem becomes a SpecError naming the key and the fix."""
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: a pipeline spec is a mapping of keys, got {type(data).__name__}"
        )
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        kinds = {
            k for f in FEATURE_CLASSES for k in typing.get_args(f.model_fields["kind"].annotation)
        }
        for err in exc.errors():
            parts = [str(p) for p in err["loc"] if not str(p).startswith("function-")]
            if len(parts) > 2 and parts[0] == "features" and parts[2] in kinds:
                del parts[2]  # the discriminator pydantic adds is not a key of the file
            msg = err["msg"].removeprefix("Value error, ")
            problem = err.get("ctx", {}).get("error")
            if isinstance(problem, KeyProblem):  # a check below the key pydantic reports
                parts += [str(p) for p in problem.path]
                msg = problem.detail
            loc = ".".join(parts)
            loc = loc.replace("schema_", "schema")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required key is missing"
            problems.append(f"{loc or '(top level)'}: {msg}")
        raise SpecError(f"{source}: invalid pipeline spec:\n  " + "\n  ".join(problems)) from None


def load_spec(path: Path) -> PipelineSpec:
    """Read and validate a YAML spec file."""
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError:
        raise SpecError(f"no pipeline spec at {path}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    return parse_spec(data, str(path))

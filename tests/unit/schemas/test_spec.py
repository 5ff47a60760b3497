"""Pipeline specs: the shipped files load, derived names, and precise SpecError messages."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamml.errors import SpecError
from streamml.models import synthetic
from streamml.models.features import Featurizer, GlobalState
from streamml.schemas.records import Record, Source, validate
from streamml.schemas.spec import PipelineSpec, load_spec, parse_spec

PIPELINES = Path(__file__).resolve().parents[3] / "pipelines"
ROLES = ("raw", "dlq", "features", "predictions", "labels")


def _data(name: str = "demo") -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((PIPELINES / f"{name}.yaml").read_text("utf-8"))
    return data


def _set(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with the dotted ``path`` (list indexes as digits) set to ``value``."""
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def _drop(data: dict[str, Any], path: str) -> dict[str, Any]:
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    del node[last]
    return out


def _problem(data: Any) -> str:
    """The SpecError message for ``data``, checked to list exactly one problem."""
    with pytest.raises(SpecError) as info:
        parse_spec(data, "t.yaml")
    message = str(info.value)
    head = "t.yaml: invalid pipeline spec:\n  "
    assert message.startswith(head), message
    problem = message.removeprefix(head)
    assert "\n" not in problem, f"expected one problem, got: {message}"
    return problem


# --- the shipped specs ------------------------------------------------------------------


def test_demo_spec_loads_with_its_declared_shape() -> None:
    spec = load_spec(PIPELINES / "demo.yaml")
    assert spec.name == "demo"
    assert spec.task == "classification"
    assert spec.topics.partitions == 6
    assert spec.schema_.entity_key == "user_id"
    assert spec.schema_.max_record_bytes == 4096
    assert spec.schema_.fields["country"].choices == [
        "US",
        "DE",
        "FR",
        "GB",
        "BR",
        "IN",
        "JP",
        "NG",
    ]
    assert spec.schema_.fields["device"].nullable and not spec.schema_.fields["device"].required
    assert spec.label.field == "is_fraud" and spec.label.positive == "True"
    assert spec.label.ttl_s == 600
    assert len(spec.features) == 15
    assert [f.kind for f in spec.features][-6:-3] == ["window", "window", "last_n"]
    assert [f.kind for f in spec.features][-3:] == ["numeric", "numeric", "onehot"]
    assert spec.exclude == ["amount_x_risk", "t"]
    assert spec.online_model.kind == "logistic_regression"
    assert spec.online_model.params == {"l2": 0.0, "lr": 0.1}


def test_phishing_spec_loads_with_defaults_filled_in() -> None:
    spec = load_spec(PIPELINES / "phishing.yaml")
    assert spec.name == "phishing"
    assert spec.topics.partitions == 1
    assert spec.schema_.entity_key is None
    assert spec.schema_.unknown_fields == "reject"
    assert spec.schema_.max_record_bytes == 65_536
    assert len(spec.schema_.fields) == 9
    assert [f.name for f in spec.features] == list(spec.schema_.fields)
    assert {f.kind for f in spec.features} == {"numeric"}
    assert spec.label.ttl_s == 3600.0
    assert spec.online_model.snapshot_every == 500
    assert spec.select is None and spec.exclude == []


@pytest.mark.parametrize("name", ["demo", "phishing"])
def test_derived_topic_names(name: str) -> None:
    spec = load_spec(PIPELINES / f"{name}.yaml")
    assert spec.topics_by_role == {role: f"{name}.{role}" for role in ROLES}
    assert spec.topic("raw") == f"{name}.raw"


def test_parse_spec_accepts_the_same_data_as_load_spec() -> None:
    assert parse_spec(_data("demo")) == load_spec(PIPELINES / "demo.yaml")


# --- precise errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("nmae", "nmae: unknown key"),
        ("schema.fields.amount.typ", "schema.fields.amount.typ: unknown key"),
        ("schema.entity", "schema.entity: unknown key"),
        ("label.postive", "label.postive: unknown key"),
        ("online_model.knd", "online_model.knd: unknown key"),
        ("topics.partition", "topics.partition: unknown key"),
    ],
)
def test_unknown_key_names_the_dotted_path(path: str, expected: str) -> None:
    assert _problem(_set(_data(), path, 1)) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # features[0] is {name: amount_log, kind: log1p, field: amount}
        ("features.0.fild", "features.0.fild: unknown key"),
        # features[9] is the tumbling window feature; its window mapping has a typo
        ("features.9.window.sise_s", "features.9.window.sise_s: unknown key"),
    ],
)
def test_unknown_key_inside_a_feature_names_the_path_in_the_file(path: str, expected: str) -> None:
    # The path must be one the user can find in the YAML: no feature *kind* in it.
    assert _problem(_set(_data(), path, 1)) == expected


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("task", "task: required key is missing"),
        ("name", "name: required key is missing"),
        ("online_model", "online_model: required key is missing"),
        ("online_model.kind", "online_model.kind: required key is missing"),
        ("schema.fields", "schema.fields: required key is missing"),
        ("schema.fields.amount.type", "schema.fields.amount.type: required key is missing"),
    ],
)
def test_missing_required_key_is_named(path: str, expected: str) -> None:
    assert _problem(_drop(_data(), path)) == expected


def test_feature_referencing_an_undeclared_field() -> None:
    data = _set(_data(), "features.0.field", "amt")
    assert _problem(data) == (
        "(top level): features[0] (amount_log): field 'amt' is not in schema.fields"
    )


def test_constructed_feature_checks_both_of_its_fields() -> None:
    data = _set(_data(), "features.7.fields", ["amount", "quantity"])
    assert _problem(data) == (
        "(top level): features[7] (amount_per_item): field 'quantity' is not in schema.fields"
    )


def test_cyclic_time_may_use_the_record_timestamp_which_is_not_a_field() -> None:
    data = _set(_data(), "features.6", {"name": "t", "kind": "cyclic_time", "field": "ts"})
    assert "ts" not in data["schema"]["fields"]
    spec = parse_spec(data)
    assert spec.features[6].kind == "cyclic_time"


def test_duplicate_feature_names() -> None:
    data = _set(_data(), "features.1.name", "amount_log")
    assert _problem(data) == "(top level): feature names must be unique: ['amount_log']"


def test_window_feature_needs_an_entity_key() -> None:
    data = _drop(_data(), "schema.entity_key")
    assert _problem(data) == (
        "(top level): user_amount_1m: per-entity aggregates need schema.entity_key"
    )


def test_last_n_feature_needs_an_entity_key() -> None:
    data = _data("phishing")
    data["features"].append(
        {"name": "recent_https", "kind": "last_n", "field": "https", "n": 3, "aggs": ["mean"]}
    )
    assert _problem(data) == (
        "(top level): recent_https: per-entity aggregates need schema.entity_key"
    )


def test_entity_key_must_be_a_field() -> None:
    data = _set(_data(), "schema.entity_key", "account")
    assert _problem(data) == "schema: entity_key 'account' is not one of the fields"


@pytest.mark.parametrize(
    ("task", "kind"),
    [
        ("classification", "linear_regression"),
        ("classification", "hoeffding_tree_regressor"),
        ("regression", "logistic_regression"),
        ("regression", "gaussian_nb"),
    ],
)
def test_model_kind_must_fit_the_task(task: str, kind: str) -> None:
    data = _set(_set(_data(), "task", task), "online_model.kind", kind)
    data["online_model"]["params"] = {}
    assert _problem(data) == (f"(top level): online_model.kind {kind!r} does not fit task {task!r}")


def test_unknown_model_kind_is_rejected_at_its_key() -> None:
    problem = _problem(_set(_data(), "online_model.kind", "svm"))
    assert problem.startswith("online_model.kind: ")
    assert "'logistic_regression'" in problem


def test_bad_pipeline_name() -> None:
    assert _problem(_set(_data(), "name", "Demo-1")) == (
        "name: lower-case letters, digits and underscores, starting with a letter"
    )


def test_spec_that_is_not_a_mapping() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(["name", "demo"], "t.yaml")
    assert str(info.value) == "t.yaml: a pipeline spec is a mapping of keys, got list"


def test_every_problem_is_listed_with_the_file_name(tmp_path: Path) -> None:
    data = _drop(_set(_data(), "nmae", 1), "task")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data), "utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{path}: invalid pipeline spec:"
    assert sorted(line.strip() for line in lines[1:]) == [
        "nmae: unknown key",
        "task: required key is missing",
    ]


def test_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\nfeatures: [unclosed\n", "utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert re.search(r"line \d+", message), message


def test_empty_yaml_file_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", "utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"{path}: a pipeline spec is a mapping of keys, got NoneType"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == f"no pipeline spec at {path}"


def test_spec_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_spec({}, "t.yaml")


# --- spec_hash -------------------------------------------------------------------------


def test_spec_hash_is_stable() -> None:
    first = load_spec(PIPELINES / "demo.yaml").spec_hash
    assert re.fullmatch(r"[0-9a-f]{16}", first)
    assert load_spec(PIPELINES / "demo.yaml").spec_hash == first
    assert parse_spec(_data()).spec_hash == first


def test_spec_hash_ignores_key_order_and_formatting(tmp_path: Path) -> None:
    data = _data()
    reordered = dict(reversed(list(data.items())))
    reordered["schema"] = dict(reversed(list(data["schema"].items())))
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(reordered, sort_keys=False, indent=4), "utf-8")
    assert load_spec(path).spec_hash == load_spec(PIPELINES / "demo.yaml").spec_hash


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("description", "another description"),
        ("online_model.params", {"l2": 0.01}),
        ("schema.fields.amount.min", 1),
        ("features.3.max_categories", 13),
        ("exclude", []),
    ],
)
def test_spec_hash_changes_with_content(path: str, value: Any) -> None:
    base: PipelineSpec = parse_spec(_data())
    changed = parse_spec(_set(_data(), path, value))
    assert changed.spec_hash != base.spec_hash


def test_spec_hash_differs_between_the_shipped_specs() -> None:
    demo = load_spec(PIPELINES / "demo.yaml")
    phishing = load_spec(PIPELINES / "phishing.yaml")
    assert demo.spec_hash != phishing.spec_hash


# --- batch model, promotion and serving ------------------------------------------------


def test_demo_spec_declares_a_batch_challenger_in_shadow() -> None:
    spec = load_spec(PIPELINES / "demo.yaml")
    batch = spec.batch_model
    assert batch is not None
    assert (batch.kind, batch.hidden, batch.loss, batch.optimizer) == (
        "mlp",
        [32, 16],
        "bce",
        "adam",
    )
    assert (batch.split.validation, batch.split.test) == (0.15, 0.15)
    assert batch.search is not None and batch.search.method == "random"
    assert batch.search.trials == 2
    assert batch.search.space.axes() == {
        "lr": [0.001, 0.003],
        "hidden": [[32, 16], [64, 32], [16]],
        "weight_decay": [0.0, 0.0001],
    }
    assert batch.onnx.parity_tolerance == 1e-5 and batch.cv_folds == 2
    assert (spec.promotion.metric, spec.promotion.min_delta) == ("accuracy", 0.005)
    assert spec.promotion.min_labeled_events == 300
    assert (spec.serving.champion, spec.serving.challenger) == ("online", "batch")
    assert spec.serving.challenger_mode == "shadow"


def test_without_the_new_sections_the_online_model_serves_alone() -> None:
    spec = load_spec(PIPELINES / "phishing.yaml")
    assert spec.batch_model is None
    assert spec.promotion.metric == "roc_auc" and spec.promotion.min_delta == 0.0
    assert spec.promotion.min_labeled_events == 500
    assert (spec.serving.champion, spec.serving.challenger) == ("online", "none")
    assert (spec.serving.challenger_mode, spec.serving.canary_share) == ("shadow", 0.1)


def _regression(data: dict[str, Any]) -> dict[str, Any]:
    out = _set(_data("phishing"), "task", "regression")
    out = _set(out, "online_model.kind", "linear_regression")
    out["online_model"]["params"] = {}
    out.update(data)
    return out


def test_loss_and_promotion_metric_default_by_task() -> None:
    classification = parse_spec({**_data("phishing"), "batch_model": {}})
    assert classification.batch_model is not None
    assert classification.batch_model.loss == "bce"
    assert classification.promotion.metric == "roc_auc"
    regression = parse_spec(_regression({"batch_model": {}, "promotion": {"min_delta": 0.1}}))
    assert regression.batch_model is not None and regression.batch_model.loss == "mse"
    assert regression.promotion.metric == "rmse" and regression.promotion.lower_is_better
    assert regression.promotion.min_delta == 0.1


@pytest.mark.parametrize(
    ("task", "loss"),
    [("classification", "mse"), ("regression", "bce"), ("regression", "cross_entropy")],
)
def test_loss_must_fit_the_task(task: str, loss: str) -> None:
    data = _data() if task == "classification" else _regression({"batch_model": {}})
    data = _set(data, "batch_model.loss", loss)
    assert _problem(data).startswith(
        f"(top level): batch_model.loss {loss!r} does not fit task {task!r} (use one of "
    )


@pytest.mark.parametrize(
    ("task", "metric"),
    [("classification", "rmse"), ("regression", "f1"), ("regression", "roc_auc")],
)
def test_promotion_metric_must_fit_the_task(task: str, metric: str) -> None:
    data = _data() if task == "classification" else _regression({})
    data = {**data, "promotion": {"metric": metric}}
    assert _problem(data).startswith(
        f"(top level): promotion.metric {metric!r} does not fit task {task!r} (use one of "
    )


@pytest.mark.parametrize("role", ["champion", "challenger"])
def test_serving_the_batch_model_needs_a_batch_model_section(role: str) -> None:
    data = _drop(_data(), "batch_model")
    data["serving"] = {"champion": "online", "challenger": "none", role: "batch"}
    assert _problem(data) == f"(top level): serving.{role} 'batch' needs a batch_model section"


@pytest.mark.parametrize(
    ("serving", "expected"),
    [
        ({"challenger": "online"}, "challenger 'online' is already the champion"),
        ({"challenger_mode": "canary"}, "challenger_mode needs a challenger"),
        ({"challenger": "batch", "canary_share": 0.2}, "canary_share applies to challenger_mode "),
    ],
)
def test_serving_roles_are_consistent(serving: dict[str, Any], expected: str) -> None:
    assert _problem({**_data(), "serving": serving}).startswith(f"serving: {expected}")


def test_a_canary_takes_a_share_strictly_between_0_and_1() -> None:
    serving = {"champion": "online", "challenger": "batch", "challenger_mode": "canary"}
    spec = parse_spec({**_data(), "serving": {**serving, "canary_share": 0.25}})
    assert spec.serving.canary_share == 0.25
    problem = _problem({**_data(), "serving": {**serving, "canary_share": 1.0}})
    assert problem.startswith("serving.canary_share: Input should be less than 1")


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("batch_model.kind", "xgboost", "batch_model.kind: Input should be 'mlp'"),
        ("batch_model.activation", "sigmoid", "batch_model.activation: Input should be 'relu'"),
        ("batch_model.optimizer", "rmsprop", "batch_model.optimizer: Input should be 'adam' or"),
        ("batch_model.hidden", [32, 0], "batch_model.hidden.1: Input should be greater than"),
        ("batch_model.lr", 0, "batch_model.lr: Input should be greater than 0"),
        ("batch_model.cv_folds", 1, "batch_model.cv_folds: Input should be greater than"),
        ("batch_model.epoch", 3, "batch_model.epoch: unknown key"),
        ("batch_model.onnx.thread", 2, "batch_model.onnx.thread: unknown key"),
        ("batch_model.search.space.momentum", [0.9], "batch_model.search.space.momentum: unknown"),
        ("batch_model.search.space.lr", [], "batch_model.search.space.lr: List should have at"),
        ("batch_model.search.space.activation", ["relu", "swish"], "batch_model.search.space.act"),
        ("batch_model.search.space", {}, "batch_model.search.space: name at least one of lr, "),
        ("batch_model.split", {"validation": 0.3, "test": 0.35}, "batch_model.split: validation"),
        ("promotion.metric", "auc", "promotion.metric: Input should be 'accuracy', 'precision'"),
        ("promotion.min_delta", -0.1, "promotion.min_delta: Input should be greater than or eq"),
        ("serving.champion", "river", "serving.champion: Input should be 'online' or 'batch'"),
    ],
)
def test_batch_keys_are_checked_at_their_path(path: str, value: Any, expected: str) -> None:
    assert _problem(_set(_data(), path, value)).startswith(expected)


def test_grid_search_takes_no_trials() -> None:
    data = _set(_data(), "batch_model.search.method", "grid")
    assert _problem(data) == (
        "batch_model.search: trials applies to method random only (grid tries every combination)"
    )
    assert parse_spec(_drop(data, "batch_model.search.trials")).batch_model is not None


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("batch_model.lr", 0.01),
        ("serving", {"champion": "batch", "challenger": "online"}),
        ("serving.challenger_mode", "canary"),
        ("promotion.min_delta", 0.0),
        ("promotion.metric", "f1"),
    ],
)
def test_spec_hash_ignores_batch_settings_promotion_and_serving(path: str, value: Any) -> None:
    # Promoting the batch model must not rename the online model or invalidate artifacts
    # the registry checks against the spec hash.
    base = parse_spec(_data())
    changed = parse_spec(_set(_data(), path, value))
    assert changed != base
    assert changed.spec_hash == base.spec_hash


def test_spec_hash_is_the_same_with_or_without_the_batch_sections() -> None:
    data = _data()
    plain = {k: v for k, v in data.items() if k not in ("batch_model", "promotion", "serving")}
    assert parse_spec(plain).spec_hash == parse_spec(data).spec_hash


# --- drift, retraining and alerts ------------------------------------------------------


def test_demo_spec_declares_drift_monitors_retraining_and_alerts() -> None:
    spec = load_spec(PIPELINES / "demo.yaml")
    concept, data, prediction = spec.drift.concept, spec.drift.data, spec.drift.prediction
    assert concept is not None and data is not None
    assert prediction is None  # the online champion's scores move as it learns: left out
    assert (concept.detector, concept.params, concept.min_events) == ("adwin", {"delta": 0.05}, 100)
    assert (data.method, data.features, data.threshold, data.window) == (
        "psi",
        ["amount_log", "risk"],
        0.2,
        500,
    )
    retrain = spec.retrain
    assert (retrain.on_drift, retrain.kinds, retrain.cooldown_s) == (True, ["concept"], 120)
    assert (retrain.last_events, retrain.min_events, retrain.interval_s) == (4000, 2000, None)
    rules = {r.name: (r.metric, r.op, r.threshold, r.window_s) for r in spec.alerts.rules}
    assert rules == {
        "low_accuracy": ("accuracy", "below", 0.6, 120),
        "dead_letters": ("dead_letter_rate", "above", 0.05, 300),
        "slow_scoring": ("p99_latency_ms", "above", 250, 300),
        "consumer_lag": ("consumer_lag", "above", 20000, 300),
    }


def test_without_the_step_4_sections_concept_drift_retrains_and_nothing_alerts() -> None:
    spec = load_spec(PIPELINES / "phishing.yaml")
    assert spec.drift.concept is not None and spec.drift.concept.detector == "adwin"
    assert spec.drift.concept.params == {} and spec.drift.concept.min_events == 100
    assert spec.drift.data is None and spec.drift.prediction is None
    assert spec.retrain.kinds == ["concept"] and spec.retrain.cooldown_s == 300
    assert spec.retrain.since_drift and spec.retrain.last_events == 5000
    assert spec.alerts.rules == [] and spec.alerts.webhook is None
    assert spec.alerts.interval_s == 10


def test_numeric_keys_are_the_non_indicator_keys_the_featurizer_emits() -> None:
    spec = load_spec(PIPELINES / "demo.yaml")
    featurizer, state, entity = Featurizer(spec), GlobalState(), {}
    seen: set[str] = set()
    for i, example in enumerate(synthetic.payments(50)):
        record = validate(spec, json.dumps(example.record).encode(), Source("r", 0, i, 0))
        assert isinstance(record, Record)
        seen |= set(featurizer.transform(record, state, entity))
    assert spec.numeric_keys() == {k for k in seen if "=" not in k and "#" not in k}
    assert "amount_x_risk" not in spec.numeric_keys()  # excluded by the demo
    time_keys = {f"t_{s}" for s in ("hour_sin", "hour_cos", "dow_sin", "dow_cos")}
    assert spec.numeric_keys(selected=False) == spec.numeric_keys() | {"amount_x_risk"} | time_keys


def test_data_drift_may_name_a_feature_that_select_leaves_out() -> None:
    # Trying another feature selection must not invalidate the drift section.
    spec = parse_spec({**_data(), "select": ["amount_z"]})
    assert spec.drift.data is not None and spec.drift.data.features == ["amount_log", "risk"]
    assert spec.numeric_keys() == {"amount_z"}


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("drift.concpt", {}, "drift.concpt: unknown key"),
        ("drift.concept.detector", "eddm", "drift.concept.detector: Input should be 'adwin', "),
        ("drift.concept.params", {"dlta": 0.1}, "drift.concept.params.dlta: not a parameter of "),
        ("drift.concept.params", {"delta": 1.5}, "drift.concept.params.delta: must be between 0"),
        ("drift.concept.params", {"clock": 0}, "drift.concept.params.clock: must be above 0"),
        ("drift.concept.min_events", 0, "drift.concept.min_events: Input should be greater"),
        ("drift.data.method", "ks", "drift.data.method: Input should be 'psi' or 'kswin'"),
        ("drift.data.alpha", 0.01, "drift.data.alpha: applies to method kswin only"),
        ("drift.data.window", 10, "drift.data.window: Input should be greater than or equal to 50"),
        ("drift.data.features", ["amount"], "drift.data.features.0: 'amount' is not a numeric fea"),
        ("drift.data.features", ["risk", "merchant"], "drift.data.features.1: 'merchant' is not"),
        ("drift.data.features", [], "drift.data.features: List should have at least 1 item"),
        (
            "drift.prediction",
            {"method": "kswin"},
            "drift.prediction.method: Input should be 'psi'",
        ),
        ("retrain.kinds", ["concept", "data", "concept"], "retrain.kinds: list each kind once"),
        ("retrain.kinds", ["model"], "retrain.kinds.0: Input should be 'concept', 'data' or "),
        ("retrain.min_events", 5000, "retrain.min_events: must not exceed last_events (4000)"),
        ("retrain.cooldown_s", -1, "retrain.cooldown_s: Input should be greater than or equal"),
        ("retrain.interval_s", 0, "retrain.interval_s: Input should be greater than 0"),
        ("retrain.every", 60, "retrain.every: unknown key"),
        ("alerts.rules.0.metric", "rmse", "alerts.rules.0.metric: 'rmse' does not fit task "),
        ("alerts.rules.1.op", "over", "alerts.rules.1.op: Input should be 'below' or 'above'"),
        ("alerts.rules.2.name", "", "alerts.rules.2.name: String should have at least 1 char"),
        ("alerts.rules.3.threshold", None, "alerts.rules.3.threshold: Input should be a valid"),
        ("alerts.rules.1.name", "low_accuracy", "alerts.rules: rule names must be unique: ['low_"),
        ("alerts.webhook", "ftp://example.com/x", "alerts.webhook: an http:// or https:// URL"),
        ("alerts.webhook", "https://", "alerts.webhook: an http:// or https:// URL with a host"),
        ("alerts.interval_s", 0, "alerts.interval_s: Input should be greater than 0"),
    ],
)
def test_step_4_keys_are_checked_at_their_path(path: str, value: Any, expected: str) -> None:
    assert _problem(_set(_data(), path, value)).startswith(expected)


def test_a_retrain_kind_needs_its_monitor() -> None:
    data = _set(_drop(_data(), "drift.data"), "retrain.kinds", ["concept", "data"])
    assert _problem(data) == "retrain.kinds.1: 'data' needs a drift.data section"
    no_concept = _set(_data(), "drift.concept", None)
    assert _problem(no_concept) == "retrain.kinds.0: 'concept' needs a drift.concept section"
    quiet = _set(no_concept, "retrain.on_drift", False)
    assert parse_spec(quiet).drift.concept is None


def test_task_specific_alert_metrics_and_detectors() -> None:
    rule = {"name": "err", "metric": "accuracy", "op": "below", "threshold": 0.5}
    regression = _regression({"alerts": {"rules": [rule]}})
    assert _problem(regression).startswith(
        "alerts.rules.0.metric: 'accuracy' does not fit task 'regression' (use one of "
    )
    ok = _regression({"alerts": {"rules": [{**rule, "metric": "mae", "op": "above"}]}})
    assert parse_spec(ok).alerts.rules[0].metric == "mae"
    ddm = _regression({"drift": {"concept": {"detector": "ddm"}}})
    assert _problem(ddm).startswith("drift.concept.detector: ddm watches 0/1 errors")


def test_webhook_accepts_http_and_https() -> None:
    for url in ("http://localhost:9000/hook", "https://alerts.example.com/streamml"):
        assert parse_spec(_set(_data(), "alerts.webhook", url)).alerts.webhook == url


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("drift.concept.params", {"delta": 0.01}),
        ("drift.data.threshold", 0.3),
        ("retrain.cooldown_s", 60),
        ("alerts.rules.0.threshold", 0.7),
        ("alerts.webhook", "https://example.com/hook"),
    ],
)
def test_spec_hash_ignores_drift_retrain_and_alerts(path: str, value: Any) -> None:
    base = parse_spec(_data())
    changed = parse_spec(_set(_data(), path, value))
    assert changed != base
    assert changed.spec_hash == base.spec_hash


def test_spec_hash_is_the_same_with_or_without_the_step_4_sections() -> None:
    data = _data()
    plain = {k: v for k, v in data.items() if k not in ("drift", "retrain", "alerts")}
    assert parse_spec(plain).spec_hash == parse_spec(data).spec_hash

"""Labels are validated against the spec: a class of the class set, or a finite number in
range. Anything else is a dead letter saying why (never an exception, never learned)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamml.errors import SpecError
from streamml.schemas.records import DeadLetter, Label, Source, label_problem, validate_label
from streamml.schemas.spec import PipelineSpec, parse_spec

SRC = Source("p.labels", 0, 1, 0)


def _spec(task: str = "classification", **label: Any) -> PipelineSpec:
    return parse_spec(
        {
            "name": "p",
            "task": task,
            "schema": {"fields": {"x": {"type": "float"}}},
            "label": label,
            "features": [{"kind": "numeric", "name": "x", "field": "x"}],
            "online_model": {
                "kind": "logistic_regression" if task == "classification" else "linear_regression"
            },
        }
    )


def _check(spec: PipelineSpec, payload: bytes) -> Label | DeadLetter:
    return validate_label(spec, payload, SRC)


@pytest.mark.parametrize(
    ("payload", "error_class"),
    [
        (b'{"event_id": "a", "label": {"x": 1}}', "wrong_type"),
        (b'{"event_id": "a", "label": [1]}', "wrong_type"),
        (b'{"event_id": "a", "label": null}', "null_not_allowed"),
        (b'{"event_id": "a", "label": "banana"}', "unknown_class"),
        (b'{"event_id": "a", "label": 7}', "unknown_class"),
        (b'{"event_id": "a", "label": 1e308}', "wrong_type"),
        (b'{"event_id": "a", "label": NaN}', "wrong_type"),
        (b'{"event_id": "a", "label": 0.5}', "wrong_type"),
        (b'{"event_id": "a", "label": 100000000000000000000000}', "wrong_type"),
        (b'{"label": true}', "missing_field"),
        (b'{"event_id": "", "label": true}', "missing_field"),
        (b'{"event_id": {"a": 1}, "label": true}', "wrong_type"),
        (b'{"event_id": "a"}', "missing_field"),
        (b'{"event_id": "\\ud800", "label": true}', "invalid_string"),
        (b"not json", "malformed_json"),
        (b"", "malformed_json"),
        (b"[true]", "not_an_object"),
    ],
)
def test_hostile_labels_of_a_binary_task_are_dead_letters(payload: bytes, error_class: str) -> None:
    result = _check(_spec(), payload)
    assert isinstance(result, DeadLetter), result
    assert result.error_class == error_class, result.reason
    assert result.payload == payload and result.source == SRC


@pytest.mark.parametrize(
    ("value", "learned"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("true", True),
        ("False", False),
        ("1", True),
    ],
)
def test_binary_labels_in_any_usual_spelling_are_booleans(value: Any, learned: bool) -> None:
    result = _check(_spec(positive="True"), json.dumps({"event_id": 3, "label": value}).encode())
    assert result == Label("3", learned)


def test_the_label_field_of_the_spec_is_read_first() -> None:
    spec = _spec(field="is_fraud")
    assert _check(spec, b'{"event_id": "e", "is_fraud": false, "label": "x"}') == Label("e", False)
    assert _check(spec, b'{"event_id": "e", "label": true}') == Label("e", True)


def test_a_class_set_admits_its_classes_only() -> None:
    spec = _spec(positive="spam", classes=["spam", "ham", "eggs"])
    assert _check(spec, b'{"event_id": "e", "label": "ham"}') == Label("e", "ham")
    bad = _check(spec, b'{"event_id": "e", "label": "bacon"}')
    assert isinstance(bad, DeadLetter) and bad.error_class == "unknown_class"
    assert "bacon" in bad.reason and "spam" in bad.reason


def test_without_a_class_set_a_non_binary_task_takes_any_scalar_class() -> None:
    spec = _spec(positive="yes")
    assert _check(spec, b'{"event_id": "e", "label": "no"}') == Label("e", "no")
    assert _check(spec, b'{"event_id": "e", "label": 4}') == Label("e", 4)
    assert isinstance(_check(spec, b'{"event_id": "e", "label": [4]}'), DeadLetter)


def test_regression_labels_are_finite_numbers_in_range() -> None:
    spec = _spec("regression", min=0, max=100)
    assert _check(spec, b'{"event_id": "e", "label": 12}') == Label("e", 12.0)
    for payload, error_class in [
        (b'{"event_id": "e", "label": -1}', "out_of_range"),
        (b'{"event_id": "e", "label": 101}', "out_of_range"),
        (b'{"event_id": "e", "label": Infinity}', "not_finite"),
        (b'{"event_id": "e", "label": 1e400}', "not_finite"),
        (b'{"event_id": "e", "label": true}', "wrong_type"),
        (b'{"event_id": "e", "label": "12"}', "wrong_type"),
    ]:
        result = _check(spec, payload)
        assert isinstance(result, DeadLetter) and result.error_class == error_class, payload


@pytest.mark.parametrize(
    ("task", "label", "says"),
    [
        ("classification", {"classes": ["a"]}, "at least 2"),
        ("classification", {"classes": ["a", "a"]}, "repeat"),
        ("classification", {"classes": ["a", "b"], "positive": "c"}, "not one of label.classes"),
        ("classification", {"min": 0}, "for regression"),
        ("regression", {"classes": ["a", "b"]}, "for classification"),
        ("regression", {"min": 5, "max": 1}, "below label.max"),
    ],
)
def test_inconsistent_label_specs_fail_at_start(
    task: str, label: dict[str, Any], says: str
) -> None:
    with pytest.raises(SpecError, match=says):
        _spec(task, **label)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=8,
    )
)
def test_any_json_value_is_a_label_or_a_dead_letter_never_an_exception(value: Any) -> None:
    for spec in (_spec(), _spec(positive="yes"), _spec("regression", max=10)):
        try:
            payload = json.dumps({"event_id": "e", "label": value}).encode()
        except ValueError:
            return
        result = _check(spec, payload)
        assert isinstance(result, Label | DeadLetter)
        if isinstance(result, Label):
            assert label_problem(spec, result.value) is None

"""streamml.sql: values travel apart from the SQL text, and the text-only rendering
escapes them so that no value can end its literal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamml import sql
from streamml.errors import ValidationError
from streamml.streams.warehouse import QueryResult

NASTY = [
    "a'b",
    "a\\",
    "a\\\\'; DROP TABLE predictions; --",
    "x\ny",
    '"q"',
    "{id:String}",
    "ü漢字\t\0\r\x1b`",
    "%(x)s $$h$$ ?",
    "",
]

# every query that takes outside values, with a nasty value in each string argument
BUILDERS: dict[str, Callable[[str], sql.Query | None]] = {
    "training_rows": lambda v: sql.training_rows(v, 1, 2, 3, 4),
    "served_scores": lambda v: sql.served_scores(v, v, [v, "ok", v]),
    "served_errors": lambda v: sql.served_errors(v, 0, 10),
    "judged_predictions": lambda v: sql.judged_predictions(v, [v, "v1"], 0, 10),
    "served_rows": lambda v: sql.served_rows(v, v),
    "alert_metric": lambda v: sql.alert_metric(v, "accuracy", 60),
    "dead_letter_rate": lambda v: sql.alert_metric(v, "dead_letter_rate", 60),
    "p99_latency": lambda v: sql.alert_metric(v, "p99_latency_ms", 60),
    "demo_progress": lambda v: sql.demo_progress(v, v, 0),
    "accuracy_per_minute": lambda v: sql.accuracy_per_minute(v, v),
    "latency_quantiles": lambda v: sql.latency_quantiles(v, v),
    "dead_letter_causes": lambda v: sql.dead_letter_causes(v, 0),
    "audit_trail": lambda v: sql.audit_trail(v, 0),
    "drift_summary": lambda v: sql.drift_summary(v, 0),
    "role_accuracy": lambda v: sql.role_accuracy(v, 0),
    "first_detail_ms": lambda v: sql.first_detail_ms("audit_events", v, v, 0, action=v),
    "first_promotion_ms": lambda v: sql.first_promotion_ms(v, 0, v, v),
    "first_served_after_ms": lambda v: sql.first_served_after_ms(v, v, 0),
    "served_events": lambda v: sql.served_events(v, v),
    "audit_details": lambda v: sql.audit_details(v),
    "weak_training_rows": lambda v: sql.weak_training_rows(v, v, 1, 2, 3),
    "ask_flags": lambda v: sql.ask_flags(v, 0, 1),
    "tickets_progress": lambda v: sql.tickets_progress(v, v, v, 0),
    "tickets_rolling_accuracy": lambda v: sql.tickets_rolling_accuracy(v, v, 10),
    "tickets_labeller_labelled": lambda v: sql.tickets_labeller_labelled(v, 0),
    "tickets_labelled": lambda v: sql.tickets_labelled(v, v, v),
    "tickets_drift": lambda v: sql.tickets_drift(v, 0),
    "tickets_clusters": lambda v: sql.tickets_clusters(v, v, v),
    "tickets_flags": lambda v: sql.tickets_flags(v, v),
    "tickets_summaries": lambda v: sql.tickets_summaries(v, v),
}


def _values(parameters: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for value in parameters.values():
        out += value if isinstance(value, list) else [value]
    return out


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("value", NASTY[:-1])
def test_a_value_is_a_parameter_never_text(name: str, value: str) -> None:
    query = BUILDERS[name](value)
    assert query is not None
    assert value not in query.text  # it travels apart from the SQL
    assert value in _values(query.parameters)


def test_a_placeholder_needs_its_parameter_and_a_parameter_its_placeholder() -> None:
    with pytest.raises(ValueError, match="do not match"):
        sql.Query("SELECT {a:String}")
    with pytest.raises(ValueError, match="do not match"):
        sql.Query("SELECT 1", {"a": "x"})
    with pytest.raises(ValueError, match="identifier"):
        sql.Query("SELECT * FROM {t:Identifier}", {"t": "predictions"})


@pytest.mark.parametrize("name", ["predictions", "_x1", "Metrics"])
def test_plain_identifiers_pass(name: str) -> None:
    assert sql.identifier(name) == name
    assert sql.count_rows(name).text == f"SELECT count() FROM {name}"


@pytest.mark.parametrize("name", ["", "1x", "a b", "t; DROP TABLE x", "a`b", "x" * 200, "db.t"])
def test_anything_else_is_refused_as_an_identifier(name: str) -> None:
    with pytest.raises(ValidationError):
        sql.identifier(name)
    with pytest.raises(ValidationError):
        sql.count_rows(name)


def test_only_the_events_tables_and_plain_columns_are_spliced_in() -> None:
    with pytest.raises(ValidationError):
        sql.first_detail_ms("predictions; --", "k", "p", 0)
    with pytest.raises(ValidationError):
        sql.first_detail_ms("audit_events", "k", "p", 0, **{"action = '' OR 1": "x"})


def test_the_training_window_adds_only_the_bounds_it_has() -> None:
    assert set(sql.training_rows("p").parameters) == {"pipeline"}
    query = sql.training_rows("p", since_ms=5, last_events=7)
    assert query.parameters == {"pipeline": "p", "since_ms": 5, "last_events": 7}
    assert "LIMIT {last_events:UInt64}" in query.text and "until_ms" not in query.text
    counted = sql.count_of(query)
    assert counted.text.startswith("SELECT count() FROM (") and counted.parameters == (
        query.parameters
    )


def test_consumer_lag_is_not_a_warehouse_query() -> None:
    assert sql.alert_metric("p", "consumer_lag", 60) is None
    assert sql.alert_metric("p", "f1", 1.5) == sql.alert_metric("p", "f1", 1.5)
    assert sql.alert_metric("p", "f1", 1.5).parameters["window_ms"] == 1500  # type: ignore[union-attr]


def test_the_index_starts_after_the_prefix_in_bytes() -> None:
    assert sql.served_rows("p", "ü-").parameters["start"] == 4  # substring() counts bytes


def _read_literal(text: str) -> tuple[str, int]:
    """Read a ClickHouse quoted string at the start of ``text`` as the server does
    (a backslash takes the next character as it is): its value and where it ends."""
    assert text[0] == "'"
    out, i = [], 1
    while text[i] != "'":
        if text[i] == "\\":
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out), i + 1


@given(st.text())
def test_a_rendered_string_stays_inside_its_literal(value: str) -> None:
    rendered = sql.Query("SELECT {v:String} AS v", {"v": value}).render()
    assert rendered.startswith("SELECT CAST(")
    literal, end = _read_literal(rendered[len("SELECT CAST(") :])
    assert literal == value
    assert rendered[len("SELECT CAST(") + end :] == " AS String) AS v"


def test_rendering_fills_each_placeholder_once_with_a_typed_literal() -> None:
    query = sql.Query(
        "SELECT {a:String}, {n:UInt64}, {ids:Array(String)}, {a:String}",
        {"a": "{n:UInt64}", "n": 3, "ids": ["x'", "y\\"]},
    )
    assert query.render() == (
        "SELECT CAST('{n:UInt64}' AS String), CAST(3 AS UInt64), "
        "CAST(['x\\'', 'y\\\\'] AS Array(String)), CAST('{n:UInt64}' AS String)"
    )


def test_run_hands_the_text_and_the_parameters_to_the_runner() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    answer = QueryResult(["n"], [(1,)])

    def runner(text: str, parameters: dict[str, Any]) -> QueryResult:
        seen.append((text, parameters))
        return answer

    query = sql.served_events("p", "a\\")
    assert sql.run(runner, query) is answer
    assert seen == [(query.text, {"pipeline": "p", "prefix": "a\\"})]

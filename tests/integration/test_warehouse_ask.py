"""`streamml ask` on real chDB: the ten questions docs/ask.md documents, asked of tables
filled with known rows, give what SQL written here by hand gives; out-of-scope and
write requests are refused and change nothing.

(Named test_warehouse_*: it opens the session's chDB in this process, so it runs after
the modules whose own workers open theirs.)
"""

from __future__ import annotations

import datetime as dt
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from streamml import ask
from streamml.cli import app
from streamml.config import Settings
from streamml.devstack.worker import settings_env
from streamml.models.embeddings import Embedder, load_encoder
from streamml.querysafety import QueryRefused
from streamml.sql import Query
from streamml.streams.rows import (
    AUDIT_COLUMNS,
    DLQ_COLUMNS,
    LABEL_COLUMNS,
    METRIC_COLUMNS,
    PREDICTION_COLUMNS,
)
from streamml.streams.warehouse import Warehouse
from streamml.testing import temporary_warehouse

from .helpers import ROOT

DATABASE = "t_ask"
PIPELINES = ["demo", "phishing"]
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
MIDNIGHT = NOW.replace(hour=0, minute=0, second=0)
SINCE = (NOW - dt.timedelta(days=2)).date()  # replaces the date of documented question 8
H, MIN = dt.timedelta(hours=1), dt.timedelta(minutes=1)


def documented() -> list[tuple[str, str]]:
    table = re.compile(r"^\| (\d+) \| (.+?) \| `(\w+)` \|$", re.M)
    found = [(q, t) for _, q, t in table.findall((ROOT / "docs/ask.md").read_text())]
    assert len(found) == 10
    return [(re.sub(r"\d{4}-\d{2}-\d{2}", SINCE.isoformat(), q), t) for q, t in found]


# --- known rows ------------------------------------------------------------------------------
def _today(fraction: float) -> dt.datetime:
    """A time ``fraction`` of the way from midnight to now (so it is 'today')."""
    return MIDNIGHT + (NOW - MIDNIGHT) * fraction


def _fill(wh: Warehouse) -> None:
    rng = random.Random(8)
    events: list[tuple[str, str, dt.datetime]] = []  # (pipeline, event_id, ts)
    events += [("demo", f"r{i}", NOW - dt.timedelta(seconds=30 + 300 * i)) for i in range(240)]
    events += [("demo", f"b{i}", NOW - dt.timedelta(seconds=10 + 12 * i)) for i in range(60)]
    yesterday = MIDNIGHT - 24 * H
    events += [("demo", f"y{i}", yesterday + (7 + 25 * i) * MIN) for i in range(50)]
    events += [("demo", f"o{i}", NOW - 96 * H - 10 * i * MIN) for i in range(20)]
    events += [("phishing", f"p{i}", NOW - dt.timedelta(seconds=20 + 90 * i)) for i in range(40)]
    predictions: list[tuple[Any, ...]] = []
    labels: list[tuple[Any, ...]] = []
    annotations: list[tuple[Any, ...]] = []
    flags: list[tuple[Any, ...]] = []
    for pipeline, event_id, ts in events:
        truth = rng.random() < 0.4
        for version, role, right in (("v2", "champion", 0.8), ("v3", "shadow", 0.7)):
            said = truth if rng.random() < right else not truth
            latency, e2e = rng.uniform(0.2, 1.0), rng.uniform(3.0, 25.0)
            predictions.append(
                (pipeline, event_id, "u", ts, "m", version, role, int(role == "champion"),
                 0.9 if said else 0.1, str(said).lower(), {}, latency, e2e, "")
            )  # fmt: skip
        if rng.random() < 0.75:
            labels.append((pipeline, event_id, "u", ts + MIN, str(truth).lower(), float(truth)))
        for source, right in (("zero_shot:text", 0.85), ("generative", 0.6)):
            said = truth if rng.random() < right else not truth
            conf = round(rng.uniform(0.5, 1.0), 3)
            annotations.append((pipeline, event_id, ts, source, "minilm", str(said).lower(), conf))
        if rng.random() < 0.05:
            judge = rng.choice(["", "model", "labeller"])
            flags.append((pipeline, event_id, ts, "v2", "true", 0.9, "zero_shot:text", "false",
                          0.95, judge, "qwen" if judge else ""))  # fmt: skip
    wh.insert("predictions", predictions, PREDICTION_COLUMNS)
    wh.insert("labels", labels, LABEL_COLUMNS)
    wh.insert(
        "annotations",
        annotations,
        ["pipeline", "event_id", "ts", "source", "model_version", "label", "confidence"],
    )
    wh.insert(
        "flags",
        flags,
        ["pipeline", "event_id", "ts", "model_version", "predicted_class", "served_confidence",
         "source", "weak_label", "weak_confidence", "judge", "judge_model"],
    )  # fmt: skip
    minute = NOW.replace(second=0)
    metrics = [
        (pipeline, version, role, metric, minute - m * MIN, part, rng.uniform(0.5, 0.95),
         rng.randint(5, 50))
        for pipeline in PIPELINES
        for version, role in (("v2", "champion"), ("v3", "shadow"), ("online-1a2b3c4d", "canary"))
        for metric in ("accuracy", "roc_auc", "f1")
        for m in range(1, 600, 10)
        for part in (0, 1)
    ]  # fmt: skip
    wh.insert("metrics", metrics, METRIC_COLUMNS)
    detections = [("v2", "adwin", "concept", 2), ("v2", "psi", "data", 30),
                  ("v3", "adwin", "concept", 60), ("v2", "ks", "data", 80),
                  ("v2", "adwin", "concept", 120)]  # fmt: skip
    drift = [
        ("demo", version, detector, kind, "error", rng.random(), 0.5, 100, NOW - hours * H,
         f"d{i}", "{}")
        for i, (version, detector, kind, hours) in enumerate(detections)
    ]  # fmt: skip
    drift += [("phishing", "v1", "adwin", "concept", "error", 0.9, 0.5, 100, NOW - H, "x", "{}")]
    wh.insert(
        "drift_events",
        drift,
        ["pipeline", "model_version", "detector", "kind", "target", "statistic", "threshold",
         "window_size", "ts", "drift_id", "details"],
    )  # fmt: skip
    classes = ["missing_field"] * 4 + ["bad_type"] * 3 + ["oversize"] * 2
    dead = [
        ("demo", "demo.raw", 0, i, _today((i + 1) / 12), c, f"{c} #{i}", "{}", "")
        for i, c in enumerate(classes)
    ]
    dead += [
        ("demo", "demo.raw", 1, i, yesterday + i * H, "bad_json", "no", "x", "") for i in range(3)
    ]
    dead += [("phishing", "phishing.raw", 0, 0, _today(0.5), "bad_type", "p", "{}", "")]
    wh.insert("dead_letters", dead, DLQ_COLUMNS)
    alerts = [
        ("demo", "a1", NOW - 5 * H, "accuracy_low", "firing", "accuracy", 0.6, 0.7, "low"),
        ("demo", "a2", NOW - 4 * H, "accuracy_low", "resolved", "accuracy", 0.8, 0.7, "ok"),
        ("demo", "a3", NOW - 3 * H, "latency_p99", "firing", "p99_latency_ms", 80, 50, "slow"),
        ("demo", "a4", NOW - 10 * H, "dlq_rate", "resolved", "dead_letter_rate", 0, 0.1, "ok"),
        ("demo", "a5", NOW - H, "dlq_rate", "firing", "dead_letter_rate", 0.3, 0.1, "bad"),
        ("phishing", "a6", NOW - H, "accuracy_low", "firing", "accuracy", 0.5, 0.7, "low"),
    ]
    wh.insert(
        "alerts",
        alerts,
        ["pipeline", "event_id", "ts", "rule", "state", "metric", "value", "threshold", "message"],
    )
    since = dt.datetime.combine(SINCE, dt.time(), dt.UTC)
    audit = [
        ("demo", "e1", since - 12 * H, "promoted", "v1", "", "first", "trainer", "{}"),
        ("demo", "e2", NOW - 30 * H, "promoted", "v2", "v1", "f1 +0.04", "trainer", "{}"),
        ("demo", "e3", NOW - 26 * H, "rolled_back", "v1", "v2", "below baseline", "alerts", "{}"),
        ("demo", "e4", NOW - 20 * H, "promoted", "v2", "v1", "retrained", "cli", "{}"),
        ("demo", "e5", NOW - 3 * H, "registered", "v3", "", "trained", "trainer", "{}"),
        ("demo", "e6", NOW - 3 * H, "challenger_set", "v3", "v2", "shadow", "trainer", "{}"),
        ("demo", "e7", NOW - 2 * H, "archived", "v1", "", "old", "trainer", "{}"),
        ("demo", "e8", NOW - 2 * H, "drift_detected", "v2", "", "adwin", "engine", "{}"),
        ("phishing", "e9", NOW - H, "promoted", "v5", "v4", "x", "cli", "{}"),
    ]
    wh.insert("audit_events", audit, AUDIT_COLUMNS)


@pytest.fixture(scope="module")
def warehouse(stack_settings: Settings, session_warehouse: Warehouse) -> Iterator[Warehouse]:
    with temporary_warehouse(stack_settings, DATABASE) as wh:
        _fill(wh)
        yield wh


@pytest.fixture(scope="module")
def embedder(stack_settings: Settings) -> Embedder:
    return Embedder(load_encoder(stack_settings.cache_dir, device="cpu"))


# --- the same questions, by hand --------------------------------------------------------------
def at(t: dt.datetime | dt.date) -> str:
    if not isinstance(t, dt.datetime):
        t = dt.datetime.combine(t, dt.time(), dt.UTC)
    return f"toDateTime64('{t:%Y-%m-%d %H:%M:%S}', 3, 'UTC')"


def between(column: str, start: dt.datetime | dt.date, end: dt.datetime = NOW) -> str:
    return f"{column} >= {at(start)} AND {column} < {at(end)}"


BY_HAND: dict[str, str] = {
    "served_accuracy": f"""
        SELECT toStartOfHour(p.ts) AS h, p.model_version AS v, count(),
               round(avg(p.predicted_class = l.label), 4)
        FROM predictions AS p INNER JOIN labels AS l ON p.event_id = l.event_id
        WHERE p.pipeline = 'demo' AND l.pipeline = 'demo' AND p.served = 1
        AND {between("p.ts", NOW - 24 * H)} GROUP BY h, v ORDER BY h, v""",
    "drift_events": f"""
        SELECT ts, model_version, kind, detector, target, round(statistic, 4),
               round(threshold, 4)
        FROM drift_events WHERE pipeline = 'demo' AND {between("ts", NOW - 72 * H)}
        ORDER BY ts DESC""",
    "dead_letters": f"""
        SELECT error_class, count() AS n, min(ts), max(ts), argMin(reason, ts)
        FROM dead_letters WHERE pipeline = 'demo' AND {between("ts", MIDNIGHT)}
        GROUP BY error_class ORDER BY n DESC, error_class""",
    "champion_vs_challengers": f"""
        SELECT model_version, role,
               round(sum(if(metric = 'accuracy', value * n, 0))
                     / sum(if(metric = 'accuracy', n, 0)), 4),
               round(sum(if(metric = 'roc_auc', value * n, 0))
                     / sum(if(metric = 'roc_auc', n, 0)), 4),
               sum(if(metric = 'accuracy', n, 0)), min(window_start), max(window_start)
        FROM metrics WHERE pipeline = 'demo' AND {between("window_start", NOW - 6 * H)}
        GROUP BY model_version, role ORDER BY role != 'champion', model_version, role""",
    "latency": f"""
        SELECT model_version, role, count(),
               arrayMap(x -> round(x, 3), quantiles(0.5, 0.95, 0.99)(latency_ms)),
               arrayMap(x -> round(x, 3), quantiles(0.5, 0.95, 0.99)(e2e_latency_ms))
        FROM predictions WHERE pipeline = 'demo' AND {between("ts", NOW - H)}
        GROUP BY model_version, role ORDER BY model_version, role""",
    "volume": f"""
        SELECT toStartOfMinute(ts) AS m, sum(served), count() FROM predictions
        WHERE pipeline = 'demo' AND {between("ts", NOW - 15 * MIN)} GROUP BY m ORDER BY m""",
    "alerts_firing": """
        SELECT rule, metric, ts, value, threshold, message FROM alerts
        WHERE pipeline = 'demo' AND state = 'firing' AND (rule, ts) IN
              (SELECT rule, max(ts) FROM alerts WHERE pipeline = 'demo' GROUP BY rule)
        ORDER BY ts DESC, rule""",
    "model_changes": f"""
        SELECT ts, action, version, previous, reason, actor FROM audit_events
        WHERE pipeline = 'demo' AND {between("ts", SINCE)}
        AND action IN ('promoted', 'rolled_back', 'challenger_set', 'archived')
        ORDER BY ts DESC, action""",
    "label_coverage": f"""
        SELECT count() AS answered, countIf(l.event_id != '') AS labelled,
               round(labelled / answered, 4)
        FROM (SELECT DISTINCT event_id FROM predictions WHERE pipeline = 'demo'
              AND served = 1 AND {between("ts", MIDNIGHT - 24 * H, MIDNIGHT)}) AS p
        LEFT JOIN (SELECT DISTINCT event_id FROM labels WHERE pipeline = 'demo') AS l
        ON p.event_id = l.event_id""",
    "weak_label_accuracy": f"""
        SELECT a.source, count(), countIf(l.label != '') AS known,
               round(countIf(l.label != '' AND a.label = l.label) / known, 4),
               round(avg(a.confidence), 4)
        FROM annotations AS a
        LEFT JOIN (SELECT event_id, label FROM labels WHERE pipeline = 'demo') AS l
        ON a.event_id = l.event_id
        WHERE a.pipeline = 'demo' AND {between("a.ts", NOW - 24 * H)}
        GROUP BY a.source ORDER BY a.source""",
}


def _plain(value: Any, approx: bool) -> Any:
    if isinstance(value, dt.datetime):  # aware or naive UTC, DateTime or DateTime64
        return value.replace(tzinfo=None)
    if isinstance(value, float) and approx:
        return pytest.approx(value, abs=1e-9)
    return value


def _rows(rows: list[tuple[Any, ...]], approx: bool = False) -> list[list[Any]]:
    flat = []
    for row in rows:
        cells: list[Any] = []
        for v in row:  # an array of quantiles by hand: the template has a column each
            cells.extend(v if isinstance(v, list) else [v])
        flat.append([_plain(v, approx) for v in cells])
    return flat


def test_the_documented_questions_give_what_hand_written_sql_gives(
    warehouse: Warehouse, embedder: Embedder
) -> None:
    answered = []
    for question, template in documented():
        plan = ask.plan(question, embedder, PIPELINES, NOW, pipeline="demo")
        assert isinstance(plan, ask.Plan), (question, plan)
        assert plan.template.id == template, question
        got = ask.run_read_only(warehouse.query, plan.query)
        assert got.rows, (template, "the data should give every question an answer")
        expected = warehouse.query(BY_HAND[template]).rows
        assert _rows(got.rows) == _rows(expected, approx=True), template
        # the worker's /query takes text only: the values written in give the same rows
        rendered = ask.run_read_only(warehouse.query, Query(plan.query.render()))
        assert rendered.rows == got.rows, template
        answered.append(template)
    assert len(answered) == 10


def test_a_question_about_one_version_answers_for_that_version(
    warehouse: Warehouse, embedder: Embedder
) -> None:
    plan = ask.plan("hourly accuracy of v3 in the last 24 hours", embedder, ["demo"], NOW)
    assert isinstance(plan, ask.Plan) and plan.template.id == "served_accuracy"
    rows = ask.run_read_only(warehouse.query, plan.query).rows
    assert rows == []  # v3 only shadowed: it served nothing
    plan = ask.plan("latency of v3 over the last hour", embedder, ["demo"], NOW)
    assert isinstance(plan, ask.Plan)
    versions = {row[0] for row in ask.run_read_only(warehouse.query, plan.query).rows}
    assert versions == {"v3"}


@pytest.mark.parametrize(
    "question",
    ["what's the weather", "delete all predictions", "drop table labels",
     "show me the users' emails", "truncate the metrics"],
)  # fmt: skip
def test_out_of_scope_and_writes_are_refused(
    warehouse: Warehouse, embedder: Embedder, question: str
) -> None:
    before = warehouse.query("SELECT count() FROM predictions").rows
    assert isinstance(ask.plan(question, embedder, PIPELINES, NOW, pipeline="demo"), ask.Refusal)
    assert warehouse.query("SELECT count() FROM predictions").rows == before


def test_only_reads_run(warehouse: Warehouse) -> None:
    # (A write is never sent under readonly here: on chDB a refused one leaves the
    # process's session read-only, so the gate must refuse it before it runs.)
    for write in ("DROP TABLE labels", "INSERT INTO labels (pipeline) VALUES ('x')"):
        with pytest.raises(QueryRefused):
            ask.run_read_only(warehouse.query, Query(write))
    assert "labels" in warehouse.tables()
    assert warehouse.query("SELECT count() FROM labels WHERE pipeline = 'x'").rows == [(0,)]


def _cli(settings: Settings, *args: str) -> Any:
    scoped = settings.model_copy(
        update={"clickhouse_database": DATABASE, "pipelines_dir": ROOT / "pipelines"}
    )
    return CliRunner().invoke(app, ["ask", *args], env=settings_env(scoped))


def test_the_command_prints_the_sql_and_answers(
    warehouse: Warehouse, stack_settings: Settings
) -> None:
    result = _cli(stack_settings, "Which alerts are firing right now?", "-p", "demo", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["template"] == "alerts_firing"
    assert answer["parameters"] == {"pipeline": "demo"}
    assert [row["rule"] for row in answer["rows"]] == ["dlq_rate", "latency_p99"]
    text = _cli(stack_settings, "dead letters by error class today", "-p", "demo")
    assert text.exit_code == 0, text.output
    assert "FROM dead_letters FINAL" in text.stdout and "-- pipeline = 'demo'" in text.stdout
    assert "missing_field" in text.stdout and "3 row(s)" in text.stdout
    unknown = _cli(stack_settings, "latency of v9 in the last hour", "-p", "demo")
    assert unknown.exit_code == 1 and "no model version 'v9'" in unknown.stderr
    assert "v2" in unknown.stderr  # the known ones are listed
    assert warehouse.query("SELECT count() FROM alerts").rows == [(6,)]  # still open here

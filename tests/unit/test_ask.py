"""`streamml ask`'s pure core: time ranges, parameters, refusals, and matching with the
real MiniLM encoder (offline from the installed weights; the first load exports int8
ONNX to the cache dir once)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from typer.testing import CliRunner

from streamml import ask
from streamml.ask import CATALOGUE, Args, Plan, Refusal, Window
from streamml.cli import app
from streamml.config import Settings
from streamml.models.embeddings import Embedder, load_encoder
from streamml.querysafety import QueryRefused
from streamml.sql import Query
from streamml.streams.warehouse import QueryResult

NOW = dt.datetime(2026, 12, 1, 12, 30, tzinfo=dt.UTC)
ROOT = Path(__file__).resolve().parents[2]
PIPELINES = ["demo", "phishing"]


def documented() -> list[tuple[str, str]]:
    """The (question, template) pairs docs/ask.md documents."""
    table = re.compile(r"^\| (\d+) \| (.+?) \| `(\w+)` \|$", re.M)
    found = [(q, t) for _, q, t in table.findall((ROOT / "docs/ask.md").read_text())]
    assert len(found) == 10
    return found


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(load_encoder(Settings().cache_dir, device="cpu"))


# --- time ranges ---------------------------------------------------------------------------
H = dt.timedelta(hours=1)
MIDNIGHT = NOW.replace(hour=0, minute=0)


@pytest.mark.parametrize(
    ("text", "start", "end", "label"),
    [
        ("accuracy in the last hour", NOW - H, NOW, "last hour"),
        ("over the last 24 hours", NOW - 24 * H, NOW, "last 24 hours"),
        ("drift in the past 3 days", NOW - 72 * H, NOW, "last 3 days"),
        ("p99 in the last 15 minutes", NOW - H / 4, NOW, "last 15 minutes"),
        ("volume for the last 24h", NOW - 24 * H, NOW, "last 24 hours"),
        ("alerts of the past two weeks", NOW - 336 * H, NOW, "last 2 weeks"),
        ("last 90 min", NOW - 1.5 * H, NOW, "last 90 minutes"),
        ("dead letters today", MIDNIGHT, NOW, "today"),
        ("what share of yesterday's predictions", MIDNIGHT - 24 * H, MIDNIGHT, "yesterday"),
        ("promotions this week", MIDNIGHT - 24 * H, NOW, "this week"),  # a Tuesday
        ("since 2026-11-30", dt.datetime(2026, 11, 30, tzinfo=dt.UTC), NOW, "since 2026-11-30"),
        (
            "since 2026-11-30 14:05",
            dt.datetime(2026, 11, 30, 14, 5, tzinfo=dt.UTC),
            NOW,
            "since 2026-11-30",
        ),
        (
            "on 2026-11-20",
            dt.datetime(2026, 11, 20, tzinfo=dt.UTC),
            dt.datetime(2026, 11, 21, tzinfo=dt.UTC),
            "on 2026-11-20",
        ),
        (
            "between 2026-11-01 and 2026-11-03",
            dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
            dt.datetime(2026, 11, 3, tzinfo=dt.UTC),
            "between 2026-11-01 and 2026-11-03",
        ),
    ],
)
def test_time_ranges(text: str, start: dt.datetime, end: dt.datetime, label: str) -> None:
    window = ask.parse_time_range(text, NOW)
    assert window == Window(start, end, label)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("since 2026-02-30", "is not a date"),
        ("between 2026-11-05 and 2026-13-01", "is not a date"),
        ("since 2027-01-01", "starts after it ends"),
        ("between 2026-11-05 and 2026-11-01", "starts after it ends"),
        ("the last 0 hours", "not a range"),
        ("the last 999999 weeks", "not a range"),
    ],
)
def test_impossible_ranges_are_refused_as_values(text: str, why: str) -> None:
    found = ask.parse_time_range(text, NOW)
    assert isinstance(found, Refusal) and why in found.reason


@pytest.mark.parametrize("text", ["which alerts are firing", "top 5 drift events", "v3 latency"])
def test_no_time_phrase_is_none(text: str) -> None:
    assert ask.parse_time_range(text, NOW) is None


# --- parameters ----------------------------------------------------------------------------
def _plan(
    question: str, template: str, pipelines: Sequence[str] = PIPELINES, pipeline: str | None = None
) -> Plan:
    made = ask.extract_params(question, CATALOGUE[template], pipelines, NOW, pipeline)
    assert isinstance(made, Plan), made
    return made


def _refused(
    question: str, template: str, pipelines: Sequence[str] = PIPELINES, pipeline: str | None = None
) -> str:
    made = ask.extract_params(question, CATALOGUE[template], pipelines, NOW, pipeline)
    assert isinstance(made, Refusal), made
    return made.reason


def test_pipeline_named_given_or_the_only_one() -> None:
    assert _plan("drift on phishing", "drift_events").query.parameters["pipeline"] == "phishing"
    assert _plan("drift", "drift_events", pipeline="demo").query.parameters["pipeline"] == "demo"
    assert _plan("drift", "drift_events", ["demo"]).query.parameters["pipeline"] == "demo"
    assert "there are 2: demo, phishing" in _refused("drift events", "drift_events")
    assert "no pipeline named 'fraud'" in _refused("drift", "drift_events", pipeline="fraud")
    assert "names phishing but --pipeline is demo" in _refused(
        "drift on phishing", "drift_events", pipeline="demo"
    )
    assert "several pipelines" in _refused("drift on demo and phishing", "drift_events")
    assert "no pipeline specs" in _refused("drift", "drift_events", [])


def test_default_range_is_the_last_24_hours_and_untimed_templates_say_so() -> None:
    plan = _plan("drift events", "drift_events", ["demo"])
    assert plan.window == Window(NOW - 24 * H, NOW, "last 24 hours")
    params = plan.query.parameters
    assert (params["start_ms"], params["end_ms"]) == plan.window.ms()
    firing = _plan("alerts firing in the last hour", "alerts_firing", ["demo"])
    assert firing.window is None and "start_ms" not in firing.query.parameters
    assert any("time range is not used" in note for note in firing.notes)


def test_model_version_is_read_and_checked() -> None:
    assert _plan("latency of v12", "latency", ["demo"]).query.parameters["version"] == "v12"
    online = _plan("accuracy of online-1a2b3c4d", "served_accuracy", ["demo"])
    assert online.query.parameters["version"] == "online-1a2b3c4d"
    assert _plan("latency", "latency", ["demo"]).query.parameters["version"] == ""
    assert "at most one model version" in _refused("v2 against v3", "latency", ["demo"])
    covered = _plan("dead letters of v3", "dead_letters", ["demo"])
    assert "version" not in covered.query.parameters
    assert any("version v3 is not used" in note for note in covered.notes)
    query = _plan("latency of v12", "latency", ["demo"]).query
    assert ask.check_version(query, ["v12", "v13"]) is None
    unknown = ask.check_version(query, ["v1"])
    assert unknown is not None and "no model version 'v12'" in unknown.reason


def test_limit_and_bucket() -> None:
    assert _plan("top 5 drift events", "drift_events", ["demo"]).query.parameters["limit"] == 5
    assert _plan("10 most recent alerts", "alert_history", ["demo"]).query.parameters["limit"] == 10
    last = _plan("drift in the last 15 minutes", "drift_events", ["demo"])
    assert last.query.parameters["limit"] == 50  # a range, not a limit
    assert "1 to 1000" in _refused("top 5000 drift events", "drift_events", ["demo"])

    def bucket(question: str) -> int:
        return int(_plan(question, "volume", ["demo"]).query.parameters["bucket_s"])

    assert bucket("predictions per minute today") == 60
    assert bucket("hourly volume in the last 15 minutes") == 3600
    assert bucket("daily predictions") == 86400
    assert bucket("volume in the last hour") == 60
    assert bucket("volume") == 3600
    assert bucket("volume in the past two weeks") == 86400


def test_every_template_builds_and_takes_values_only_as_parameters() -> None:
    assert 12 <= len(CATALOGUE) <= 16
    nasty = "x'; DROP TABLE labels; --"
    for template in CATALOGUE.values():
        assert len(template.examples) >= 4, template.id
        plain = template.build(Args("demo", 1, 2, "v1", 5, 60))
        hostile = template.build(Args(nasty, 3, 4, nasty, 7, 3600))
        assert plain.text == hostile.text, template.id  # values never reach the text
        assert nasty not in hostile.text
        assert set(hostile.parameters) >= {"pipeline"}
        assert hostile.text.lstrip().startswith("SELECT"), template.id


# --- refusals before matching --------------------------------------------------------------
@pytest.mark.parametrize(
    "question",
    [
        "delete all predictions",
        "please delete the dead letters from yesterday",
        "drop table labels",
        "DROP DATABASE streamml",
        "truncate the metrics",
        "insert into labels values ('e1', 'true')",
        "update labels set label = 'true'",
        "remove the drift events",
        "promote v3 to champion",
        "roll back to v2",
        "can you reset the alerts",
        "alter table predictions add column x",
        "label these events as fraud",
        "change the alert threshold to 0.9",
    ],
)
def test_write_requests_are_refused(question: str) -> None:
    found = ask.refusal(question)
    assert found is not None and "change data" in found.reason


@pytest.mark.parametrize(
    "question",
    ["predict whether this is fraud", "score this transaction", "train a new model",
     "summarise the text of event 7", "run the trainer"],
)  # fmt: skip
def test_requests_to_do_something_are_refused(question: str) -> None:
    found = ask.refusal(question)
    assert found is not None and "to do something" in found.reason


@pytest.mark.parametrize(
    "question",
    ["show me the users' emails", "what are the passwords", "list the api keys"],
)
def test_personal_data_and_secrets_are_refused(question: str) -> None:
    found = ask.refusal(question)
    assert found is not None and "personal data" in found.reason


@pytest.mark.parametrize(
    "question",
    [
        "did accuracy drop after the last promotion?",
        "how many records were dropped as dead letters",
        "when was v3 promoted",
        "show the rollbacks",
        "which alerts are firing",
        "label coverage yesterday",
        "drop in accuracy since v3",
        "score distribution of v2",
        "change in latency this week",
        "training rows of the last retrain",
    ],
)
def test_reads_are_not_refused_for_their_words(question: str) -> None:
    assert ask.refusal(question) is None


# --- matching (real encoder) ---------------------------------------------------------------
def test_documented_questions_match_their_template(embedder: Embedder) -> None:
    for question, template in documented():
        found = ask.plan(question, embedder, PIPELINES, NOW, pipeline="demo")
        assert isinstance(found, Plan), (question, found)
        assert found.template.id == template, question
        assert found.score >= ask.THRESHOLD + 0.1, (question, found.score)


@pytest.mark.parametrize(
    ("question", "template"),
    [
        ("accuracy per hour for the champion", "served_accuracy"),
        ("any feature drift in the last 2 days?", "drift_events"),
        ("what kinds of errors put records in the dead letter topic", "dead_letters"),
        ("how is the canary doing against the champion", "champion_vs_challengers"),
        ("median and tail latency for each model version", "latency"),
        ("how busy was the pipeline today", "volume"),
        ("current firing alert rules", "alerts_firing"),
        ("alerts resolved yesterday", "alert_history"),
        ("who promoted v4", "model_changes"),
        ("what percentage of predictions received ground truth labels", "label_coverage"),
        ("how reliable is the zero-shot labeller", "weak_label_accuracy"),
        ("judge verdicts on flagged events", "flags"),
        ("predicted class counts", "class_mix"),
        ("how many false positives and false negatives", "confusion"),
        ("which models are in the registry", "model_versions"),
    ],
)
def test_paraphrases_match(embedder: Embedder, question: str, template: str) -> None:
    found = ask.plan(question, embedder, ["demo"], NOW)
    assert isinstance(found, Plan), found
    assert found.template.id == template


@pytest.mark.parametrize(
    "question",
    [
        "what's the weather",
        "what's the weather in Paris tomorrow",
        "who won the football match",
        "what is the capital of France",
        "show me revenue per hour",
        "how many users signed up yesterday",
        "list the kafka topics",
        "delete all predictions",
        "drop table labels",
        "show me the users' emails",
        "predict whether this transaction is fraud",
        "summarise the text of event 7",
    ],
)
def test_out_of_scope_is_refused_with_what_ask_can_answer(
    embedder: Embedder, question: str
) -> None:
    found = ask.plan(question, embedder, ["demo"], NOW)
    assert isinstance(found, Refusal), (question, found)
    if "close enough" in found.reason:
        assert "streamml query" in found.hint and "recent drift events" in found.hint


class Table:
    """An encoder of fixed vectors per text (unknown texts: the zero vector)."""

    dim, device = 3, "cpu"

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return np.asarray([self.vectors.get(t, [0, 0, 0]) for t in texts], dtype=np.float32)


def test_a_near_tie_over_different_tables_is_refused() -> None:
    pair = {k: CATALOGUE[k] for k in ("drift_events", "dead_letters")}
    vectors = {t: [1.0, 0.0, 0.0] for t in (pair["drift_events"].description,)}
    vectors[pair["dead_letters"].description] = [0.0, 1.0, 0.0]
    vectors["both"] = [0.7071, 0.7071, 0.0]
    vectors["drifty"] = [0.9, 0.4359, 0.0]
    embedder = Embedder(Table(vectors))
    tie = ask.match("both", pair, embedder)
    assert isinstance(tie, Refusal) and "about as well" in tie.reason
    clear = ask.match("drifty", pair, embedder)
    assert isinstance(clear, ask.Match) and clear.template.id == "drift_events"
    assert clear.margin == pytest.approx(0.9 - 0.4359, abs=1e-3)


# --- read-only --------------------------------------------------------------------------------
def test_run_read_only_parses_first_and_runs_under_readonly() -> None:
    calls: list[tuple[str, int]] = []

    def fake(sql: str, parameters: dict[str, object], *, readonly: int = 0) -> QueryResult:
        calls.append((sql, readonly))
        if sql.startswith("EXPLAIN AST DROP"):
            return QueryResult(["explain"], [("DropQuery  labels",)])
        if sql.startswith("EXPLAIN AST"):
            return QueryResult(["explain"], [("SelectWithUnionQuery",), (" SelectQuery",)])
        return QueryResult(["x"], [(1,)])

    assert ask.run_read_only(fake, Query("SELECT 1")).rows == [(1,)]
    assert calls == [("EXPLAIN AST SELECT 1", 1), ("SELECT 1", 1)]
    with pytest.raises(QueryRefused):
        ask.run_read_only(fake, Query("DROP TABLE labels"))
    assert calls[-1][0].startswith("EXPLAIN")  # the drop itself never ran


def test_cli_refuses_a_write_request_without_touching_the_warehouse(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["ask", "delete all predictions"], env={"STREAMML_STATE_DIR": str(tmp_path)}
    )
    assert result.exit_code == 1
    assert "change data" in result.stderr and "ask only reads" in result.stderr
    assert not (tmp_path / "chdb").exists()

"""Event ids are the producers' to choose: ids with quotes, backslashes, newlines, braces
and SQL go through produce, the sink, `streamml train` (training rows, the champion's
served answers, evaluation) and the trainer's judgement, and every table is still there.

Through a live worker the queries reach chDB over its /query endpoint (values written in
as escaped literals); with the worker stopped, and in this process, they are bound
server-side. (Named test_warehouse_*: in-process chDB runs after the other modules.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamml import lifecycle, sql
from streamml.agents import judge
from streamml.config import Settings
from streamml.devstack.worker import WorkerProcess, settings_env
from streamml.models.serving import online_version
from streamml.models.synthetic import Example, payments
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.spec import PipelineSpec
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import produce_examples
from streamml.streams.rows import LABEL_COLUMNS, PREDICTION_COLUMNS
from streamml.streams.warehouse import QueryResult, Warehouse, run_query
from streamml.testing import temporary_warehouse

from .helpers import ROOT, pipeline_dir, run_cli, wait_until, worker_settings

NAME = "sqlinj"
NASTY = [
    "a'b",
    "a\\",
    "a\\\\'; DROP TABLE predictions; --",
    "x\ny",
    '"q"',
    "{id:String}",
    "ü漢字 ✓\t`",
    "%(x)s $$h$$ ?",
    "') OR 1=1 --",
]
TABLES = {"features", "labels", "predictions", "dead_letters", "audit_events", "metrics"}
FIRST, SECOND = 600, 300


def _small_batch_model(spec: dict[str, Any]) -> None:
    batch = spec["batch_model"]
    batch.pop("search")
    batch.update(epochs=5, cv_folds=2)
    spec["promotion"]["min_labeled_events"] = 50
    if "retrain" in spec:
        spec["retrain"]["on_drift"] = False


def _nasty(examples: Iterable[Example], tag: str) -> tuple[list[Example], list[str]]:
    """The examples with hostile event ids: the bare ones first, then each behind a
    number (so ``<n>-a\\`` still ends in a backslash)."""
    out, ids = [], []
    for i, example in enumerate(examples):
        assert isinstance(example.record, dict)
        bare = tag == "" and i < len(NASTY)
        ids.append(NASTY[i] if bare else f"{tag}{i}-{NASTY[i % len(NASTY)]}")
        out.append(Example(example.key, {**example.record, "event_id": ids[-1]}, example.label))
    return out, ids


def _ask(worker: WorkerProcess, query: sql.Query) -> list[list[Any]]:
    return worker.query(query.render())[1]


def _count(worker: WorkerProcess, table: str, ids: list[str], where: str = "1") -> int:
    query = sql.Query(
        f"SELECT uniqExact(event_id) FROM {sql.identifier(table)} WHERE pipeline = "
        f"{{p:String}} AND event_id IN {{ids:Array(String)}} AND {where}",
        {"p": NAME, "ids": ids},
    )
    return int(_ask(worker, query)[0][0])


def _wait_count(worker: WorkerProcess, table: str, ids: list[str], where: str = "1") -> None:
    try:
        wait_until(lambda: _count(worker, table, ids, where) >= len(ids), f"{table}", 120)
    except AssertionError as exc:
        got = _count(worker, table, ids, where)
        raise AssertionError(f"{exc}: {got} of {len(ids)}\n{worker.log_tail()}") from None


def _tables(worker: WorkerProcess) -> set[str]:
    return {str(r[0]) for r in worker.query("SHOW TABLES")[1]}


def _train(settings: Settings, *args: str) -> str:
    result = run_cli("train", NAME, *args, env=settings_env(settings), timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_hostile_event_ids_go_through_produce_train_evaluation_and_judgement(
    stack_settings: Settings, tmp_path: Path
) -> None:
    pipelines = pipeline_dir(tmp_path, "demo", NAME, _small_batch_model)
    settings = worker_settings(stack_settings, tmp_path, pipelines, "sqlinj_app").model_copy(
        update={
            "registry_dir": tmp_path / "registry",
            "reports_dir": tmp_path / "reports",
            "trainer_enabled": False,  # the test runs the judgement itself
        }
    )
    [spec] = load_pipelines(pipelines, [NAME])
    asyncio.run(ensure_pipeline_topics(settings, [spec]))
    first, ids = _nasty(payments(FIRST, seed=5, drift_at=2.0), "")
    second, later = _nasty(payments(SECOND, seed=6, drift_at=2.0), "b")
    online = online_version(spec)

    def through_worker(text: str, parameters: dict[str, Any]) -> QueryResult:
        return run_query(settings, text, parameters)

    worker = WorkerProcess(settings, [NAME], tmp_path / "worker.log")
    worker.start()
    try:
        assert asyncio.run(produce_examples(settings, spec, first, label_delay=20)).delivered
        for table in ("features", "labels"):
            _wait_count(worker, table, ids)
        _wait_count(worker, "predictions", ids, "served = 1")
        # stored as produced, each one
        stored = _ask(
            worker,
            sql.Query(
                "SELECT DISTINCT event_id FROM predictions WHERE pipeline = {p:String}",
                {"p": NAME},
            ),
        )
        assert {r[0] for r in stored} == set(ids)

        # training, the online champion's served answers on the test split, evaluation
        out = _train(settings, "--no-deploy")
        assert "ONNX parity" in out and "report:" in out, out
        report = json.loads((settings.reports_path / NAME / "v1" / "report.json").read_text())
        assert report["metrics"]
        frame = lifecycle.read_training_rows(settings, spec, lifecycle.Window(), through_worker)
        assert set(frame["event_id"]) == set(ids)

        # v1 shadows new hostile events, then the trainer's judgement compares it
        lifecycle.set_challenger(settings, spec, "v1", "shadow", None, reason="sql test")
        wait_until(
            lambda: any(
                c["version"] == "v1"
                for c in worker.get("/stats")["pipelines"][NAME]["deployment"]["challengers"]
            ),
            "the worker to shadow v1",
        )
        assert asyncio.run(produce_examples(settings, spec, second, label_delay=20)).delivered
        _wait_count(worker, "labels", later)
        _wait_count(worker, "predictions", later, "model_version = 'v1'")
        found = judge.confirm_change(spec, through_worker, 0, 4000)
        assert f"{FIRST + SECOND}" in found.reason, found.reason
        review = judge.review(spec, through_worker, online, ["v1"], 0, 4000)
        assert review.events == SECOND, review.summary
        assert "v1" in review.verdicts
        assert _tables(worker) >= TABLES
    finally:
        worker.stop()

    # the worker stopped: the CLI opens chDB itself and binds the values server-side
    _train(settings, "--no-deploy")
    result = run_cli("query", "SHOW TABLES", "-f", "json", env=settings_env(settings))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {row["name"] for row in json.loads(result.stdout)} >= TABLES


# --- in this process: server-side binding on the embedded chDB ----------------------------
T0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
N = 400


@pytest.fixture
def warehouse(stack_settings: Settings, session_warehouse: Warehouse) -> Iterator[Warehouse]:
    with temporary_warehouse(stack_settings, "t_sqlinj") as wh:
        yield wh


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    [found] = load_pipelines(ROOT / "pipelines", ["demo"])
    return found


def test_values_bound_server_side_or_written_in_come_back_as_they_went(
    warehouse: Warehouse,
) -> None:
    values = [*NASTY, "\0\r\x1b\x7f", "", "'" * 5, "\\" * 5]
    for value in values:
        query = sql.Query("SELECT {v:String}, {vs:Array(String)}", {"v": value, "vs": values})
        assert sql.run(warehouse.query, query).rows == [(value, values)]
        assert warehouse.query(query.render()).rows == [(value, values)]


def test_the_judgement_on_hostile_ids_bound_server_side(
    warehouse: Warehouse, spec: PipelineSpec
) -> None:
    predictions: list[tuple[Any, ...]] = []
    labels: list[tuple[Any, ...]] = []
    for i in range(N):
        event_id = f"{i}-{NASTY[i % len(NASTY)]}"
        ts = T0 + dt.timedelta(seconds=i)
        truth = i % 3 == 0
        labels.append(("demo", event_id, "u", ts, str(truth), float(truth)))
        for version, right in (("v1", i % 4 != 0), ("v'2\\", i % 5 != 0)):
            said, role = truth if right else not truth, "champion" if version == "v1" else "shadow"
            score = 0.9 if said else 0.1
            row = ("demo", event_id, "u", ts, "m", version, role, int(version == "v1"), score)
            predictions.append((*row, str(said), {}, 0.1, 1.0, ""))
    warehouse.insert("predictions", predictions, PREDICTION_COLUMNS)
    warehouse.insert("labels", labels, LABEL_COLUMNS)

    found = judge.confirm_change(spec, warehouse.query, 0, 4000)
    assert f"of {N}" in found.reason or f"{N} labelled" in found.reason, found.reason
    review = judge.review(spec, warehouse.query, "v1", ["v'2\\"], 0, 4000)
    assert review.events == N and "v'2\\" in review.verdicts, review.summary
    scored = sql.run(
        warehouse.query, sql.served_scores("demo", "v1", [f"{i}-a\\" for i in (1, 10)])
    )
    assert sorted(r[0] for r in scored.rows) == ["1-a\\", "10-a\\"]
    assert {"predictions", "labels"} <= set(warehouse.tables())
    assert sql.run(warehouse.query, sql.count_rows("predictions")).rows == [(2 * N,)]

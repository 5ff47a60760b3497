"""A backfill whose events span thirty years goes through a live worker into ClickHouse:
every event's features, served prediction and label arrive, though one batch spans far
more monthly partitions than ClickHouse takes in one insert block."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path
from typing import Any

from streamml.config import Settings
from streamml.devstack.worker import WorkerProcess
from streamml.models.synthetic import Example
from streamml.schemas.spec import load_spec
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import produce_examples

from .helpers import pipeline_dir, scalar, wait_for, worker_settings

NAME = "backfill"
EVENTS = 1500
START = dt.datetime(1995, 1, 1, tzinfo=dt.UTC)
SPAN_S = 30 * 365.25 * 86400


def _edit(spec: dict[str, Any]) -> None:
    spec.pop("batch_model")
    spec["serving"] = {"champion": "online", "challenger": "none"}
    spec["retrain"]["on_drift"] = False


def _events() -> list[Example]:
    rng = random.Random(5)
    examples = []
    for i in range(EVENTS):
        ts = START + dt.timedelta(seconds=i * SPAN_S / EVENTS)
        user = f"u{rng.randrange(40)}"
        record = {
            "event_id": f"bf-{i}",
            "ts": ts.isoformat(),
            "user_id": user,
            "amount": round(rng.uniform(1, 300), 2),
            "items": rng.randint(1, 9),
            "merchant": rng.choice(["m1", "m2"]),
            "country": rng.choice(["US", "DE"]),
            "device": None,
            "risk": rng.random(),
        }
        examples.append(Example(user, record, rng.random() < 0.3))
    return examples


def test_a_backfill_spanning_thirty_years_reaches_clickhouse(
    stack_settings: Settings, tmp_path: Path
) -> None:
    pipelines = pipeline_dir(tmp_path, "demo", NAME, _edit)
    settings = worker_settings(stack_settings, tmp_path, pipelines, "backfill_app")
    asyncio.run(ensure_pipeline_topics(settings, [load_spec(pipelines / f"{NAME}.yaml")]))
    worker = WorkerProcess(settings, [NAME], tmp_path / "worker.log")
    worker.start()
    try:
        spec = load_spec(pipelines / f"{NAME}.yaml")
        asyncio.run(produce_examples(settings, spec, _events()))
        where = f"WHERE pipeline = '{NAME}'"
        wait_for(worker, f"SELECT uniqExact(event_id) FROM predictions {where}", EVENTS)
        wait_for(worker, f"SELECT uniqExact(event_id) FROM features {where}", EVENTS)
        wait_for(worker, f"SELECT uniqExact(event_id) FROM labels {where}", EVENTS)
        years = scalar(
            worker,
            f"SELECT dateDiff('year', min(ts), max(ts)) FROM predictions {where}",
        )
        assert years >= 29
        months = scalar(worker, f"SELECT uniqExact(toYYYYMM(ts)) FROM features {where}")
        assert months > 300  # three times what one insert block may span
        assert scalar(worker, f"SELECT count() FROM dead_letters {where}") == 0
        sink = worker.get("/health")["sink"]
        assert sink["status"] == "ok", sink
    finally:
        worker.stop()

"""Fields marked pii never leave a live worker in clear: a planted value, produced as the
entity key (``pii: hash``) of valid records and inside records that become dead letters
(one with a bad choice on a ``pii: redact`` field, one not even JSON), appears in no topic
the worker writes (keys, values, headers), no ClickHouse table and not in the worker's
log; and it is not lost: those events are served, under the hashed entity key."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import SecretStr

from streamml.config import Settings
from streamml.devstack.worker import WorkerProcess
from streamml.schemas.pii import REDACTED, Protector
from streamml.schemas.spec import load_spec
from streamml.secrets import pii_key
from streamml.streams.kafka import client_options, close_quietly, ensure_pipeline_topics, produce
from streamml.streams.topics import CONTROL_TOPIC, pipeline_topics, state_topic

from .helpers import pipeline_dir, wait_for, worker_settings

NAME = "pii"
APP = "pii_app"
PLANTED = "PLANTED-4f2a9c"
VALID = 90


def _edit(spec: dict[str, Any]) -> None:
    spec.pop("batch_model")
    spec["serving"] = {"champion": "online", "challenger": "none"}
    spec["retrain"]["on_drift"] = False
    spec["online_model"]["snapshot_every"] = 20  # the model's snapshot is in the changelog
    fields = spec["schema"]["fields"]
    fields["user_id"]["pii"] = "hash"
    fields["country"]["pii"] = "redact"
    spec["features"] = [f for f in spec["features"] if f.get("field") != "country"]


def _valid(i: int, now_ms: int) -> dict[str, Any]:
    rng = random.Random(i)
    return {
        "event_id": f"pii-{i}",
        "ts": now_ms + i,
        "user_id": PLANTED if i % 3 == 0 else f"u{i % 7}",
        "amount": round(rng.uniform(1, 500), 2),
        "items": rng.randint(1, 5),
        "merchant": rng.choice(["m1", "m2", "m3"]),
        "country": rng.choice(["US", "DE", "FR"]),
        "device": None,
        "risk": rng.random(),
    }


def _invalid(now_ms: int) -> list[tuple[bytes, bytes]]:
    """Dead letters, each keyed by the planted value: an amount out of range, a bad choice
    on the redacted field, and a record that is not JSON."""
    base = _valid(10_000, now_ms)
    return [
        (
            PLANTED.encode(),
            json.dumps({**base, "event_id": "bad-1", "user_id": PLANTED, "amount": -1}).encode(),
        ),
        (b"u1", json.dumps({**base, "event_id": "bad-2", "country": PLANTED}).encode()),
        (PLANTED.encode(), b'{"user_id": "' + PLANTED.encode() + b'", broken'),
    ]


async def _everything(settings: Settings, topic: str, partitions: int) -> list[bytes]:
    """Every key, value and header of every record of ``topic``, as bytes."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        enable_auto_commit=False,
        **client_options(settings),
    )
    await consumer.start()
    found: list[bytes] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        deadline = time.monotonic() + 60
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            assert time.monotonic() < deadline, f"could not read all of {topic}"
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for r in records:
                    found += [r.key or b"", r.value or b""]
                    found += [v for _, v in r.headers or ()]
    finally:
        await close_quietly(consumer.stop(), settings.request_timeout_s)
    return found


def test_a_planted_pii_value_appears_nowhere_the_worker_writes(
    stack_settings: Settings, tmp_path: Path
) -> None:
    pipelines = pipeline_dir(tmp_path, "demo", NAME, _edit)
    settings = worker_settings(stack_settings, tmp_path, pipelines, APP).model_copy(
        update={"pii_key": SecretStr("pii-test-key"), "query_token": SecretStr("pii-token")}
    )
    spec = load_spec(pipelines / f"{NAME}.yaml")
    protect = Protector.for_spec(spec, pii_key(settings))  # the key the worker reads too
    asyncio.run(ensure_pipeline_topics(settings, [spec]))
    topics = pipeline_topics(spec)
    log_file = tmp_path / "worker.log"
    worker = WorkerProcess(settings, [NAME], log_file)
    worker.start()
    try:
        now_ms = int(time.time() * 1000)
        valid = [_valid(i, now_ms) for i in range(VALID)]
        raw = [(r["user_id"].encode(), json.dumps(r).encode()) for r in valid]
        raw += _invalid(now_ms)
        asyncio.run(produce(settings, topics["raw"], raw))
        labels = [
            (r["user_id"].encode(), json.dumps({"event_id": r["event_id"], "is_fraud": i % 4 == 0}))
            for i, r in enumerate(valid)
        ]
        asyncio.run(produce(settings, topics["labels"], [(k, v.encode()) for k, v in labels]))
        where = f"WHERE pipeline = '{NAME}'"
        wait_for(worker, f"SELECT uniqExact(event_id) FROM predictions {where}", VALID)
        wait_for(worker, f"SELECT count() FROM dead_letters {where}", 3)
        wait_for(worker, f"SELECT count() FROM labels FINAL {where}", VALID)
        wait_for(worker, f"SELECT count() FROM metrics {where}", 1)
        time.sleep(2)  # what else was going to be written has been

        # not lost: the planted user's events are served under the hashed entity key
        hashed = protect.hash(PLANTED)
        planted_ids = {r["event_id"] for r in valid if r["user_id"] == PLANTED}
        _, rows = worker.query(
            f"SELECT DISTINCT event_id FROM predictions {where} AND entity_key = '{hashed}'"
        )
        assert {r[0] for r in rows} == planted_ids
        _, letters = worker.query(
            f"SELECT error_class, reason, payload, key FROM dead_letters {where} ORDER BY offset"
        )
        by_class = {row[0]: row for row in letters}
        assert set(by_class) == {"out_of_range", "bad_choice", "malformed_json"}
        assert json.loads(by_class["out_of_range"][2])["user_id"] == hashed
        assert by_class["out_of_range"][3] == hashed  # the key was the planted entity key
        assert json.loads(by_class["bad_choice"][2])["country"] == REDACTED
        assert "(pii value)" in by_class["bad_choice"][1]
        assert by_class["malformed_json"][2].startswith("[pii: payload withheld, ")

        # nowhere in clear: the worker's topics ...
        written = [
            topics["features"],
            topics["predictions"],
            topics["dlq"],
            topics["metrics"],
            state_topic(APP, spec),
            CONTROL_TOPIC,
        ]
        needle = PLANTED.encode()
        for topic in written:
            n = 1 if topic == CONTROL_TOPIC else spec.topics.partitions or 1
            found = asyncio.run(_everything(settings, topic, n))
            assert found or topic == CONTROL_TOPIC, f"{topic} is empty"
            leaks = [b for b in found if needle in b]
            assert not leaks, f"{topic}: {leaks[:3]}"
        state = asyncio.run(_everything(settings, state_topic(APP, spec), n))
        assert any(hashed.encode() in b for b in state)  # the entity's window, hashed
        # ... every ClickHouse table ...
        _, tables = worker.query(
            "SELECT name FROM system.tables WHERE database = currentDatabase() "
            "AND engine NOT LIKE '%View%'"
        )
        assert len(tables) >= 5
        for (table,) in tables:
            hits = worker.query(
                f"SELECT count() FROM `{table}` WHERE position(toString(tuple(*)), '{PLANTED}') > 0"
            )[1][0][0]
            assert int(hits) == 0, table
    finally:
        worker.stop()
    # ... and the worker's log
    assert PLANTED not in log_file.read_text(errors="replace")

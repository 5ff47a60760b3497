"""Hostile input through a live worker, on the real broker and chDB: every raw record ends
as exactly one served prediction or one dead letter, every invalid label as one dead
letter, the worker never crashes, a flood of one cause trips the circuit breaker (an
alert, and the pipeline goes on), and `streamml train` still works afterwards."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from streamml.config import Settings
from streamml.devstack.worker import WorkerProcess
from streamml.schemas.spec import load_spec
from streamml.streams.kafka import ensure_pipeline_topics, produce
from streamml.streams.topics import pipeline_topics

from .helpers import pipeline_dir, run_cli, scalar, settings_env, wait_for, worker_settings

NAME = "hostile"
VALID = 240


def _edit(spec: dict[str, Any]) -> None:
    spec["retrain"]["on_drift"] = False
    batch = spec["batch_model"]
    batch.pop("search")
    batch.update(epochs=3, min_steps=10, cv_folds=2)


def _valid(i: int, now_ms: int) -> dict[str, Any]:
    rng = random.Random(i)
    return {
        "event_id": f"ok-{i}",
        "ts": now_ms + i,
        "user_id": f"u{i % 25}",
        "amount": round(rng.uniform(1, 500), 2),
        "items": rng.randint(1, 5),
        "merchant": rng.choice(["m1", "m2", "m3"]),
        "country": rng.choice(["US", "DE", "FR"]),
        "device": None,
        "risk": rng.random(),
    }


def _hostile_raw(now_ms: int) -> list[tuple[bytes | None, bytes | None]]:
    """Records each of which crashed a worker before, or could: (key, value)."""
    good = _valid(10_000, now_ms)

    def with_(**changes: Any) -> bytes:
        return json.dumps({**good, **changes}).encode()

    return [
        (b"k", b'{"event_id": "\\ud800", "user_id": "u1"}'),  # lone surrogate in the id
        (b"k", with_(event_id="sur-2", merchant="\udfff")),  # ... and in a string field
        (b"K" * 900_000, b"not json at all"),  # a huge key on an invalid record
        (b"k", b'{"event_id": "ctl", "merchant": "' + b"\x01" * 400_000 + b'"}'),
        (b"k", None),  # a tombstone
        (b"k", b""),
        (b"k", b"\xff\xfe\xfd"),  # not UTF-8
        (b"k", b"[1, 2, 3]"),
        (b"k", b"42"),
        (b"k", b"[" * 100_000),  # nested too deep
        (b"k", with_(event_id="nan-1", amount=float("nan"))),  # NaN literal
        (b"k", with_(event_id="inf-1").replace(b'"amount": ', b'"amount": 1e400, "x": ')),
        (b"k", with_(event_id="str-amount", amount="12.5")),
        (b"k", with_(event_id="big-int", items=2**70)),
        (b"k", with_(event_id="neg", amount=-1)),
        (b"k", with_(event_id="country", country="XX")),
        (b"k", with_(event_id="unknown", extra=1)),
        (b"k", with_(event_id={"a": 1})),
        (b"k", with_(event_id=True)),
        (b"k", with_(event_id="ts-far", ts=10**18)),
        (b"k", with_(event_id="ts-neg", ts=-5)),
        (b"k", with_(event_id="ts-text", ts="yesterday")),
        (b"k", with_(event_id="long-user", user_id="u" * 100)),
        (b"k", json.dumps({k: v for k, v in good.items() if k != "amount"}).encode()),
        (b"k", b'{"event_id": "dup", "event_id": "dup2"}'),  # duplicate keys, no fields
    ]


HOSTILE_LABELS: list[bytes] = [
    b'{"event_id": "ok-1", "is_fraud": {"a": 1}}',
    b'{"event_id": "ok-2", "is_fraud": [true]}',
    b'{"event_id": "ok-3", "is_fraud": null}',
    b'{"event_id": "ok-4", "is_fraud": "banana"}',
    b'{"event_id": "ok-5", "is_fraud": 7}',
    b'{"event_id": "ok-6", "is_fraud": 1e308}',
    b'{"event_id": "ok-7", "is_fraud": NaN}',
    b'{"event_id": "ok-8", "is_fraud": 1000000000000000000000000000000}',
    b'{"is_fraud": true}',
    b'{"event_id": "\\ud800", "is_fraud": true}',
    b"not json",
    b"",
    b"[1]",
]


def test_hostile_records_are_dead_letters_and_the_worker_goes_on(
    stack_settings: Settings, tmp_path: Path
) -> None:
    pipelines = pipeline_dir(tmp_path, "demo", NAME, _edit)
    settings = worker_settings(stack_settings, tmp_path, pipelines, "hostile_app").model_copy(
        update={"breaker_window_s": 2.0}
    )
    spec = load_spec(pipelines / f"{NAME}.yaml")
    asyncio.run(ensure_pipeline_topics(settings, [spec]))
    topics = pipeline_topics(spec)
    worker = WorkerProcess(settings, [NAME], tmp_path / "worker.log")
    worker.start()
    try:
        now_ms = int(time.time() * 1000)
        hostile = _hostile_raw(now_ms)
        valid = [_valid(i, now_ms) for i in range(VALID)]
        raw: list[tuple[bytes | None, bytes | None]] = []
        for i, record in enumerate(valid):
            raw.append((record["user_id"].encode(), json.dumps(record).encode()))
            if i % 10 == 0 and hostile:
                raw.append(hostile.pop())
        raw += hostile
        asyncio.run(_send(settings, topics["raw"], raw))
        labels = [
            (r["user_id"].encode(), json.dumps({"event_id": r["event_id"], "is_fraud": i % 3 == 0}))
            for i, r in enumerate(valid)
        ]
        asyncio.run(_send(settings, topics["labels"], [(k, v.encode()) for k, v in labels]))
        asyncio.run(_send(settings, topics["labels"], [(b"k", v) for v in HOSTILE_LABELS]))
        # then a flood of one cause (malformed JSON), alone in a breaker window
        time.sleep(2 * settings.breaker_window_s)
        flood: list[tuple[bytes | None, bytes | None]] = [(b"f", b"{broken")] * 300
        asyncio.run(_send(settings, topics["raw"], flood))

        n_dead_raw = len(raw) + len(flood) - VALID
        served = f"SELECT uniqExact(event_id) FROM predictions WHERE pipeline = '{NAME}' AND served"
        wait_for(worker, served, VALID)
        dead_raw = (
            "SELECT uniqExact(partition, offset) FROM dead_letters "
            f"WHERE pipeline = '{NAME}' AND topic = '{topics['raw']}'"
        )
        wait_for(worker, dead_raw, n_dead_raw)
        dead_labels = (
            "SELECT uniqExact(partition, offset) FROM dead_letters "
            f"WHERE pipeline = '{NAME}' AND topic = '{topics['labels']}'"
        )
        wait_for(worker, dead_labels, len(HOSTILE_LABELS))
        wait_for(worker, f"SELECT count() FROM labels FINAL WHERE pipeline = '{NAME}'", VALID)
        time.sleep(2)  # anything more that was going to arrive has arrived

        # exactly one outcome per record
        assert scalar(worker, served) == VALID
        assert scalar(worker, dead_raw) == n_dead_raw
        assert scalar(worker, dead_labels) == len(HOSTILE_LABELS)
        ids = worker.query(
            f"SELECT DISTINCT event_id FROM predictions WHERE pipeline = '{NAME}' AND served"
        )[1]
        assert {r[0] for r in ids} == {r["event_id"] for r in valid}
        _, letters = worker.query(
            "SELECT error_class, length(payload), length(key), reason FROM dead_letters "
            f"WHERE pipeline = '{NAME}'"
        )
        classes = {row[0] for row in letters}
        assert {"invalid_string", "malformed_json", "unknown_class", "oversize"} <= classes
        assert all(row[1] <= 70_000 and row[2] <= 2_000 for row in letters)
        assert any("key truncated: 900000 bytes" in row[3] for row in letters)
        # only valid labels were stored; the invalid ones never reached the model
        _, stored = worker.query(
            f"SELECT DISTINCT label FROM labels WHERE pipeline = '{NAME}' ORDER BY label"
        )
        assert [r[0] for r in stored] == ["False", "True"]
        stats = worker.get("/stats")["pipelines"][NAME]["counters"]
        assert stats["labels_invalid"] == len(HOSTILE_LABELS)
        assert stats.get("learned", 0) == VALID
        # the flood tripped the breaker: an alert, and the worker is still here
        alert = (
            f"SELECT count() FROM alerts WHERE pipeline = '{NAME}' "
            "AND rule = 'breaker:malformed_json' AND state = 'firing'"
        )
        wait_for(worker, alert, 1, timeout_s=30)
        assert worker.proc is not None and worker.proc.poll() is None
        health = worker.get("/health")
        assert health["status"] in ("ok", "degraded"), health
    finally:
        worker.stop()
    log_text = (tmp_path / "worker.log").read_text(errors="replace")
    assert "We experienced a crash" not in log_text

    # training reads only valid labels: it works after hostile ones were produced
    result = run_cli("train", NAME, "--no-deploy", env=settings_env(settings), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


async def _send(
    settings: Settings, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> None:
    for start in range(0, len(records), 50):  # a 900 KB key needs its own request
        chunk = records[start : start + 50]
        big = [r for r in chunk if len(r[0] or b"") + len(r[1] or b"") > 100_000]
        small = [r for r in chunk if r not in big]
        for record in big:
            await produce(settings, topic, [record])  # type: ignore[list-item]
        if small:
            await produce(settings, topic, small)  # type: ignore[arg-type]

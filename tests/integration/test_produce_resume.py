"""`streamml produce` against a real broker: an interrupted file resumes without sending
anything twice, a SIGKILLed and restarted broker is ridden out, and giving up says what
was delivered and how to resume."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streamml.config import Settings
from streamml.devstack import LocalBroker
from streamml.models.synthetic import Example, payments
from streamml.schemas.catalog import load_pipelines
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.streams.producer import DeliveryOptions, ProduceIncompleteError, produce_examples
from streamml.testing import isolated_settings
from tests.integration.helpers import (
    java_processes_under,
    pipeline_dir,
    run_cli,
    settings_env,
    wait_until,
    worker_settings,
)


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A broker of this module's own, which the tests SIGKILL and start again."""
    broker = LocalBroker(isolated_settings(tmp_path_factory.mktemp("own-broker")))
    broker.up()
    yield broker
    broker.down()


def _setup(broker: Settings, tmp: Path, name: str, n: int) -> tuple[Settings, Path, set[str]]:
    """A pipeline ``name`` (a copy of demo), a JSON-lines file of ``n`` payments where every
    9th has no label; returns the settings, the file and the event ids that have labels."""
    settings = worker_settings(broker, tmp, pipeline_dir(tmp, "demo", name), name)
    path, labelled = tmp / f"{name}.jsonl", set()
    with path.open("wb") as out:
        for i, example in enumerate(payments(n, seed=31)):
            assert isinstance(example.record, dict)
            row = dict(example.record)
            if i % 9:
                row["is_fraud"] = example.label
                labelled.add(row["event_id"])
            out.write(orjson.dumps(row) + b"\n")
    return settings, path, labelled


async def _read_all(settings: Settings, topic: str) -> list[bytes]:
    """Every message in ``topic``, from its first offset to its end."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(await producer.partitions_for(topic))]
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        values: list[bytes] = []
        while any([await consumer.position(tp) < end[tp] for tp in tps]):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                values.extend(r.value or b"" for r in records)
        return values
    finally:
        await consumer.stop()


def _event_ids(settings: Settings, topic: str) -> Counter[str]:
    return Counter(
        str(orjson.loads(v)["event_id"]) for v in asyncio.run(_read_all(settings, topic))
    )


def _assert_exactly_once(settings: Settings, name: str, n: int, labelled: set[str]) -> None:
    raw, labels = _event_ids(settings, f"{name}.raw"), _event_ids(settings, f"{name}.labels")
    assert set(raw) == {f"pay-31-{i}" for i in range(n)}
    assert set(labels) == labelled
    assert max(raw.values()) == 1 and max(labels.values()) == 1, "duplicates"


def _spawn(settings: Settings, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMML_")}
    env.update(settings_env(settings))
    return subprocess.Popen(
        [sys.executable, "-m", "streamml", "produce", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # as typed in a terminal: a runner that started the tests in the background (`&`
        # without job control) has SIGINT ignored, and an ignored signal is inherited,
        # so Python would never raise KeyboardInterrupt in the child
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _next_index(settings: Settings) -> int:
    """The resume point in the (one) progress file of this test's state dir."""
    files = list((settings.state_dir / "produce").glob("*.json"))
    return int(json.loads(files[0].read_text())["next_index"]) if files else -1


def _sigkill(broker: LocalBroker, pid: int | None = None) -> None:
    pid = pid or broker.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not java_processes_under(broker.settings.state_dir), "the broker to die")


def test_limited_then_resumed_file_lands_exactly_once(
    stack_settings: Settings, tmp_path: Path
) -> None:
    n = 3000
    settings, path, labelled = _setup(stack_settings, tmp_path, "resumelimit", n)
    first = run_cli(
        "produce",
        "resumelimit",
        str(path),
        "--limit",
        "1200",
        "--label-delay",
        "40",
        settings=settings,
    )
    assert first.returncode == 0, first.stderr + first.stdout
    assert "delivered 1200 records" in first.stdout and "failed 0" in first.stdout
    assert f"streamml produce resumelimit {path} --resume --label-delay 40" in first.stdout
    second = run_cli(
        "produce", "resumelimit", str(path), "--resume", "--label-delay", "40", settings=settings
    )
    assert second.returncode == 0, second.stderr + second.stdout
    assert "delivered 1800 records" in second.stdout, second.stdout
    assert "(1200 delivered earlier, skipped)" in second.stdout
    _assert_exactly_once(settings, "resumelimit", n, labelled)
    third = run_cli("produce", "resumelimit", str(path), "--resume", settings=settings)
    assert third.returncode == 0 and "nothing to send" in third.stdout


def test_ctrl_c_then_resume_lands_exactly_once(stack_settings: Settings, tmp_path: Path) -> None:
    n = 3000
    settings, path, labelled = _setup(stack_settings, tmp_path, "resumeint", n)
    child = _spawn(settings, "resumeint", str(path), "--rate", "800", "--label-delay", "25")
    wait_until(lambda: _next_index(settings) > 0, "the first acknowledged records", 30)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 130, out + err
    stopped_at = _next_index(settings)
    assert 0 < stopped_at < n and "resume with" in out
    again = run_cli(
        "produce", "resumeint", str(path), "--resume", "--label-delay", "25", settings=settings
    )
    assert again.returncode == 0, again.stderr + again.stdout
    _assert_exactly_once(settings, "resumeint", n, labelled)


def test_a_broker_sigkilled_and_restarted_mid_stream_is_ridden_out(
    own_broker: LocalBroker, tmp_path: Path
) -> None:
    n = 4000
    settings, path, labelled = _setup(own_broker.settings, tmp_path, "brokerkill", n)
    child = _spawn(settings, "brokerkill", str(path), "--rate", "1000", "--label-delay", "10")
    wait_until(lambda: _next_index(settings) >= 1000, "1000 acknowledged records", 30)
    _sigkill(own_broker)
    time.sleep(3)
    own_broker.up()  # same port and data
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, out + err
    assert f"delivered {n} records (+{len(labelled)} labels)" in out, out
    assert "failed 0 records (+0 labels), 0 not sent" in out
    _assert_exactly_once(settings, "brokerkill", n, labelled)


def test_giving_up_reports_the_counts_and_a_resume_completes(
    own_broker: LocalBroker, tmp_path: Path
) -> None:
    n = 3000
    settings, path, labelled = _setup(own_broker.settings, tmp_path, "brokergone", n)
    child = _spawn(settings, "brokergone", str(path), "--rate", "1000", "--give-up-s", "4")
    wait_until(lambda: _next_index(settings) >= 500, "500 acknowledged records", 30)
    _sigkill(own_broker)
    out, err = child.communicate(timeout=60)
    own_broker.up()
    assert child.returncode == 1, out + err
    assert "acknowledged nothing for 4 s" in err and "resume with" in out
    report = re.search(
        r"delivered (\d+) records \(\+(\d+) labels\).*failed (\d+) records \(\+(\d+) labels\), "
        r"(\d+) not sent",
        out.replace("\n", " "),
    )
    assert report is not None, out
    delivered, _, failed, failed_labels, unsent = map(int, report.groups())
    assert delivered >= 500 and delivered + failed + unsent == n
    again = run_cli("produce", "brokergone", str(path), "--resume", settings=settings)
    assert again.returncode == 0, again.stderr + again.stdout
    raw, labels = _event_ids(settings, "brokergone.raw"), _event_ids(settings, "brokergone.labels")
    assert set(raw) == {f"pay-31-{i}" for i in range(n)} and set(labels) == labelled
    # only what was in flight, unacknowledged, when the broker died may be there twice
    assert sum(raw.values()) - n <= failed
    assert sum(labels.values()) - len(labelled) <= failed_labels


def _big(i: int, pad: int) -> Example:
    return Example("u1", {"event_id": f"pay-31-{i}", "user_id": "u1", "pad": "x" * pad}, None)


def test_a_send_that_times_out_is_resent_in_order_by_a_fresh_producer(
    own_broker: LocalBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Big records for one partition while the broker is dead: the producer's buffer fills,
    a send times out, and what was not acknowledged is re-sent once the broker is back."""
    settings, _, _ = _setup(own_broker.settings, tmp_path, "bigkill", 0)
    settings = settings.model_copy(update={"request_timeout_s": 2.0})
    [spec] = load_pipelines(settings.pipelines_dir, ["bigkill"])
    asyncio.run(ensure_pipeline_topics(settings, [spec]))
    n, restart = 30, threading.Timer(3.0, own_broker.up)
    pid = own_broker.status().pid  # not from inside the event loop: status() runs one

    def examples() -> Iterator[Example]:
        for i in range(n):
            if i == 3:
                _sigkill(own_broker, pid)
                restart.start()
            yield _big(i, 120_000)

    try:
        options = DeliveryOptions(give_up_s=120)
        result = asyncio.run(produce_examples(settings, spec, examples(), delivery=options))
    finally:
        restart.join()
    assert (result.delivered, result.failed, result.complete) == (n, 0, True)
    assert "re-sending" in caplog.text  # the send timed out: this was not aiokafka's retry
    values = asyncio.run(_read_all(settings, "bigkill.raw"))  # one key: one partition
    assert [orjson.loads(v)["event_id"] for v in values] == [f"pay-31-{i}" for i in range(n)]


def test_a_record_kafka_refuses_stops_the_run_and_names_it(
    stack_settings: Settings, tmp_path: Path
) -> None:
    settings, _, _ = _setup(stack_settings, tmp_path, "refused", 0)
    [spec] = load_pipelines(settings.pipelines_dir, ["refused"])
    asyncio.run(ensure_pipeline_topics(settings, [spec]))
    examples = [_big(i, 2_000_000 if i == 10 else 10) for i in range(15)]
    with pytest.raises(ProduceIncompleteError, match="MessageSizeTooLargeError") as failed:
        asyncio.run(produce_examples(settings, spec, examples, with_labels=False))
    assert not failed.value.retriable and "record 10" in (failed.value.hint or "")
    result = failed.value.result
    assert (result.delivered, result.failed, result.next_index) == (10, 1, 10)
    assert sorted(_event_ids(settings, "refused.raw")) == sorted(f"pay-31-{i}" for i in range(10))

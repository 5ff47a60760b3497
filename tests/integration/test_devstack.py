"""`streamml up/status/down` on their own brokers, apart from the session's."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest

from streamml.devstack import LocalBroker
from streamml.errors import BrokerNotReadyError, BrokerUnavailableError, PortInUseError
from streamml.streams import kafka
from streamml.testing import isolated_settings

from .helpers import java_processes_under, run_cli, settings_env


def _status(env: dict[str, str]) -> dict[str, object]:
    result = run_cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def test_up_status_down_and_a_restart_keeps_data(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path)
    env = settings_env(settings)
    assert _status(env)["broker"] == "stopped"

    started = run_cli("up", env=env)
    assert started.returncode == 0, started.stderr + started.stdout
    assert "Kafka broker ready" in started.stdout
    first = _status(env)
    assert first["broker"] == "running" and first["ready"] is True
    again = run_cli("up", env=env)  # a second `up` reuses the running broker
    assert again.returncode == 0 and _status(env)["pid"] == first["pid"]

    topic = "test.persist"
    asyncio.run(kafka.ensure_topics(settings, [topic]))
    [(partition, offset)] = asyncio.run(kafka.produce(settings, topic, [(b"k", b"kept")]))

    stopped = run_cli("down", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert _status(env)["broker"] == "stopped"
    assert java_processes_under(tmp_path) == []

    assert run_cli("up", env=env).returncode == 0
    try:
        message = asyncio.run(kafka.fetch_at(settings, topic, partition, offset))
        assert message.value == b"kept"
    finally:
        assert run_cli("down", env=env).returncode == 0
    assert java_processes_under(tmp_path) == []


def test_killed_broker_gives_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, request_timeout_s=3.0)
    broker = LocalBroker(settings)
    status = broker.up()
    assert status.pid is not None
    asyncio.run(kafka.ensure_topics(settings, ["test.kill"]))
    os.kill(status.pid, signal.SIGKILL)
    while java_processes_under(tmp_path):
        time.sleep(0.05)

    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=r"127\.0\.0\.1:\d+") as produce_err:
        asyncio.run(kafka.produce(settings, "test.kill", [(None, b"lost?")]))
    with pytest.raises(BrokerUnavailableError):
        asyncio.run(kafka.consume(settings, ["test.kill"], count=1, timeout_s=3.0))
    assert time.monotonic() - t0 < 30
    assert produce_err.value.hint and "streamml up" in produce_err.value.hint

    assert broker.status().state == "stale"
    assert "already gone" in broker.down()
    assert broker.status().state == "stopped"


def test_port_in_use_is_refused_before_starting(tmp_path: Path) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        settings = isolated_settings(tmp_path, kafka_port=port)
        with pytest.raises(PortInUseError, match=f"port {port}"):
            LocalBroker(settings).up()
    assert java_processes_under(tmp_path) == []


def test_broker_that_never_answers_shows_the_log_tail(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path, kafka_start_timeout_s=0.3)
    broker = LocalBroker(settings)
    try:
        with pytest.raises(BrokerNotReadyError, match="did not answer") as err:
            broker.up()
        assert "log tail" in str(err.value)
    finally:
        broker.down()
    assert java_processes_under(tmp_path) == []

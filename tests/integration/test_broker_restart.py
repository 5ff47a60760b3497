"""A broker SIGKILLed mid-stream and started again: the worker rides it out (health says
degraded meanwhile), `streamml produce` rides it out, and every event ends as exactly one
served prediction in ClickHouse, with its label -- no worker restart, no hand on offsets.

The test runs its own broker (the session's is shared by other tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from streamml.devstack import LocalBroker
from streamml.devstack.worker import WorkerProcess
from streamml.errors import PortInUseError
from streamml.schemas.spec import load_spec
from streamml.streams.kafka import ensure_pipeline_topics
from streamml.testing import free_port, isolated_settings

from .helpers import pipeline_dir, scalar, settings_env, wait_for

NAME = "weather"
EVENTS = 3000


def _edit(spec: dict[str, Any]) -> None:
    """The demo pipeline with its online model alone (no trainer work in this test)."""
    spec.pop("batch_model")
    spec["serving"] = {"champion": "online", "challenger": "none"}
    spec["retrain"]["on_drift"] = False


def _restart(broker: LocalBroker, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            broker.up()
            return
        except PortInUseError:  # the killed broker's sockets linger a moment
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_broker_killed_mid_stream_loses_nothing(tmp_path: Path) -> None:
    settings = isolated_settings(tmp_path / "stack", request_timeout_s=10.0)
    broker = LocalBroker(settings)
    broker.up()
    pipelines = pipeline_dir(tmp_path, "demo", NAME, _edit)
    ws = settings.model_copy(
        update={
            "state_dir": tmp_path / "worker",
            "web_port": free_port(),
            "app_id": "weather_app",
            "pipelines_dir": pipelines,
        }
    )
    asyncio.run(ensure_pipeline_topics(ws, [load_spec(pipelines / f"{NAME}.yaml")]))
    worker = WorkerProcess(ws, [NAME], tmp_path / "worker.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMML_")}
    env.update(settings_env(ws))
    producer: subprocess.Popen[str] | None = None
    try:
        worker.start()
        command = ["produce", NAME, "--synthetic", str(EVENTS), "--rate", "250", "--seed", "11"]
        producer = subprocess.Popen(
            [sys.executable, "-m", "streamml", *command],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        served = f"SELECT uniqExact(event_id) FROM predictions WHERE pipeline = '{NAME}' AND served"
        wait_for(worker, served, 400, timeout_s=90)  # mid-stream

        pid = broker.status().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        statuses = []
        down_until = time.monotonic() + 8
        while time.monotonic() < down_until:
            try:
                statuses.append(worker.get("/health")["status"])
            except OSError:
                statuses.append("unreachable")
            time.sleep(0.5)
        _restart(broker)

        output, _ = producer.communicate(timeout=240)
        assert producer.returncode == 0, output[-3000:]
        wait_for(worker, served, EVENTS, timeout_s=240)
        labels = f"SELECT uniqExact(event_id) FROM labels WHERE pipeline = '{NAME}'"
        wait_for(worker, labels, EVENTS, timeout_s=120)
        time.sleep(2)
        assert scalar(worker, served) == EVENTS
        per_event = (
            "SELECT max(n) FROM (SELECT event_id, count() AS n FROM predictions FINAL "
            f"WHERE pipeline = '{NAME}' AND served GROUP BY event_id)"
        )
        assert scalar(worker, per_event) == 1  # one served prediction per event
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_tail()
        assert "degraded" in statuses, statuses
        assert "unreachable" not in statuses, statuses
        assert worker.get("/health")["status"] == "ok"
    finally:
        if producer is not None and producer.poll() is None:
            producer.kill()
        worker.stop()
        broker.down()
    log_text = (tmp_path / "worker.log").read_text(errors="replace")
    assert "We experienced a crash" not in log_text

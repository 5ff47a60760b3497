"""`streamml worker` runs the Faust app against the real broker and stops on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from streamml.config import Settings

from .helpers import settings_env


def test_worker_joins_serves_health_and_stops(stack_settings: Settings, tmp_path: object) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMML_")}
    env.update(settings_env(stack_settings))
    env["STREAMML_STATE_DIR"] = str(tmp_path)
    env["STREAMML_KAFKA_BOOTSTRAP"] = stack_settings.bootstrap_servers
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamml", "worker"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{stack_settings.web_port}/health"
    health = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    health = json.loads(response.read())
                    break
            except OSError:  # not listening yet, or 503 while starting
                time.sleep(0.5)
        assert health is not None, "worker never served /health"
        assert health["status"] == "ok"
        assert health["bootstrap"] == stack_settings.bootstrap_servers
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read() if proc.stdout else ""
    assert "Ready" in output, output[-3000:]


def test_worker_refuses_to_start_without_a_broker(stack_settings: Settings) -> None:
    from streamml.testing import free_port

    from .helpers import run_cli

    result = run_cli(
        "worker",
        env={
            "STREAMML_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
            "STREAMML_REQUEST_TIMEOUT_S": "2",
        },
        timeout=60,
    )
    assert result.returncode == 1
    assert "no Kafka broker answers" in result.stderr

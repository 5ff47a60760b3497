"""Helpers shared by the integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streamml.config import Settings


def run_cli(
    *args: str,
    settings: Settings | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m streamml`` in a child process with the given settings as env vars."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMML_")}
    if settings is not None:
        full_env.update(settings_env(settings))
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "streamml", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def settings_env(settings: Settings) -> dict[str, str]:
    env = {
        "STREAMML_STATE_DIR": str(settings.state_dir),
        "STREAMML_CACHE_DIR": str(settings.cache_dir),
        "STREAMML_KAFKA_PORT": str(settings.kafka_port),
        "STREAMML_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
        "STREAMML_WEB_PORT": str(settings.web_port),
        "STREAMML_REQUEST_TIMEOUT_S": str(settings.request_timeout_s),
    }
    if settings.kafka_bootstrap:
        env["STREAMML_KAFKA_BOOTSTRAP"] = settings.kafka_bootstrap
    return env


def java_processes_under(path: Path) -> list[int]:
    """Pids of running java processes whose command line mentions ``path``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "kafka.Kafka" in cmdline and str(path) in cmdline:
            pids.append(int(proc.name))
    return pids

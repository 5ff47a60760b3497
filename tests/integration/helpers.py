"""Helpers shared by the integration tests."""

# settings_env is re-exported for the tests: the child-process form of Settings.

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from streamml.config import Settings
from streamml.devstack.worker import settings_env


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

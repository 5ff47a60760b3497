"""A streamml worker in a child process, driven over its web port (demo and tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from streamml.config import Settings
from streamml.errors import DevStackError, StreamMLError
from streamml.queryclient import query_worker


class WorkerProcess:
    """``python -m streamml worker`` with its log in a file; /health, /stats and /query."""

    def __init__(
        self, settings: Settings, pipelines: list[str], log_file: Path, sink: bool = True
    ) -> None:
        self.settings = settings
        self.pipelines = pipelines
        self.sink = sink
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://{settings.web_host}:{settings.web_port}"

    def start(self, timeout_s: float = 120.0) -> None:
        args = [sys.executable, "-m", "streamml", "worker"]
        for name in self.pipelines:
            args += ["--pipeline", name]
        if not self.sink:
            args.append("--no-sink")
        env = dict(os.environ)
        env.update(settings_env(self.settings))
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DevStackError(
                    f"the worker exited with code {self.proc.returncode} while starting; "
                    f"log tail:\n{self.log_tail()}"
                )
            try:
                if self.get("/health").get("status") == "ok":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise DevStackError(
            f"the worker did not become ready in {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    def query(self, sql: str) -> tuple[list[str], list[list[Any]]]:
        """Columns and rows of ``sql``, run read-only through /query with the token."""
        try:
            return query_worker(self.settings, sql, timeout_s=60.0, base=self.base)
        except StreamMLError as exc:
            raise DevStackError(f"query failed: {exc}") from None

    def stop(self, timeout_s: float = 30.0) -> str:
        if self.proc is None or self.proc.poll() is not None:
            return "worker not running"
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
            return f"worker pid {self.proc.pid} stopped"
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return f"worker pid {self.proc.pid} killed (it did not stop within {timeout_s:.0f} s)"

    def kill(self) -> None:
        """SIGKILL, as a crash would (tests of recovery)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_file.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as STREAMML_* variables, for a child process (secrets in clear: the
    child needs their values, and the environment of a process is private to its user)."""
    env = {}
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value is not None:
            env["STREAMML_" + name.upper()] = str(value)
    return env

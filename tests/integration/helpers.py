"""Helpers shared by the integration tests."""

# settings_env is re-exported for the tests: the child-process form of Settings.

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from streamml.config import Settings
from streamml.devstack.worker import WorkerProcess, settings_env
from streamml.testing import free_port

T = TypeVar("T")


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


# --- pipelines and workers of a test ------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]


def pipeline_dir(
    tmp: Path, source: str, name: str, edit: Callable[[dict[str, Any]], None] | None = None
) -> Path:
    """A copy of a shipped spec under a new name (so its topics are the test's own),
    optionally changed by ``edit`` (e.g. a smaller batch-model search)."""
    spec = yaml.safe_load((ROOT / "pipelines" / f"{source}.yaml").read_text())
    spec["name"] = name
    if edit is not None:
        edit(spec)
    folder = tmp / "pipelines"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return folder


def worker_settings(stack: Settings, tmp: Path, pipelines: Path, app_id: str) -> Settings:
    """Settings of one worker on the session broker, with its own state dir and web port."""
    return stack.model_copy(
        update={
            "state_dir": tmp / f"state-{app_id}",
            "web_port": free_port(),
            "app_id": app_id,
            "pipelines_dir": pipelines,
            "kafka_bootstrap": stack.bootstrap_servers,
        }
    )


def scalar(worker: WorkerProcess, sql: str) -> int:
    """The single number a query answers, through the worker that owns the warehouse."""
    return int(worker.query(sql)[1][0][0])


def wait_for(worker: WorkerProcess, sql: str, want: int, timeout_s: float = 120) -> int:
    """Poll a count query until it reaches ``want``; fail with the worker's log otherwise."""
    deadline = time.monotonic() + timeout_s
    got = -1
    while time.monotonic() < deadline:
        got = scalar(worker, sql)
        if got >= want:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{sql!r} reached {got}, wanted {want}\n{worker.log_tail()}")


def wait_until(check: Callable[[], T | None], what: str, timeout_s: float = 60) -> T:
    """Poll ``check`` until it returns something other than None/False; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.25)


# --- a webhook receiver -------------------------------------------------------------------


class WebhookCatcher:
    """A tiny HTTP server on 127.0.0.1, in a thread, that keeps every JSON body POSTed to
    it (the receiving end of an alert webhook)."""

    def __init__(self) -> None:
        bodies: list[dict[str, Any]] = []
        self.bodies = bodies
        self.paths: list[str] = []
        paths = self.paths

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers.get("content-length") or 0)
                paths.append(self.path)
                bodies.append(json.loads(self.rfile.read(size) or b"null"))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> WebhookCatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

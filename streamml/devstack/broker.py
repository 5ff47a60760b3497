"""Start, stop and inspect the single-node KRaft broker of the dev stack.

With ``kafka_dev_security`` on, its client listener speaks SASL/SCRAM over TLS: the CA
and certificate come from :mod:`streamml.devstack.tls`, the SCRAM user is added when the
storage is formatted (salted here, so the password never appears on a command line).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from streamml.config import LOCAL_HOST, Settings
from streamml.devstack.jars import Progress, ensure_kafka_jars, find_java, resource_text
from streamml.errors import BrokerNotReadyError, ConfigError, DevStackError, PortInUseError
from streamml.secrets import kafka_sasl_password

SCRAM_MECHANISMS = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
SCRAM_ITERATIONS = 8192
SCRAM_LOGIN = "org.apache.kafka.common.security.scram.ScramLoginModule"

State = Literal["running", "stopped", "stale", "external"]
LOG_TAIL_LINES = 25


@dataclass(frozen=True)
class BrokerStatus:
    """What `streamml status` reports about the broker."""

    state: State
    bootstrap: str
    ready: bool
    pid: int | None = None
    version: str | None = None
    uptime_s: float | None = None
    data_dir: str | None = None
    log_file: str | None = None


def _quiet(_: str) -> None:
    return None


@dataclass(frozen=True)
class _PidRecord:
    """What the pid file holds: enough to tell our broker from a reused pid."""

    pid: int
    start_ticks: int | None
    started_at: float
    version: str


class LocalBroker:
    """The dev stack's broker: one Java process whose pid, log and data sit in the state dir."""

    def __init__(self, settings: Settings, progress: Progress = _quiet) -> None:
        self.settings = settings
        self.progress = progress
        self.home = settings.state_dir / "kafka"
        self.data_dir = self.home / "data"
        self.pid_file = self.home / "broker.pid"
        self.log_file = self.home / "broker.log"
        self.security_file = self.home / "security"  # how the storage was formatted

    @property
    def bootstrap(self) -> str:
        return f"{LOCAL_HOST}:{self.settings.kafka_port}"

    # --- public operations ------------------------------------------------------
    def up(self) -> BrokerStatus:
        """Start the broker unless it runs already; return once it answers metadata requests."""
        if not self.settings.uses_local_broker:
            return self.status()
        pid = self._live_pid()
        if pid is not None:
            self.wait_ready(pid)
            return self.status()
        self.pid_file.unlink(missing_ok=True)
        for port in (self.settings.kafka_port, self.settings.kafka_controller_port):
            check_port_free(port)
        java, _ = find_java(self.settings.java_home)
        libs = ensure_kafka_jars(
            self.settings.kafka_version,
            self.settings.cache_dir,
            self.settings.kafka_libs_dir,
            self.progress,
        )
        classpath = f"{libs}/*"
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            self._format(java, classpath)
        self._check_formatted_security()
        pid = self._spawn(java, classpath)
        self.wait_ready(pid)
        return self.status()

    def down(self, timeout_s: float = 60.0) -> str:
        """Stop the broker this state dir started (and nothing else); say what was done."""
        if not self.settings.uses_local_broker:
            return f"using the external broker {self.settings.bootstrap_servers}: nothing to stop"
        record = self._read_pid_record()
        if record is None:
            return "no local broker is running"
        pid = record.pid
        if not _is_same_process(pid, record.start_ticks):
            self.pid_file.unlink(missing_ok=True)
            return f"broker pid {pid} was already gone; removed the stale pid file"
        self.progress(f"stopping the Kafka broker (pid {pid}) ...")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _is_same_process(pid, record.start_ticks):
            time.sleep(0.2)
        how = "stopped"
        if _is_same_process(pid, record.start_ticks):
            os.kill(pid, signal.SIGKILL)
            how = f"killed (it did not stop within {timeout_s:.0f} s)"
            while _is_same_process(pid, record.start_ticks):
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return f"Kafka broker pid {pid} {how}; data kept in {self.data_dir}"

    def status(self) -> BrokerStatus:
        if not self.settings.uses_local_broker:
            bootstrap = self.settings.bootstrap_servers
            ready = probe_metadata(bootstrap, 5.0, self._probe_options())
            return BrokerStatus("external", bootstrap, ready=ready)
        record = self._read_pid_record()
        if record is None:
            return BrokerStatus("stopped", self.bootstrap, ready=False, data_dir=str(self.data_dir))
        alive = _is_same_process(record.pid, record.start_ticks)
        return BrokerStatus(
            state="running" if alive else "stale",
            bootstrap=self.bootstrap,
            ready=alive and probe_metadata(self.bootstrap, 5.0, self._probe_options()),
            pid=record.pid,
            version=record.version,
            uptime_s=time.time() - record.started_at if alive else None,
            data_dir=str(self.data_dir),
            log_file=str(self.log_file),
        )

    def wait_ready(self, pid: int) -> None:
        """Block until the broker answers a metadata request, or explain why it never did."""
        deadline = time.monotonic() + self.settings.kafka_start_timeout_s
        options = self._probe_options()
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                raise BrokerNotReadyError(
                    f"the Kafka broker (pid {pid}) exited during start-up; log tail:\n"
                    + self.log_tail(),
                    hint=f"full log: {self.log_file}",
                )
            if probe_metadata(self.bootstrap, 2.0, options):
                return
            time.sleep(0.3)
        raise BrokerNotReadyError(
            f"the Kafka broker (pid {pid}) did not answer on {self.bootstrap} within "
            f"{self.settings.kafka_start_timeout_s:.0f} s; log tail:\n" + self.log_tail(),
            hint="raise STREAMML_KAFKA_START_TIMEOUT_S or run `streamml down` and retry",
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_file.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    # --- internals ------------------------------------------------------------------
    def _probe_options(self) -> dict[str, Any] | None:
        """The clients' security options; None when they cannot be built (no CA yet)."""
        from streamml.streams.kafka import client_options

        try:
            return client_options(self.settings)
        except ConfigError:
            return None

    @property
    def _secure(self) -> bool:
        return self.settings.kafka_dev_security

    def _scram_user(self) -> tuple[str, str]:
        from streamml.streams.kafka import DEV_SASL_USERNAME

        password = kafka_sasl_password(self.settings)
        assert password is not None  # generated when kafka_dev_security is on
        return self.settings.kafka_sasl_username or DEV_SASL_USERNAME, password

    def _security_block(self) -> str:
        if not self._secure:
            return ""
        from streamml.devstack.tls import ensure_dev_tls

        tls = ensure_dev_tls(self.settings.secrets_path / "kafka")
        user, password = self._scram_user()
        quoted = password.replace("\\", "\\\\").replace('"', '\\"')
        jaas = f'{SCRAM_LOGIN} required username="{user}" password="{quoted}";'
        jaas = jaas.replace("\\", "\\\\")  # the properties file unescapes once more
        lines = [
            "# SASL/SCRAM over TLS (STREAMML_KAFKA_DEV_SECURITY); this file is mode 0600.",
            f"sasl.enabled.mechanisms={','.join(SCRAM_MECHANISMS)}",
            "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
            *(
                f"listener.name.sasl_ssl.{m.lower()}.sasl.jaas.config={jaas}"
                for m in SCRAM_MECHANISMS
            ),
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={tls.broker_keystore}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={tls.ca_cert}",
            "ssl.client.auth=none",
        ]
        return "\n".join(lines)

    def _write_config(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        text = (
            resource_text("server.properties")
            .replace("@LISTENER@", "SASL_SSL" if self._secure else "PLAINTEXT")
            .replace("@PORT@", str(self.settings.kafka_port))
            .replace("@CONTROLLER_PORT@", str(self.settings.kafka_controller_port))
            .replace("@DATA_DIR@", str(self.data_dir))
            .replace("@PARTITIONS@", str(self.settings.topic_partitions))
            .replace("@SECURITY@", self._security_block())
        )
        path = self.home / "server.properties"
        path.unlink(missing_ok=True)  # may hold the SCRAM password: created 0600
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        (self.home / "log4j2.properties").write_text(resource_text("log4j2.properties"), "utf-8")

    def _java_cmd(self, java: Path, classpath: str, *args: str) -> list[str]:
        return [
            str(java),
            f"-Xmx{self.settings.kafka_heap_mb}m",
            f"-Xms{min(256, self.settings.kafka_heap_mb)}m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            classpath,
            *args,
        ]

    def _format(self, java: Path, classpath: str) -> None:
        self.progress("formatting KRaft storage ...")
        cmd = self._java_cmd(
            java,
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            new_cluster_id(),
            "-c",
            str(self.home / "server.properties"),
        )
        if self._secure:
            user, password = self._scram_user()
            for mechanism in SCRAM_MECHANISMS:
                cmd += ["--add-scram", scram_credential(mechanism, user, password)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        if proc.returncode != 0:
            raise DevStackError(
                "formatting the broker's KRaft storage failed:\n"
                + (proc.stdout + proc.stderr).strip()[-2000:],
                hint=f"remove {self.data_dir} to start from empty storage",
            )
        self.security_file.write_text(self._security_mode(), "utf-8")

    def _security_mode(self) -> str:
        return f"SASL_SSL user={self._scram_user()[0]}" if self._secure else "PLAINTEXT"

    def _check_formatted_security(self) -> None:
        """SCRAM users are added only when the storage is formatted: a storage formatted
        otherwise cannot serve the settings' security."""
        try:
            formatted = self.security_file.read_text("utf-8").strip()
        except FileNotFoundError:
            formatted = "PLAINTEXT"
        wanted = self._security_mode()
        if self._secure and formatted != wanted:
            raise DevStackError(
                f"the broker's storage in {self.data_dir} was formatted for {formatted}, "
                f"not {wanted} (STREAMML_KAFKA_DEV_SECURITY)",
                hint=f"retrying will not help: run `streamml down`, remove {self.data_dir} "
                "and run `streamml up` again (its topics are lost)",
            )

    def _spawn(self, java: Path, classpath: str) -> int:
        self.progress(f"starting Kafka {self.settings.kafka_version} on {self.bootstrap} ...")
        cmd = self._java_cmd(java, classpath, "kafka.Kafka", str(self.home / "server.properties"))
        with self.log_file.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.home,
            )
        record = {
            "pid": proc.pid,
            "start_ticks": _start_ticks(proc.pid),
            "started_at": time.time(),
            "version": self.settings.kafka_version,
            "port": self.settings.kafka_port,
        }
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record), "utf-8")
        os.replace(tmp, self.pid_file)
        return proc.pid

    def _read_pid_record(self) -> _PidRecord | None:
        try:
            raw = json.loads(self.pid_file.read_text("utf-8"))
            ticks = raw.get("start_ticks")
            return _PidRecord(
                pid=int(raw["pid"]),
                start_ticks=None if ticks is None else int(ticks),
                started_at=float(raw.get("started_at", 0.0)),
                version=str(raw.get("version", "?")),
            )
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _live_pid(self) -> int | None:
        record = self._read_pid_record()
        if record is None:
            return None
        return record.pid if _is_same_process(record.pid, record.start_ticks) else None


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def check_port_free(port: int, host: str = LOCAL_HOST) -> None:
    """Raise PortInUseError if something listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        taken = probe.connect_ex((host, port)) == 0
    if not taken:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # as the broker does: connections in TIME_WAIT must not count as "in use"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                taken = True
    if taken:
        raise PortInUseError(
            f"port {port} on {host} is already in use by another process",
            hint="stop that process, or choose other ports with STREAMML_KAFKA_PORT / "
            "STREAMML_KAFKA_CONTROLLER_PORT",
        )


def scram_credential(mechanism: str, user: str, password: str, salt: bytes | None = None) -> str:
    """A ``kafka-storage format --add-scram`` argument holding the salted password
    (RFC 5802 Hi(), as Kafka stores it), so the password itself stays off the command line.

    >>> scram_credential("SCRAM-SHA-256", "u", "p", b"salt")[:56]
    'SCRAM-SHA-256=[name=u,iterations=8192,salt="c2FsdA==",sa'
    """
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac(
        SCRAM_MECHANISMS[mechanism], password.encode(), salt, SCRAM_ITERATIONS
    )
    b64 = base64.b64encode
    return (
        f"{mechanism}=[name={user},iterations={SCRAM_ITERATIONS},"
        f'salt="{b64(salt).decode()}",saltedpassword="{b64(salted).decode()}"]'
    )


def probe_metadata(bootstrap: str, timeout_s: float, options: dict[str, Any] | None = None) -> bool:
    """True if the cluster answers a metadata request and lists at least one broker.

    ``options`` are the clients' security options (``client_options``; None: PLAINTEXT),
    so the probe also authenticates: a broker that refuses them counts as not ready."""
    from aiokafka.client import AIOKafkaClient

    # aiokafka logs every refused connection at ERROR; while probing they are expected.
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)

    async def probe() -> bool:
        client = AIOKafkaClient(
            bootstrap_servers=bootstrap,
            request_timeout_ms=int(timeout_s * 1000),
            metadata_max_age_ms=1000,
            **(options or {}),
        )
        try:
            await asyncio.wait_for(client.bootstrap(), timeout_s)
            return bool(client.cluster.brokers())
        except Exception:
            return False
        finally:
            await client.close()

    try:
        return asyncio.run(probe())
    finally:
        quiet.setLevel(level)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _start_ticks(pid: int) -> int | None:
    """Process start time in clock ticks since boot (tells a reused pid from ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, PermissionError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _is_same_process(pid: int, start_ticks: int | None) -> bool:
    if not _pid_alive(pid):
        return False
    if start_ticks is None:
        return True
    return _start_ticks(pid) == start_ticks

"""Settings: one frozen object, read from ``STREAMML_*`` variables and an optional TOML file.

Precedence, highest first: keyword overrides, environment variables, the TOML
file named by ``STREAMML_CONFIG_FILE`` (keys are the field names below, without
the prefix), then the defaults. :func:`load_settings` validates everything at
start and turns a bad value into a :class:`~streamml.errors.ConfigError` that
names the variable and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from streamml.errors import ConfigError

ENV_PREFIX = "STREAMML_"
CONFIG_FILE_ENV = "STREAMML_CONFIG_FILE"
LOCAL_HOST = "127.0.0.1"

_HOSTPORT = re.compile(r"^[A-Za-z0-9_.\-\[\]:]+:\d{1,5}$")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "streamml"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamml"


class Settings(BaseSettings):
    """Effective configuration of one streamml process (immutable once built)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    # --- where things live -------------------------------------------------
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description=(
            "STREAMML_STATE_DIR: broker data, pid and logs, embedded chDB, model registry "
            "(default $XDG_STATE_HOME/streamml or ~/.local/state/streamml)."
        ),
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        description=(
            "STREAMML_CACHE_DIR: downloads kept between clones, e.g. the Kafka broker jars "
            "(default $XDG_CACHE_HOME/streamml or ~/.cache/streamml)."
        ),
    )

    # --- Kafka ---------------------------------------------------------------
    kafka_bootstrap: str | None = Field(
        default=None,
        description=(
            "STREAMML_KAFKA_BOOTSTRAP: host:port[,host:port] of an existing Kafka cluster. "
            "When set, no local broker is started."
        ),
    )
    kafka_port: int = Field(
        default=19092,
        ge=1024,
        le=65535,
        description="STREAMML_KAFKA_PORT: client port of the local dev broker on 127.0.0.1.",
    )
    kafka_controller_port: int = Field(
        default=19093,
        ge=1024,
        le=65535,
        description="STREAMML_KAFKA_CONTROLLER_PORT: KRaft controller port of the local broker.",
    )
    kafka_version: str = Field(
        default="4.4.0",
        pattern=r"^\d+\.\d+\.\d+$",
        description="STREAMML_KAFKA_VERSION: Kafka version of the local broker (4.x or 3.9.x).",
    )
    kafka_libs_dir: Path | None = Field(
        default=None,
        description=(
            "STREAMML_KAFKA_LIBS_DIR: use this folder of Kafka jars (e.g. a distribution's libs/) "
            "instead of fetching them from Maven Central."
        ),
    )
    kafka_heap_mb: int = Field(
        default=512,
        ge=128,
        le=16384,
        description="STREAMML_KAFKA_HEAP_MB: JVM heap of the local broker, in MiB.",
    )
    kafka_start_timeout_s: float = Field(
        default=90.0,
        gt=0,
        description="STREAMML_KAFKA_START_TIMEOUT_S: how long `up` waits for the broker to answer.",
    )
    java_home: Path | None = Field(
        default=None,
        description="STREAMML_JAVA_HOME: Java 17+ for the local broker; default: java on PATH.",
    )
    request_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="STREAMML_REQUEST_TIMEOUT_S: a Kafka call with no answer in this time fails.",
    )
    topic_partitions: int = Field(
        default=6,
        ge=1,
        le=1024,
        description="STREAMML_TOPIC_PARTITIONS: partitions of topics streamml creates.",
    )
    topic_replication_factor: int = Field(
        default=1,
        ge=1,
        le=16,
        description="STREAMML_TOPIC_REPLICATION_FACTOR: replication of topics streamml creates.",
    )

    # --- ClickHouse ------------------------------------------------------------
    clickhouse_dsn: str | None = Field(
        default=None,
        repr=False,  # it may carry a password: effective() shows it masked
        description=(
            "STREAMML_CLICKHOUSE_DSN: e.g. http://user:pass@host:8123 for a ClickHouse server; "
            "default: embedded chDB in <state_dir>/chdb."
        ),
    )
    clickhouse_database: str = Field(
        default="streamml",
        description="STREAMML_CLICKHOUSE_DATABASE: database holding the streamml tables.",
    )

    # --- Faust worker ------------------------------------------------------------
    app_id: str = Field(
        default="streamml",
        description="STREAMML_APP_ID: Faust app id; also the consumer group and changelog prefix.",
    )
    web_host: str = Field(
        default=LOCAL_HOST, description="STREAMML_WEB_HOST: bind address of the worker's web port."
    )
    web_port: int = Field(
        default=6066,
        ge=1024,
        le=65535,
        description="STREAMML_WEB_PORT: worker web port (/health, /metrics).",
    )
    session_timeout_s: float = Field(
        default=10.0,
        ge=1,
        le=300,
        description="STREAMML_SESSION_TIMEOUT_S: consumer session timeout; a dead worker's "
        "partitions move after this long.",
    )
    heartbeat_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="STREAMML_HEARTBEAT_INTERVAL_S: consumer heartbeat interval.",
    )
    rebalance_timeout_s: float = Field(
        default=10.0,
        ge=1,
        le=600,
        description="STREAMML_REBALANCE_TIMEOUT_S: how long a rebalance may take.",
    )
    pipelines_dir: Path = Field(
        default=Path("pipelines"),
        description="STREAMML_PIPELINES_DIR: folder of pipeline specs (<name>.yaml).",
    )
    registry_dir: Path | None = Field(
        default=None,
        description=(
            "STREAMML_REGISTRY_DIR: the model registry, shared by every worker and the CLI "
            "(default: <state_dir>/models)."
        ),
    )
    reports_dir: Path | None = Field(
        default=None,
        description=(
            "STREAMML_REPORTS_DIR: training and evaluation reports (default: <state_dir>/reports)."
        ),
    )
    trainer_enabled: bool = Field(
        default=True,
        description=(
            "STREAMML_TRAINER_ENABLED: run the trainer role (drift -> retrain -> promote) and "
            "the alert rules in the worker that runs the warehouse sink."
        ),
    )
    batch_max_records: int = Field(
        default=2000,
        ge=1,
        description=(
            "STREAMML_BATCH_MAX_RECORDS: most raw records and labels a worker takes from "
            "Kafka and processes as one batch."
        ),
    )
    fetch_max_wait_ms: int = Field(
        default=100,
        ge=0,
        le=10_000,
        description=(
            "STREAMML_FETCH_MAX_WAIT_MS: how long the broker may hold an empty fetch; it "
            "answers as soon as data arrives, so this costs no latency (lower = busier idle)."
        ),
    )
    order_max_wait_ms: int = Field(
        default=1_000,
        ge=0,
        le=60_000,
        description=(
            "STREAMML_ORDER_MAX_WAIT_MS: a fetched raw record or label waits for the other "
            "topic of its partition to catch up to its timestamp (so records and labels are "
            "applied in produced order) at most this long, then is applied anyway."
        ),
    )
    commit_interval_ms: int = Field(
        default=200,
        ge=0,
        description=(
            "STREAMML_COMMIT_INTERVAL_MS: commit input offsets at most this often (always "
            "after the batch's outputs are acknowledged, and on shutdown or rebalance)."
        ),
    )
    sink_max_rows: int = Field(
        default=10_000,
        ge=1,
        description="STREAMML_SINK_MAX_ROWS: the warehouse sink writes a batch at this many rows.",
    )
    sink_flush_interval_ms: int = Field(
        default=1000,
        ge=10,
        description="STREAMML_SINK_FLUSH_INTERVAL_MS: ... or after this long, whichever is first.",
    )
    sink_alert_after_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "STREAMML_SINK_ALERT_AFTER_S: when warehouse writes have failed for this long, the "
            "sink raises an alert (it keeps retrying, and /health says degraded before that)."
        ),
    )
    breaker_window_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "STREAMML_BREAKER_WINDOW_S: the circuit breaker counts each pipeline's failed "
            "records per cause over this window."
        ),
    )
    breaker_failure_ratio: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description=(
            "STREAMML_BREAKER_FAILURE_RATIO: if more than this share of a window's records "
            "fail for one cause, the breaker opens: an alert, and the pipeline goes on."
        ),
    )
    breaker_min_records: int = Field(
        default=100,
        ge=1,
        description="STREAMML_BREAKER_MIN_RECORDS: a window with fewer records never trips it.",
    )
    # --- security (docs/security.md) ---------------------------------------------------
    secrets_dir: Path | None = Field(
        default=None,
        description=(
            "STREAMML_SECRETS_DIR: where secrets generated on first use are kept (mode 0600): "
            "the query token, the model signing key, the PII key, the dev broker's CA and "
            "passwords. Default: <cache_dir>/secrets (shared by the workers of this machine)."
        ),
    )
    query_token: SecretStr | None = Field(
        default=None,
        description=(
            "STREAMML_QUERY_TOKEN: bearer token of the worker's /query endpoint (and of "
            "`streamml query`). Default: read from STREAMML_QUERY_TOKEN_FILE, else generated."
        ),
    )
    query_token_file: Path | None = Field(
        default=None,
        description="STREAMML_QUERY_TOKEN_FILE: a file holding the /query token.",
    )
    query_table_functions: bool = Field(
        default=False,
        description=(
            "STREAMML_QUERY_TABLE_FUNCTIONS: allow /query to use table functions that reach "
            "files, URLs or other servers (file, url, s3, remote, ...). Off by default."
        ),
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT",
        description=(
            "STREAMML_KAFKA_SECURITY_PROTOCOL: how every streamml Kafka client connects. "
            "SASL_SSL for a secured cluster (and the dev broker with STREAMML_KAFKA_DEV_SECURITY)."
        ),
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        default="SCRAM-SHA-512", description="STREAMML_KAFKA_SASL_MECHANISM: the SASL mechanism."
    )
    kafka_sasl_username: str | None = Field(
        default=None, description="STREAMML_KAFKA_SASL_USERNAME: the SASL user."
    )
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="STREAMML_KAFKA_SASL_PASSWORD: the SASL password."
    )
    kafka_sasl_password_file: Path | None = Field(
        default=None,
        description="STREAMML_KAFKA_SASL_PASSWORD_FILE: a file holding the SASL password.",
    )
    kafka_ssl_cafile: Path | None = Field(
        default=None,
        description="STREAMML_KAFKA_SSL_CAFILE: CA certificate (PEM) the broker's must chain to.",
    )
    kafka_ssl_certfile: Path | None = Field(
        default=None, description="STREAMML_KAFKA_SSL_CERTFILE: client certificate (PEM), if any."
    )
    kafka_ssl_keyfile: Path | None = Field(
        default=None, description="STREAMML_KAFKA_SSL_KEYFILE: client private key (PEM), if any."
    )
    kafka_dev_security: bool = Field(
        default=False,
        description=(
            "STREAMML_KAFKA_DEV_SECURITY: the local broker listens with SASL/SCRAM over TLS, "
            "with a CA, certificates and a password generated into the secrets dir."
        ),
    )
    clickhouse_password: SecretStr | None = Field(
        default=None,
        description=(
            "STREAMML_CLICKHOUSE_PASSWORD: password for a ClickHouse server (overrides one in "
            "the DSN)."
        ),
    )
    clickhouse_password_file: Path | None = Field(
        default=None,
        description="STREAMML_CLICKHOUSE_PASSWORD_FILE: a file holding the ClickHouse password.",
    )
    clickhouse_ca_file: Path | None = Field(
        default=None,
        description="STREAMML_CLICKHOUSE_CA_FILE: CA certificate for an https:// ClickHouse DSN.",
    )
    model_signing_key: SecretStr | None = Field(
        default=None,
        description=(
            "STREAMML_MODEL_SIGNING_KEY: HMAC-SHA256 key that signs model artifacts at "
            "registration; workers refuse artifacts without a valid signature. Default: from "
            "STREAMML_MODEL_SIGNING_KEY_FILE, else generated in the secrets dir."
        ),
    )
    model_signing_key_file: Path | None = Field(
        default=None,
        description="STREAMML_MODEL_SIGNING_KEY_FILE: a file holding the model signing key.",
    )
    pii_key: SecretStr | None = Field(
        default=None,
        description=(
            "STREAMML_PII_KEY: key of the keyed hash of spec fields marked `pii: hash`. "
            "Default: from STREAMML_PII_KEY_FILE, else generated in the secrets dir."
        ),
    )
    pii_key_file: Path | None = Field(
        default=None, description="STREAMML_PII_KEY_FILE: a file holding the PII key."
    )
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        default="none",
        description="STREAMML_OTEL_EXPORTER: where spans go: none, console (stderr) or otlp.",
    )
    otel_endpoint: str | None = Field(
        default=None,
        description="STREAMML_OTEL_ENDPOINT: OTLP/HTTP traces endpoint, e.g. "
        "http://127.0.0.1:4318/v1/traces (default: the exporter's own default).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="STREAMML_LOG_LEVEL: debug, info, warning or error."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        hosts = [h.strip() for h in value.split(",")]
        bad = [h for h in hosts if not _HOSTPORT.match(h)]
        if bad:
            raise ValueError(f"expected host:port[,host:port], got {', '.join(bad)!s}")
        return ",".join(hosts)

    @field_validator("clickhouse_dsn")
    @classmethod
    def _check_dsn(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        scheme = urlsplit(value).scheme
        if scheme not in {"chdb", "http", "https", "clickhouse", "clickhouses"}:
            raise ValueError(
                f"scheme {scheme or '(none)'!r} is not supported; use chdb:///abs/path, "
                "http://host:8123 or https://host:8443"
            )
        return value

    @field_validator("clickhouse_database", "app_id")
    @classmethod
    def _check_identifier(cls, value: str) -> str:
        if not _IDENT.match(value):
            raise ValueError("must be letters, digits and underscores, not starting with a digit")
        return value

    @field_validator("state_dir", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _check_ports(self) -> Settings:
        if self.kafka_port == self.kafka_controller_port:
            raise ValueError(
                "STREAMML_KAFKA_PORT and STREAMML_KAFKA_CONTROLLER_PORT must differ "
                f"(both are {self.kafka_port})"
            )
        if self.heartbeat_interval_s * 3 > self.session_timeout_s:
            raise ValueError(
                "STREAMML_HEARTBEAT_INTERVAL_S must be at most a third of "
                "STREAMML_SESSION_TIMEOUT_S"
            )
        return self

    # --- derived values -------------------------------------------------------
    @property
    def uses_local_broker(self) -> bool:
        """True when streamml manages its own broker (no bootstrap configured)."""
        return self.kafka_bootstrap is None

    @property
    def bootstrap_servers(self) -> str:
        """Bootstrap address clients use: the configured cluster or the local broker."""
        return self.kafka_bootstrap or f"{LOCAL_HOST}:{self.kafka_port}"

    @property
    def warehouse_dsn(self) -> str:
        """DSN of the warehouse: the configured server or embedded chDB in the state dir."""
        return self.clickhouse_dsn or f"chdb://{self.state_dir / 'chdb'}"

    @property
    def registry_path(self) -> Path:
        return self.registry_dir or self.state_dir / "models"

    @property
    def secrets_path(self) -> Path:
        return self.secrets_dir or self.cache_dir / "secrets"

    @property
    def reports_path(self) -> Path:
        return self.reports_dir or self.state_dir / "reports"

    @property
    def embedded_warehouse(self) -> bool:
        return urlsplit(self.warehouse_dsn).scheme == "chdb"

    def effective(self) -> dict[str, Any]:
        """The effective configuration as plain values, secrets masked."""
        values: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "***"  # never printed
            values[name] = str(value) if isinstance(value, Path) else value
        values["clickhouse_dsn"] = mask_dsn(self.warehouse_dsn)
        values["kafka_bootstrap"] = self.bootstrap_servers
        return values


def mask_dsn(dsn: str) -> str:
    """Hide the password of a DSN.

    >>> mask_dsn("http://alice:s3cret@db:8123/x")
    'http://alice:***@db:8123/x'
    >>> mask_dsn("chdb:///var/lib/streamml/chdb")
    'chdb:///var/lib/streamml/chdb'
    """
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def env_name(field: str) -> str:
    """Environment variable of a settings field (``kafka_port`` -> ``STREAMML_KAFKA_PORT``)."""
    return ENV_PREFIX + field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Build and validate the settings, or raise a ConfigError saying what to fix."""
    config_file = os.environ.get(CONFIG_FILE_ENV)
    if config_file and not Path(config_file).is_file():
        raise ConfigError(
            f"{CONFIG_FILE_ENV}={config_file} does not exist",
            hint="point it at a TOML file or unset it",
        )
    _check_unknown_env()
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except ValueError as exc:  # e.g. a malformed TOML file
        raise ConfigError(f"cannot read configuration: {exc}") from None


# STREAMML_* variables that are not settings: read by the scripts and the tests.
NON_SETTING_ENV = frozenset({CONFIG_FILE_ENV, "STREAMML_VENV", "STREAMML_TEST_KAFKA_BOOTSTRAP"})


def _check_unknown_env() -> None:
    """A mistyped variable would silently fall back to a default: refuse it instead."""
    known = {env_name(f) for f in Settings.model_fields} | NON_SETTING_ENV
    for name in sorted(os.environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), sorted(known), n=1)
            hint = f"did you mean {close[0]}?" if close else "see `streamml config --help`"
            raise ConfigError(f"unknown environment variable {name}", hint=hint)


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = loc[0] if loc else ""
        given = err.get("input")
        if field in Settings.model_fields:
            where = f"{env_name(field)} (setting {field!r})"
        else:
            where = "configuration"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown setting {field!r}; known: {', '.join(sorted(Settings.model_fields))}"
            where = "configuration"
        shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
        lines.append(f"{where}: {msg}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def reference_markdown() -> str:
    """The settings reference as a markdown table (docs/configuration.md is this text)."""
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable; a TOML file named by "
        f"`{CONFIG_FILE_ENV}` may set the same fields (keys without the prefix). "
        "Variables win over the file. An invalid value or an unknown `STREAMML_*` "
        "variable stops every command at start with a message naming it. "
        "`streamml config` prints the effective values, secrets masked.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        if field.default_factory is not None:
            default = "see meaning"
        else:
            default = "(unset)" if field.default is None else f"`{field.default}`"
        meaning = (field.description or "").split(": ", 1)[-1]
        lines.append(f"| `{env_name(name)}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"

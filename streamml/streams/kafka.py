"""Thin aiokafka helpers that fail with a clear error instead of hanging.

Every call is bounded by ``Settings.request_timeout_s``; an unreachable or dead
broker becomes :class:`~streamml.errors.BrokerUnavailableError` naming the
address, never an endless retry loop. Every Kafka client of streamml gets its
security options (TLS, SASL) from :func:`client_options`, so one set of settings
secures them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from streamml.config import Settings
from streamml.errors import BrokerUnavailableError, ConfigError
from streamml.schemas.spec import PipelineSpec
from streamml.secrets import kafka_sasl_password

if TYPE_CHECKING:
    import faust.types.auth

T = TypeVar("T")
DEV_SASL_USERNAME = "streamml"  # the SCRAM user the dev broker is formatted with

DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs v1+: a value set on the topic itself


@dataclass(frozen=True)
class Message:
    """One consumed record, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class KafkaSecurity:
    """How a client connects: the protocol, SASL user and password, and TLS files."""

    protocol: str = "PLAINTEXT"
    mechanism: str = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None

    @property
    def uses_sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.protocol.endswith("SSL")


def dev_ca_file(settings: Settings) -> Path:
    """The CA certificate of the dev broker's TLS listener (see streamml.devstack.tls)."""
    return settings.secrets_path / "kafka" / "ca.crt"


def kafka_security(settings: Settings) -> KafkaSecurity:
    """The settings' Kafka security. With ``kafka_dev_security`` on, what is not set
    explicitly comes from the dev broker: SASL_SSL, user ``streamml``, its generated
    password and CA.

    >>> kafka_security(Settings()).protocol
    'PLAINTEXT'
    """
    protocol: str = settings.kafka_security_protocol
    username = settings.kafka_sasl_username
    cafile = settings.kafka_ssl_cafile
    if settings.kafka_dev_security:
        protocol = "SASL_SSL" if protocol == "PLAINTEXT" else protocol
        username = username or DEV_SASL_USERNAME
        cafile = cafile or dev_ca_file(settings)
    security = KafkaSecurity(
        protocol=protocol,
        mechanism=settings.kafka_sasl_mechanism,
        username=username,
        cafile=cafile,
        certfile=settings.kafka_ssl_certfile,
        keyfile=settings.kafka_ssl_keyfile,
    )
    if not security.uses_sasl:
        return security
    password = kafka_sasl_password(settings)
    if not username or password is None:
        raise ConfigError(
            f"STREAMML_KAFKA_SECURITY_PROTOCOL={protocol} needs a SASL user and password",
            hint="set STREAMML_KAFKA_SASL_USERNAME and STREAMML_KAFKA_SASL_PASSWORD "
            "(or STREAMML_KAFKA_SASL_PASSWORD_FILE)",
        )
    return replace(security, password=password)


def ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """A client TLS context that verifies the broker against ``cafile`` (or the system CAs)."""
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=security.cafile, certfile=security.certfile, keyfile=security.keyfile
        )
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in (security.cafile, security.certfile) if p)
        raise ConfigError(
            f"cannot load the Kafka TLS files ({files or 'system CAs'}): {exc}",
            hint="check STREAMML_KAFKA_SSL_CAFILE/CERTFILE/KEYFILE; with "
            "STREAMML_KAFKA_DEV_SECURITY the CA is made by `streamml up`",
        ) from None
    return context


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments that every AIOKafkaProducer/Consumer/AdminClient of streamml
    takes: the security protocol, the TLS context and the SASL credentials.

    >>> client_options(Settings())
    {'security_protocol': 'PLAINTEXT'}
    """
    security = kafka_security(settings)
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.uses_tls:
        options["ssl_context"] = ssl_context(security)
    if security.uses_sasl:
        options["sasl_mechanism"] = security.mechanism
        options["sasl_plain_username"] = security.username
        options["sasl_plain_password"] = security.password
    return options


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """The same security for the Faust app (``broker_credentials``); None for PLAINTEXT."""
    from faust.auth import SASLCredentials, SSLCredentials

    security = kafka_security(settings)
    context = ssl_context(security) if security.uses_tls else None
    if security.uses_sasl:
        return SASLCredentials(
            username=security.username,
            password=security.password,
            ssl_context=context,
            mechanism=security.mechanism,
        )
    return SSLCredentials(context) if context is not None else None


async def bounded(what: str, bootstrap: str, aw: Awaitable[T], timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(aw, timeout_s)
    except (TimeoutError, KafkaError, OSError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        raise BrokerUnavailableError(
            f"Kafka at {bootstrap} failed to {what} within {timeout_s:.0f} s ({reason})",
            hint="is the broker running (`streamml status`; `streamml up` starts it), and do "
            "STREAMML_KAFKA_SECURITY_PROTOCOL and the SASL/TLS settings match its listener? "
            "Retry once it is up",
        ) from exc


async def close_quietly(aw: Awaitable[object], timeout_s: float) -> None:
    """Closing must not hang on a dead broker either; what is lost is reported by the caller."""
    with contextlib.suppress(TimeoutError, KafkaError, OSError):
        await asyncio.wait_for(aw, timeout_s)


@asynccontextmanager
async def admin_client(settings: Settings) -> AsyncIterator[AIOKafkaAdminClient]:
    bootstrap = settings.bootstrap_servers
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        **client_options(settings),
    )
    await bounded("connect", bootstrap, admin.start(), settings.request_timeout_s)
    try:
        yield admin
    finally:
        await close_quietly(admin.close(), settings.request_timeout_s)


async def ensure_topics(
    settings: Settings,
    names: Iterable[str],
    partitions: int | None = None,
    config: dict[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    wanted = sorted(set(names))
    bootstrap = settings.bootstrap_servers
    async with admin_client(settings) as admin:
        existing = set(
            await bounded("list topics", bootstrap, admin.list_topics(), settings.request_timeout_s)
        )
        missing = [n for n in wanted if n not in existing]
        if not missing:
            return []
        new = [
            NewTopic(
                name,
                num_partitions=partitions or settings.topic_partitions,
                replication_factor=settings.topic_replication_factor,
                topic_configs=dict(config or {}),
            )
            for name in missing
        ]
        response = await bounded(
            "create topics", bootstrap, admin.create_topics(new), settings.request_timeout_s
        )
    raced = set()  # listed as missing, but made meanwhile (by another worker): not ours
    for topic, code, message in _topic_errors(response):
        if code == TopicAlreadyExistsError.errno:
            raced.add(topic)
        elif code:
            raise BrokerUnavailableError(
                f"creating topic {topic!r} failed: {message} (code {code})"
            )
    return [n for n in missing if n not in raced]


async def ensure_topic_config(settings: Settings, topic: str, config: dict[str, str]) -> bool:
    """Set ``config`` on an existing topic where it differs, keeping the topic's other
    settings; return whether it changed anything."""
    bootstrap, timeout_s = settings.bootstrap_servers, settings.request_timeout_s
    async with admin_client(settings) as admin:
        described = await bounded(
            f"describe topic {topic!r}",
            bootstrap,
            admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]),
            timeout_s,
        )
        current, overrides = _topic_configs(described[0])
        if all(current.get(k) == v for k, v in config.items()):
            return False
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs=overrides | config)
        altered = await bounded(
            f"configure topic {topic!r}", bootstrap, admin.alter_configs([resource]), timeout_s
        )
    for response in altered:
        for code, message, _type, name in getattr(response, "resources", []):
            if code:
                raise BrokerUnavailableError(
                    f"configuring topic {name!r} failed: {message} (code {code})"
                )
    return True


def _topic_configs(response: object) -> tuple[dict[str, str], dict[str, str]]:
    """All of a DescribeConfigs answer's values, and those set on the topic itself."""
    current: dict[str, str] = {}
    overrides: dict[str, str] = {}
    version = getattr(response, "API_VERSION", 0)
    for resource in getattr(response, "resources", []):
        code, message, _type, name, entries = resource[:5]
        if code:
            raise BrokerUnavailableError(f"describing topic {name!r} failed: {message}")
        for entry in entries:
            key, value = str(entry[0]), entry[1]
            if value is None:
                continue
            current[key] = str(value)
            # v0 says is_default; later versions say where the value comes from
            if (not entry[3]) if version == 0 else entry[3] == DYNAMIC_TOPIC_CONFIG:
                overrides[key] = str(value)
    return current, overrides


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    rows = getattr(response, "topic_errors", [])
    return [(str(r[0]), int(r[1]), r[2] if len(r) > 2 else None) for r in rows]


async def produce(
    settings: Settings,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes]],
    headers: Sequence[tuple[str, bytes]] = (),
) -> list[tuple[int, int]]:
    """Send key/value records with acks=all; return their (partition, offset)."""
    bootstrap = settings.bootstrap_servers
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        enable_idempotence=True,
        **client_options(settings),
    )
    await bounded("connect", bootstrap, producer.start(), settings.request_timeout_s)
    try:
        futures = [
            await producer.send(topic, value=value, key=key, headers=list(headers))
            for key, value in records
        ]
        metas = await bounded(
            f"acknowledge {len(futures)} records on {topic!r}",
            bootstrap,
            asyncio.gather(*futures),
            settings.request_timeout_s,
        )
    finally:
        await close_quietly(producer.stop(), settings.request_timeout_s)
    return [(m.partition, m.offset) for m in metas]


async def consume(
    settings: Settings,
    topics: Sequence[str],
    count: int,
    group_id: str | None = None,
    timeout_s: float | None = None,
) -> list[Message]:
    """Read ``count`` records from the start of ``topics``, or fail after ``timeout_s``."""
    bootstrap = settings.bootstrap_servers
    limit = timeout_s if timeout_s is not None else settings.request_timeout_s
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=group_id is not None,
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        session_timeout_ms=int(settings.session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.heartbeat_interval_s * 1000),
        **client_options(settings),
    )
    await bounded("connect", bootstrap, consumer.start(), settings.request_timeout_s)
    got: list[Message] = []
    deadline = time.monotonic() + limit
    try:
        while len(got) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnavailableError(
                    f"read {len(got)} of {count} records from {', '.join(topics)} at {bootstrap} "
                    f"within {limit:.0f} s",
                    hint="is the broker running and are the records produced?",
                )
            batch = await bounded(
                "fetch records",
                bootstrap,
                consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000)),
                left + 1.0,
            )
            for records in batch.values():
                got.extend(
                    Message(r.topic, r.partition, r.offset, r.key, r.value, tuple(r.headers))
                    for r in records
                )
    finally:
        await close_quietly(consumer.stop(), settings.request_timeout_s)
    return got[:count]


async def fetch_at(settings: Settings, topic: str, partition: int, offset: int) -> Message:
    """Read the one record at topic/partition/offset (no consumer group involved)."""
    from aiokafka import TopicPartition

    bootstrap = settings.bootstrap_servers
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        request_timeout_ms=int(settings.request_timeout_s * 1000),
        **client_options(settings),
    )
    await bounded("connect", bootstrap, consumer.start(), settings.request_timeout_s)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        record = await bounded(
            f"fetch {topic}[{partition}]@{offset}",
            bootstrap,
            consumer.getone(tp),
            settings.request_timeout_s,
        )
    finally:
        await close_quietly(consumer.stop(), settings.request_timeout_s)
    return Message(
        record.topic,
        record.partition,
        record.offset,
        record.key,
        record.value,
        tuple(record.headers),
    )


def state_topic_config(settings: Settings) -> dict[str, str]:
    """Topic settings of a pipeline's compacted state changelog.

    A restore reads all of it, so the cleaner must keep it near the live keys: expired
    entities, answered joins and matched labels are tombstoned there, and a tombstone
    removes older values only once its segment is closed (after ``segment.ms`` or
    ``segment.bytes``) and cleaned (when a quarter of the log is dirty, or after
    ``max.compaction.lag.ms``). Tombstones themselves stay ``delete.retention.ms``: twice
    the longest a restore may read (``read_latest`` gives up after max(60 s, the request
    timeout)), so a reader never misses the tombstone of a key it already read.

    >>> state_topic_config(Settings(request_timeout_s=15.0))["delete.retention.ms"]
    '120000'
    """
    retention_ms = int(2 * max(60.0, settings.request_timeout_s) * 1000)
    return {
        "cleanup.policy": "compact",
        "segment.ms": "30000",
        "segment.bytes": str(16 << 20),
        "min.cleanable.dirty.ratio": "0.25",
        "max.compaction.lag.ms": "60000",
        "delete.retention.ms": str(retention_ms),
    }


async def ensure_pipeline_topics(settings: Settings, specs: Iterable[PipelineSpec]) -> list[str]:
    """Create every topic of these pipelines, all with the pipeline's partition count
    (co-partitioning: raw, features, predictions and labels of a key meet in one worker);
    the state changelog with :func:`state_topic_config`, also when it exists already."""
    from streamml.streams.topics import CONTROL_TOPIC, pipeline_topics, state_topic

    created: list[str] = []
    for spec in specs:
        partitions = spec.topics.partitions or settings.topic_partitions
        created += await ensure_topics(settings, pipeline_topics(spec).values(), partitions)
        state, config = state_topic(settings.app_id, spec), state_topic_config(settings)
        new = await ensure_topics(settings, [state], partitions, config=config)
        if not new:  # made before, maybe by an older streamml: today's compaction settings
            await ensure_topic_config(settings, state, config)
        created += new
    created += await ensure_topics(settings, [CONTROL_TOPIC], partitions=1)
    return created

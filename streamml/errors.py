"""The one error tree of streamml.

Every error raised by streamml derives from :class:`StreamMLError`. Classes also
subclass the matching built-in where callers expect it (a bad setting is a
``ValueError``), and carry behaviour flags callers can act on:

* ``retriable`` -- trying the same call again later may succeed.
* ``hint`` -- one line telling the user what to do about it.

>>> err = PortInUseError("port 19092 on 127.0.0.1 is taken", hint="set STREAMML_KAFKA_PORT")
>>> isinstance(err, OSError), err.retriable
(True, False)
>>> str(err)
'port 19092 on 127.0.0.1 is taken (hint: set STREAMML_KAFKA_PORT)'
"""

from __future__ import annotations


class StreamMLError(Exception):
    """Base of every streamml error."""

    retriable: bool = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class ConfigError(StreamMLError, ValueError):
    """A setting or spec value is invalid; raised at start, before anything runs."""


class SpecError(ConfigError):
    """A pipeline spec is invalid (which key, what is wrong)."""


class ValidationError(StreamMLError, ValueError):
    """A record does not match its pipeline's schema (becomes a dead letter)."""


class DevStackError(StreamMLError, RuntimeError):
    """The local development stack (Kafka broker) could not be managed."""


class JavaNotFoundError(DevStackError):
    """No usable Java runtime for the local Kafka broker."""


class PortInUseError(DevStackError, OSError):
    """A port the local broker needs is already taken by another process."""


class ArtifactFetchError(DevStackError):
    """The Kafka broker jars could not be fetched from Maven Central."""

    retriable = True


class BrokerNotReadyError(DevStackError):
    """The local broker started but never answered metadata requests."""


class BrokerUnavailableError(StreamMLError, ConnectionError):
    """A Kafka broker could not be reached or stopped answering."""

    retriable = True


class WarehouseError(StreamMLError, RuntimeError):
    """ClickHouse (server or embedded chDB) refused a request."""


class WarehouseRefusedError(WarehouseError, ValueError):
    """ClickHouse refused the rows themselves (a value out of range, a null in a non-null
    column): writing the same rows again fails again. ``reason`` is the server's message."""

    retriable = False

    def __init__(self, message: str, *, reason: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


class WarehouseLockedError(WarehouseError):
    """The embedded chDB directory is owned by another process."""


class MigrationError(WarehouseError):
    """A schema migration failed or an applied migration was edited."""


class ModelError(StreamMLError, RuntimeError):
    """Batch training, evaluation or export of a model failed."""


class BackgroundProcessDied(ModelError):
    """The low-priority process for sampled language-model work died (killed, out of
    memory); it starts again with the next sample."""

    retriable = True


class TrainingError(ModelError):
    """Training could not run: too little data, a single class, a bad window."""


class OnnxParityError(ModelError):
    """The exported ONNX model does not reproduce the torch model within tolerance."""


class RegistryError(StreamMLError, RuntimeError):
    """The model registry refused an operation (unknown version, bad stage change)."""


class ArtifactIntegrityError(RegistryError):
    """A model artifact failed its checksum or feature-list check; it is not loaded."""

    version: str | None = None  # the refused version, when known

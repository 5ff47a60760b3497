"""Secrets: read from a setting or a file, or generated once into the secrets dir.

A secret is never printed: settings hold it as ``SecretStr`` (shown as ``***`` by
``streamml config``), and this module returns the plain text only to the code that uses
it. A generated secret is created atomically with mode 0600, so two processes starting
at once agree on one value.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> a = read_secret(None, None, d / "k")
>>> a == read_secret(None, None, d / "k") and len(a) == 64, oct((d / "k").stat().st_mode & 0o777)
(True, '0o600')
>>> read_secret(None, None, None) is None
True
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from streamml.errors import ConfigError

if TYPE_CHECKING:
    from streamml.config import Settings


def read_secret(
    value: SecretStr | None, file: Path | None, generated: Path | None, nbytes: int = 32
) -> str | None:
    """The secret: ``value`` if set, else the content of ``file``, else the content of
    ``generated`` (created with ``nbytes`` random bytes, hex, on first use); None when none
    of them is given."""
    if value is not None:
        return value.get_secret_value()
    if file is not None:
        try:
            text = file.read_text("utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the secret file {file}: {exc.strerror}",
                hint="check the path and that this user may read it",
            ) from None
        if not text:
            raise ConfigError(f"the secret file {file} is empty")
        return text
    if generated is None:
        return None
    return _generated(generated, nbytes)


def _generated(path: Path, nbytes: int) -> str:
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text("utf-8").strip()
        if text:
            return text
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(nbytes))
    try:
        os.link(tmp, path)  # fails if another process made it first: use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text("utf-8").strip()


# --- the project's secrets, each with its setting, its file and its generated default ---


def query_token(settings: Settings) -> str:
    """The /query bearer token (generated on first use)."""
    token = read_secret(
        settings.query_token, settings.query_token_file, settings.secrets_path / "query-token"
    )
    assert token is not None
    return token


def model_signing_key(settings: Settings) -> bytes:
    """The HMAC-SHA256 key that signs and verifies model artifacts."""
    key = read_secret(
        settings.model_signing_key,
        settings.model_signing_key_file,
        settings.secrets_path / "model-signing.key",
    )
    assert key is not None
    return key.encode()


def pii_key(settings: Settings) -> bytes:
    """The key of the keyed hash of PII fields."""
    key = read_secret(settings.pii_key, settings.pii_key_file, settings.secrets_path / "pii.key")
    assert key is not None
    return key.encode()


def clickhouse_password(settings: Settings) -> str | None:
    """The ClickHouse server password from settings or its file (None: the DSN's, if any)."""
    return read_secret(settings.clickhouse_password, settings.clickhouse_password_file, None)


def kafka_sasl_password(settings: Settings) -> str | None:
    """The Kafka SASL password from settings or its file; with the dev broker's security on
    and none given, the one generated for it."""
    generated = (
        settings.secrets_path / "kafka" / "password" if settings.kafka_dev_security else None
    )
    return read_secret(settings.kafka_sasl_password, settings.kafka_sasl_password_file, generated)

"""A local CA and the dev broker's TLS certificate, made once with the ``openssl`` command.

Everything lies in ``<secrets dir>/kafka`` (mode 0700, keys 0600) and is shared by the
dev brokers of this machine: clients trust ``ca.crt``; the broker serves ``broker.pem``
(its PKCS#8 key and certificate chain, Kafka's PEM keystore) for ``127.0.0.1`` and
``localhost``. A lock file keeps two processes from making two CAs at once.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streamml.errors import DevStackError

CA_DAYS = 3650
BROKER_DAYS = 825
RENEW_BEFORE_S = 7 * 86400
BROKER_NAMES = "IP:127.0.0.1,DNS:localhost"


@dataclass(frozen=True)
class DevTLS:
    """Paths of the dev broker's TLS material."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @property
    def broker_cert(self) -> Path:
        return self.directory / "broker.crt"

    @property
    def broker_key(self) -> Path:
        return self.directory / "broker.key"

    @property
    def broker_keystore(self) -> Path:
        """Key, certificate and CA in one PEM file (``ssl.keystore.type=PEM``)."""
        return self.directory / "broker.pem"


def ensure_dev_tls(directory: Path) -> DevTLS:
    """Make the CA and the broker certificate unless valid ones exist; return their paths."""
    tls = DevTLS(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(directory / ".tls.lock"):
        if not _valid(tls.ca_cert) or not tls.ca_key.exists():
            _make_ca(tls)
            tls.broker_cert.unlink(missing_ok=True)  # signed by the old CA
        if not _valid(tls.broker_cert) or not tls.broker_keystore.exists():
            _make_broker_cert(tls)
    return tls


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise DevStackError(
            "the openssl command is needed to make the dev broker's certificates",
            hint="install openssl (apt-get install openssl) and retry, or turn "
            "STREAMML_KAFKA_DEV_SECURITY off",
        )
    proc = subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0:
        raise DevStackError(
            f"openssl {args[0]} failed making the dev broker's certificates: "
            + proc.stderr.strip()[-1000:],
            hint=f"retrying will not help until the cause is fixed; remove {cwd} to start over",
        )


def _valid(cert: Path) -> bool:
    """The certificate exists and is still valid a week from now."""
    if not cert.exists():
        return False
    exe = shutil.which("openssl") or "openssl"
    proc = subprocess.run(
        [exe, "x509", "-checkend", str(RENEW_BEFORE_S), "-noout", "-in", str(cert)],
        capture_output=True,
        check=False,
        timeout=30,
    )
    return proc.returncode == 0


def _new_key(path: Path, cwd: Path) -> None:
    """An unencrypted PKCS#8 P-256 key, mode 0600 from the start."""
    path.unlink(missing_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-out", str(path), cwd=cwd,
    )  # fmt: skip


def _make_ca(tls: DevTLS) -> None:
    with tempfile.TemporaryDirectory(dir=tls.directory, prefix=".ca-") as tmp:
        work = Path(tmp)
        key, cert = work / "ca.key", work / "ca.crt"
        _new_key(key, work)
        _openssl(
            "req", "-x509", "-new", "-key", str(key), "-out", str(cert),
            "-days", str(CA_DAYS), "-subj", "/CN=streamml dev CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=work,
        )  # fmt: skip
        os.replace(key, tls.ca_key)
        os.replace(cert, tls.ca_cert)


def _make_broker_cert(tls: DevTLS) -> None:
    with tempfile.TemporaryDirectory(dir=tls.directory, prefix=".broker-") as tmp:
        work = Path(tmp)
        key, csr, cert, ext = (work / n for n in ("b.key", "b.csr", "b.crt", "ext.cnf"))
        _new_key(key, work)
        _openssl(
            "req", "-new", "-key", str(key), "-out", str(csr), "-subj", "/CN=localhost",
            cwd=work,
        )  # fmt: skip
        ext.write_text(
            f"subjectAltName={BROKER_NAMES}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n",
            "utf-8",
        )
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(tls.ca_cert), "-CAkey", str(tls.ca_key),
            "-set_serial", str(secrets.randbits(63)), "-days", str(BROKER_DAYS),
            "-extfile", str(ext), "-out", str(cert),
            cwd=work,
        )  # fmt: skip
        bundle = work / "b.pem"
        fd = os.open(bundle, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            for part in (key, cert, tls.ca_cert):
                out.write(part.read_text("utf-8"))
        os.replace(key, tls.broker_key)
        os.replace(bundle, tls.broker_keystore)
        os.replace(cert, tls.broker_cert)

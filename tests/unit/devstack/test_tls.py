"""The dev broker's CA, certificate and SCRAM set-up, without starting the broker."""

from __future__ import annotations

import base64
import hashlib
import socket
import ssl
import threading
from pathlib import Path

from streamml.config import load_settings
from streamml.devstack import LocalBroker
from streamml.devstack.broker import scram_credential
from streamml.devstack.tls import ensure_dev_tls


def test_the_broker_certificate_verifies_for_127_0_0_1(tmp_path: Path) -> None:
    tls = ensure_dev_tls(tmp_path / "kafka")
    assert oct(tls.ca_key.stat().st_mode & 0o777) == "0o600"
    assert oct(tls.broker_keystore.stat().st_mode & 0o777) == "0o600"
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls.broker_cert, tls.broker_key)
    client = ssl.create_default_context(cafile=tls.ca_cert)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.sendall(b"ok")

        thread = threading.Thread(target=accept)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            assert conn.recv(2) == b"ok"
        thread.join(5)


def test_valid_material_is_reused_not_remade(tmp_path: Path) -> None:
    first = ensure_dev_tls(tmp_path)
    ca = first.ca_cert.read_bytes()
    assert ensure_dev_tls(tmp_path).ca_cert.read_bytes() == ca


def test_scram_credential_is_rfc5802_salted_and_hides_the_password() -> None:
    arg = scram_credential("SCRAM-SHA-512", "streamml", "pw", salt=b"NaCl")
    salted = hashlib.pbkdf2_hmac("sha512", b"pw", b"NaCl", 8192)  # RFC 5802 Hi()
    assert f'saltedpassword="{base64.b64encode(salted).decode()}"' in arg
    assert arg.startswith("SCRAM-SHA-512=[name=streamml,iterations=8192,")
    assert "pw" not in arg.replace("password", "")


def test_secure_config_has_a_sasl_ssl_listener_and_is_private(tmp_path: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path, secrets_dir=tmp_path / "secrets", kafka_dev_security=True
    )
    broker = LocalBroker(settings)
    broker._write_config()
    path = broker.home / "server.properties"
    text = path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert f"listeners=SASL_SSL://127.0.0.1:{settings.kafka_port}," in text
    assert "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT" in text
    assert "ssl.keystore.type=PEM" in text and "sasl.enabled.mechanisms=" in text


def test_plain_config_is_unchanged(tmp_path: Path) -> None:
    broker = LocalBroker(load_settings(state_dir=tmp_path))
    broker._write_config()
    text = (broker.home / "server.properties").read_text()
    assert "listeners=PLAINTEXT://127.0.0.1:" in text
    assert "@LISTENER@" not in text and "@SECURITY@" not in text
    assert "sasl" not in text

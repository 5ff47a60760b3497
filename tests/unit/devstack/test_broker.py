from __future__ import annotations

import socket
from pathlib import Path

import pytest

from streamml.config import load_settings
from streamml.devstack import LocalBroker
from streamml.devstack.broker import check_port_free, new_cluster_id
from streamml.errors import PortInUseError


def test_cluster_ids_are_kraft_shaped() -> None:
    ids = {new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_port_check_sees_a_listener() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port}"):
            check_port_free(port)
    check_port_free(port)  # free again once closed


def test_status_of_a_fresh_state_dir_is_stopped(tmp_path: Path) -> None:
    broker = LocalBroker(load_settings(state_dir=tmp_path))
    assert broker.status().state == "stopped"
    assert broker.down() == "no local broker is running"


def test_stale_pid_file_is_reported_and_cleared(tmp_path: Path) -> None:
    broker = LocalBroker(load_settings(state_dir=tmp_path))
    broker.home.mkdir(parents=True)
    # pid 2**22 + 1 is above Linux's pid_max limit, so no process can have it
    broker.pid_file.write_text('{"pid": 4194305, "started_at": 0, "version": "4.4.0"}')
    assert broker.status().state == "stale"
    assert "already gone" in broker.down()
    assert not broker.pid_file.exists()

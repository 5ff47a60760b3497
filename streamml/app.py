"""The Faust app factory: Settings in, a configured ``faust.App`` out.

Nothing is created at import. :func:`create_app` builds the app with defaults
that suit one machine (rebalances in seconds, earliest offsets, memory stores
recovered from changelog topics), and :func:`run_worker` runs it in the
foreground until SIGTERM/SIGINT.
"""

from __future__ import annotations

import time
from typing import Any

import faust
from faust.web import Request, Response, View

from streamml.config import Settings


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app for these settings (no connection is made here)."""
    brokers = [f"kafka://{hostport}" for hostport in settings.bootstrap_servers.split(",")]
    app = faust.App(
        settings.app_id,
        broker=brokers,
        store="memory://",
        datadir=str(settings.state_dir / "faust"),
        autodiscover=False,
        web_enabled=True,
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication_factor,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_request_timeout=max(settings.request_timeout_s, settings.session_timeout_s + 5),
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        stream_wait_empty=False,
    )
    started = time.time()

    @app.page("/health")
    class Health(View):  # faust's page decorator registers the view
        async def get(self, request: Request, **_: Any) -> Response:
            # Ready once partitions are assigned and table state is recovered.
            tables: Any = app.tables  # the concrete TableManager has .recovery
            ready = tables.recovery.completed.is_set() and not app.rebalancing
            return self.json(
                {
                    "status": "ok" if ready else "starting",
                    "app_id": settings.app_id,
                    "bootstrap": settings.bootstrap_servers,
                    "uptime_s": round(time.time() - started, 3),
                    "assigned_partitions": len(app.consumer.assignment()),
                },
                status=200 if ready else 503,
            )

    return app


def run_worker(app: faust.App, log_level: str = "info") -> None:
    """Run the app's worker in the foreground (blocks until it is stopped)."""
    worker = faust.Worker(app, loglevel=log_level)
    worker.execute_from_commandline()

"""The Faust app factory: Settings and pipeline specs in, a configured ``faust.App`` out.

Nothing is created at import. :func:`create_app` builds the app with defaults that
suit one machine (rebalances in seconds, earliest offsets, memory stores recovered
from changelog topics) and registers, per pipeline, the agents of the data flow and
the warehouse sink; :func:`run_worker` runs it until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faust
from faust.web import Request, Response, View

from streamml import querysafety, telemetry
from streamml.agents.alerting import Alerting
from streamml.agents.engine import PipelineEngine
from streamml.agents.runtime import PipelineRuntime
from streamml.agents.trainer import Trainer
from streamml.config import Settings
from streamml.errors import WarehouseError
from streamml.querysafety import QueryRefused
from streamml.schemas.spec import PipelineSpec
from streamml.secrets import query_token
from streamml.streams.kafka import faust_credentials
from streamml.streams.sink import WarehouseSink
from streamml.streams.warehouse import QueryResult, Warehouse


def create_app(
    settings: Settings, specs: Sequence[PipelineSpec] = (), with_sink: bool = True
) -> faust.App:
    """Build the Faust app for these settings and pipelines (no connection is made here)."""
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
        producer_linger_ms=2,
        stream_wait_empty=False,
        broker_credentials=faust_credentials(settings),
    )
    # The data plane is PipelineEngine's own consumer groups; Faust's consumer would idle in
    # a busy loop on no subscriptions and steal the GIL from it (measured: 100-200 ms
    # stalls), so the app runs without one: web server, producer, tasks.
    app.producer_only = True
    started = time.time()
    tel = telemetry.setup(settings)
    runtimes = {
        spec.name: PipelineRuntime.from_spec(
            spec, settings.app_id, settings.topic_partitions, tel, settings
        )
        for spec in specs
    }
    engines = [PipelineEngine(settings, rt) for rt in runtimes.values()]
    by_name = {engine.rt.name: engine for engine in engines}
    for engine in engines:
        app.task(engine.run)
    state: dict[str, Any] = {"warehouse": None, "sink": None}
    warehouse_open = asyncio.Event()

    if with_sink and specs:

        @app.task  # type: ignore[untyped-decorator]
        async def warehouse_sink() -> None:
            warehouse = await asyncio.to_thread(Warehouse.connect, settings)
            sink = WarehouseSink(
                settings, specs, warehouse, settings.sink_max_rows, settings.sink_flush_interval_ms
            )
            state.update(warehouse=warehouse, sink=sink)
            warehouse_open.set()
            await sink.run()

        if settings.trainer_enabled:
            trainer_box: dict[str, Trainer] = {}

            @app.task  # type: ignore[untyped-decorator]
            async def trainer_and_alerts() -> None:
                """The trainer role and the alert rules, beside the warehouse they read."""
                await warehouse_open.wait()
                warehouse: Warehouse = state["warehouse"]
                trainer = trainer_box["trainer"] = Trainer(settings, specs, warehouse.query)
                await asyncio.gather(
                    trainer.run(), Alerting(settings, specs, warehouse.query).run()
                )

            state["trainer"] = trainer_box

    @app.page("/health")
    class Health(View):
        async def get(self, request: Request, **_: Any) -> Response:
            # Ready once every pipeline has its partitions and their state read back.
            ready = all(engine.ready.is_set() for engine in engines)
            sink_wanted = with_sink and bool(specs)
            ready = ready and (state["sink"] is not None or not sink_wanted)
            engines_health = {e.rt.name: e.health() for e in engines}
            sink_health = state["sink"].health() if state["sink"] is not None else None
            degraded = [
                f"{name}: waiting for Kafka ({h['kafka']['last_error']})"
                for name, h in engines_health.items()
                if h["kafka"]["degraded"]
            ] + [
                f"{name}: circuit breaker open for {', '.join(h['breaker_open'])}"
                for name, h in engines_health.items()
                if h["breaker_open"]
            ]
            if sink_health is not None and sink_health["status"] != "ok":
                degraded.append(f"sink: {sink_health.get('last_error') or sink_health['status']}")
            status = "starting" if not ready else "degraded" if degraded else "ok"
            return self.json(
                {
                    "status": status,
                    "degraded": degraded,
                    "app_id": settings.app_id,
                    "bootstrap": settings.bootstrap_servers,
                    "uptime_s": round(time.time() - started, 3),
                    "assigned_partitions": {e.rt.name: sorted(e.rt.states) for e in engines},
                    "pipelines": sorted(runtimes),
                    "engines": engines_health,
                    "sink": sink_health,
                },
                # degraded is alive and catching up by itself: not a reason to restart it
                status=200 if ready else 503,
            )

    @app.page("/metrics")
    class Metrics(View):
        """Counters and latency histograms per pipeline and step, Prometheus text format."""

        async def get(self, request: Request, **_: Any) -> Response:
            body, content_type = telemetry.prometheus_text()
            return self.bytes(body, content_type=content_type.split(";")[0])

    @app.page("/stats")
    class Stats(View):
        async def get(self, request: Request, **_: Any) -> Response:
            sink = state["sink"]
            return self.json(
                {
                    "pipelines": {
                        name: {
                            "counters": dict(rt.counters),
                            "annotator": None if rt.annotator is None else rt.annotator.describe(),
                            "deployment": by_name[name].deployment.describe(),
                            "prequential": {
                                str(p): {"learned": lr.learned, **lr.metric_values()}
                                for p, lr in rt.learners.items()
                            },
                        }
                        for name, rt in runtimes.items()
                    },
                    "trainer": {
                        name: status
                        for t in state.get("trainer", {}).values()
                        for name, status in t.status.items()
                    },
                    "sink": None
                    if sink is None
                    else {
                        "written": dict(sink.stats.written),
                        "flushes": sink.stats.flushes,
                        "failed_flushes": sink.stats.failed_flushes,
                        "bad_messages": sink.stats.bad_messages,
                        "invalid_labels": sink.stats.invalid_labels,
                        "dead_lettered": sink.stats.dead_lettered,
                        "dropped": sink.stats.dropped,
                    },
                }
            )

    @app.page("/query")
    class Query(View):
        """Run read-only SQL in this process, which owns the embedded warehouse: bearer
        token, JSON body, same origin only; see :mod:`streamml.querysafety`."""

        async def post(self, request: Request, **_: Any) -> Response:
            try:
                sql = await _checked_request(request, settings, token_box)
                warehouse = state["warehouse"]
                if warehouse is None:
                    return self.json(
                        _error("this worker has no warehouse open yet", retriable=True),
                        status=503,
                    )
                result = await asyncio.to_thread(_run_read_only, warehouse, settings, sql)
            except QueryRefused as exc:
                return self.json(_error(exc.message, hint=exc.hint), status=exc.status)
            except WarehouseError as exc:
                return self.json(_error(str(exc), retriable=exc.retriable), status=400)
            return self.json(
                {"columns": result.columns, "rows": [[_plain(v) for v in r] for r in result.rows]}
            )

    token_box: dict[str, str] = {}
    return app


# --- /query -------------------------------------------------------------------------------


async def _checked_request(request: Request, settings: Settings, token_box: dict[str, str]) -> str:
    """The SQL of a /query request, or :class:`QueryRefused` with the status to answer."""
    headers = request.headers
    allowed = querysafety.own_origins(settings.web_host, settings.web_port)
    why = querysafety.origin_refusal(headers.get("Origin"), headers.get("Sec-Fetch-Site"), allowed)
    if why is not None:
        raise QueryRefused(
            why, status=403, hint="/query answers only its own origin, never a web page"
        )
    if "token" not in token_box:
        token_box["token"] = await asyncio.to_thread(query_token, settings)
    if not querysafety.authorized(headers.get("Authorization"), token_box["token"]):
        raise QueryRefused(
            "missing or wrong bearer token",
            status=401,
            hint="send 'Authorization: Bearer <token>'; the token is STREAMML_QUERY_TOKEN, "
            "or the content of STREAMML_QUERY_TOKEN_FILE, or the file query-token in "
            "STREAMML_SECRETS_DIR",
        )
    if not querysafety.json_content_type(headers.get("Content-Type")):
        raise QueryRefused(
            "the body must be JSON", status=415, hint="send Content-Type: application/json"
        )
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("sql"), str):
        raise QueryRefused("the body must be a JSON object with a string 'sql'", status=400)
    return str(body["sql"])


def _run_read_only(warehouse: Warehouse, settings: Settings, sql: str) -> QueryResult:
    """Read how ClickHouse parses ``sql``, refuse what may not run, run the rest read-only."""
    return querysafety.run_read_only(
        warehouse.query, sql, table_functions=settings.query_table_functions
    )


def _error(message: str, hint: str | None = None, retriable: bool = False) -> dict[str, Any]:
    return {"error": message, "hint": hint, "retriable": retriable}


def _plain(value: Any) -> Any:
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def run_worker(app: faust.App, log_level: str = "info") -> None:
    """Run the app's worker in the foreground (blocks until it is stopped)."""
    Path(str(app.conf.datadir)).mkdir(parents=True, exist_ok=True)
    worker = faust.Worker(app, loglevel=log_level)
    worker.execute_from_commandline()

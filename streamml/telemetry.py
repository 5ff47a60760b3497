"""OpenTelemetry for the worker: a span per step, trace context in Kafka headers, and
counters and latency histograms per step, exposed in Prometheus format on /metrics.

Step names are the ones used everywhere else (``ingest``, ``score``, ``learn``, ``sink``).
Spans are exported only when ``STREAMML_OTEL_EXPORTER`` is ``console`` or ``otlp``; with
``none`` the tracer is OpenTelemetry's no-op and costs a few microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Counter, Histogram, Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from streamml.config import Settings

Headers = Sequence[tuple[str, bytes]]


@dataclass
class Telemetry:
    tracer: trace.Tracer
    records: Counter
    latency_ms: Histogram
    enabled: bool

    def count(self, pipeline: str, step: str, outcome: str, n: int = 1) -> None:
        self.records.add(n, {"pipeline": pipeline, "step": step, "outcome": outcome})

    def observe(self, pipeline: str, step: str, ms: float) -> None:
        self.latency_ms.record(ms, {"pipeline": pipeline, "step": step})


_process_telemetry: Telemetry | None = None


def setup(settings: Settings) -> Telemetry:
    """Providers for this process: spans to the configured exporter, metrics to /metrics.

    Built once per process (the Prometheus registry is process-wide)."""
    global _process_telemetry
    if _process_telemetry is None:
        _process_telemetry = _build(settings)
    return _process_telemetry


def _build(settings: Settings) -> Telemetry:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    resource = Resource.create({"service.name": settings.app_id})
    enabled = settings.otel_exporter != "none"
    tracer_provider = TracerProvider(resource=resource)
    if enabled:
        tracer_provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
    meter_provider = MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()])
    meter: Meter = meter_provider.get_meter("streamml")
    tracer = tracer_provider.get_tracer("streamml") if enabled else trace.NoOpTracer()
    return Telemetry(
        tracer=tracer,
        records=meter.create_counter(
            "streamml_records", unit="1", description="records handled, by step and outcome"
        ),
        latency_ms=meter.create_histogram(
            "streamml_step_latency", unit="ms", description="time spent in a step per record"
        ),
        enabled=enabled,
    )


def _exporter(settings: Settings) -> SpanExporter:
    if settings.otel_exporter == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return (
        OTLPSpanExporter(endpoint=settings.otel_endpoint)
        if settings.otel_endpoint
        else (OTLPSpanExporter())
    )


def extract(headers: Iterable[tuple[str, bytes]] | Mapping[str, bytes] | None) -> Context:
    """The trace context a producer put in the Kafka headers (W3C traceparent)."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    carrier = {k: v.decode("latin-1") for k, v in items if isinstance(v, bytes | bytearray)}
    return propagate.extract(carrier)


def inject() -> list[tuple[str, bytes]]:
    """Kafka headers carrying the current span's context to the next step."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(k, v.encode("latin-1")) for k, v in carrier.items()]


def trace_id() -> str:
    """The current trace id as 32 hex digits, or "" outside a recorded span."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def prometheus_text() -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

"""Every SQL query streamml runs on its own behalf, in one place, parameterized.

A query is a :class:`Query`: text with ClickHouse ``{name:Type}`` placeholders and the
values for them, sent apart from the text (clickhouse-connect server-side binding, which
chDB supports too), so a value -- an event id from a producer, a pipeline name, a model
version -- is never parsed as SQL. Identifiers are never values: tables and columns are
fixed in the text, and a name that must be spliced in passes :func:`identifier` first.

>>> q = served_rows("demo", "pay-7-")
>>> q.parameters
{'pipeline': 'demo', 'prefix': 'pay-7-', 'start': 7}
>>> Query("SELECT {id:String}", {"id": "a\\\\'; DROP TABLE t; --"}).render()
"SELECT CAST('a\\\\\\\\\\\\'; DROP TABLE t; --' AS String)"
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clickhouse_connect.driver.binding import format_query_value

from streamml.errors import ValidationError

if TYPE_CHECKING:
    from streamml.streams.warehouse import QueryResult

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*):([A-Za-z0-9_]+(?:\([A-Za-z0-9_, ']*\))?)\}")
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

# What runs a query: ``Warehouse.query`` or ``run_query`` bound to settings.
Runner = Callable[[str, dict[str, Any]], "QueryResult"]


@dataclass(frozen=True)
class Query:
    """SQL text with ``{name:Type}`` placeholders, and a value for each of them."""

    text: str
    parameters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        named = {m.group(1): m.group(2) for m in PLACEHOLDER.finditer(self.text)}
        if set(named) != set(self.parameters):
            raise ValueError(
                f"placeholders {sorted(named)} do not match parameters {sorted(self.parameters)}"
            )
        if "Identifier" in named.values():
            raise ValueError("identifiers are not parameters: validate them with identifier()")

    def render(self) -> str:
        """The text with each value written in as an escaped, typed literal (client-side
        binding, with clickhouse-connect's escaping), for a transport that takes text only
        (a worker's ``/query`` endpoint)."""

        def literal(m: re.Match[str]) -> str:
            return f"CAST({format_query_value(self.parameters[m.group(1)])} AS {m.group(2)})"

        return PLACEHOLDER.sub(literal, self.text)


def run(runner: Runner, query: Query) -> QueryResult:
    """Run ``query`` with ``runner`` (e.g. ``warehouse.query``)."""
    return runner(query.text, query.parameters)


def identifier(name: str) -> str:
    """``name`` if it is a plain identifier (letters, digits, underscores), else an error.

    >>> identifier("predictions")
    'predictions'
    >>> identifier("t; DROP TABLE x")
    Traceback (most recent call last):
    ...
    streamml.errors.ValidationError: not a plain SQL identifier: 't; DROP TABLE x'
    """
    if not IDENTIFIER.match(name):
        raise ValidationError(f"not a plain SQL identifier: {name!r}")
    return name


def count_rows(table: str) -> Query:
    """How many rows a table holds (``table`` must be a plain identifier)."""
    return Query(f"SELECT count() FROM {identifier(table)}")


def count_of(query: Query) -> Query:
    """How many rows ``query`` returns."""
    return Query(f"SELECT count() FROM ({query.text})", dict(query.parameters))


# --- training ------------------------------------------------------------------------
def _latest_features(where: list[str]) -> str:
    """Each event's latest feature vector and event time within ``where`` (the training
    window's conditions), one row per event_id."""
    return f"""
        SELECT event_id, argMax(ts, inserted_at) AS event_ts,
               argMax(features, inserted_at) AS features
        FROM features WHERE {" AND ".join(where)} GROUP BY event_id"""


def _training_window(
    params: dict[str, Any], since_ms: int | None, until_ms: int | None, cutoff_ms: int | None
) -> tuple[list[str], str]:
    """The features' event-time conditions and the labels' point-in-time condition of a
    training window (adds their parameters to ``params``)."""
    where = ["pipeline = {pipeline:String}"]
    if since_ms is not None:
        where.append("ts >= fromUnixTimestamp64Milli({since_ms:Int64})")
        params["since_ms"] = int(since_ms)
    if until_ms is not None:
        where.append("ts < fromUnixTimestamp64Milli({until_ms:Int64})")
        params["until_ms"] = int(until_ms)
    known = ""
    if cutoff_ms:
        known = "AND inserted_at <= fromUnixTimestamp64Milli({cutoff_ms:Int64})"
        params["cutoff_ms"] = int(cutoff_ms)
    return where, known


def training_rows(
    pipeline: str,
    since_ms: int | None = None,
    until_ms: int | None = None,
    cutoff_ms: int | None = None,
    last_events: int | None = None,
) -> Query:
    """(event_id, ts_ms, features, label): features joined with labels, point-in-time
    correct -- each event's features as computed at event time, only labels known by
    ``cutoff_ms`` -- optionally only the latest ``last_events``."""
    params: dict[str, Any] = {"pipeline": pipeline}
    where, known = _training_window(params, since_ms, until_ms, cutoff_ms)
    limit = ""
    if last_events:
        limit = "ORDER BY ts_ms DESC LIMIT {last_events:UInt64}"
        params["last_events"] = int(last_events)
    text = f"""
        SELECT event_id, ts_ms, features, label FROM (
            SELECT f.event_id AS event_id, toUnixTimestamp64Milli(f.event_ts) AS ts_ms,
                   f.features AS features, l.label AS label
            FROM ({_latest_features(where)}) AS f
            INNER JOIN (
                SELECT event_id, argMax(label, inserted_at) AS label
                FROM labels WHERE pipeline = {{pipeline:String}} {known} GROUP BY event_id
            ) AS l ON f.event_id = l.event_id
            {limit}
        ) ORDER BY ts_ms, event_id"""
    return Query(text, params)


def weak_training_rows(
    pipeline: str,
    source: str,
    since_ms: int | None = None,
    until_ms: int | None = None,
    cutoff_ms: int | None = None,
) -> Query:
    """(event_id, ts_ms, features, label, confidence): events with a weak label from
    ``source`` and no true label known by ``cutoff_ms`` (what training may add to its
    training part, weighted by confidence)."""
    params: dict[str, Any] = {"pipeline": pipeline, "source": source}
    where, known = _training_window(params, since_ms, until_ms, cutoff_ms)
    text = f"""
        SELECT f.event_id AS event_id, toUnixTimestamp64Milli(f.event_ts) AS ts_ms,
               f.features AS features, a.label AS label, a.confidence AS confidence
        FROM ({_latest_features(where)}) AS f
        INNER JOIN (
            SELECT event_id, argMax(label, inserted_at) AS label,
                   argMax(confidence, inserted_at) AS confidence
            FROM annotations WHERE pipeline = {{pipeline:String}} AND source = {{source:String}}
            {known} GROUP BY event_id
        ) AS a ON f.event_id = a.event_id
        WHERE f.event_id NOT IN (
            SELECT event_id FROM labels WHERE pipeline = {{pipeline:String}} {known}
        )
        ORDER BY ts_ms, event_id"""
    return Query(text, params)


def served_scores(pipeline: str, version: str, event_ids: Sequence[str]) -> Query:
    """(event_id, score, probabilities) that ``version`` served for these events."""
    return Query(
        "SELECT event_id, any(score), any(probabilities) FROM predictions "
        "WHERE pipeline = {pipeline:String} AND model_version = {version:String} "
        "AND event_id IN {event_ids:Array(String)} GROUP BY event_id",
        {"pipeline": pipeline, "version": version, "event_ids": list(event_ids)},
    )


# --- judgement -----------------------------------------------------------------------
_LABELS = (
    "SELECT event_id, argMax(label, inserted_at) AS label, "
    "argMax(label_value, inserted_at) AS label_value "
    "FROM labels WHERE pipeline = {pipeline:String} GROUP BY event_id"
)


def served_errors(pipeline: str, since_ms: int, last_events: int) -> Query:
    """(t, predicted_class, score, label, label_value) of the latest ``last_events``
    labelled events the serving model answered, with event time at or after ``since_ms``."""
    return Query(
        f"""
        SELECT toUnixTimestamp64Milli(p.event_ts) AS t, p.predicted_class, p.score, l.label,
               l.label_value
        FROM (SELECT event_id, any(ts) AS event_ts, any(predicted_class) AS predicted_class,
                     any(score) AS score
              FROM predictions
              WHERE pipeline = {{pipeline:String}} AND served = 1
                AND ts >= fromUnixTimestamp64Milli({{since_ms:Int64}})
              GROUP BY event_id) AS p
        INNER JOIN ({_LABELS}) AS l ON p.event_id = l.event_id
        ORDER BY t DESC, p.event_id DESC
        LIMIT {{last_events:UInt64}}""",
        {"pipeline": pipeline, "since_ms": int(since_ms), "last_events": int(last_events)},
    )


def judged_predictions(pipeline: str, versions: Sequence[str], since_ms: int, recent: int) -> Query:
    """(event_id, version, ts_ms, predicted_class, score, label, label_value) of each of
    ``versions`` on the latest ``recent`` events (event time from ``since_ms``) that have
    a label."""
    return Query(
        f"""
        SELECT p.event_id, p.model_version, toUnixTimestamp64Milli(p.event_ts),
               p.predicted_class, p.score, l.label, l.label_value
        FROM (SELECT event_id, model_version, any(ts) AS event_ts,
                     any(predicted_class) AS predicted_class, any(score) AS score
              FROM predictions
              WHERE pipeline = {{pipeline:String}} AND model_version IN {{versions:Array(String)}}
                AND ts >= fromUnixTimestamp64Milli({{since_ms:Int64}})
                AND event_id IN (SELECT event_id FROM predictions
                                 WHERE pipeline = {{pipeline:String}}
                                 AND ts >= fromUnixTimestamp64Milli({{since_ms:Int64}})
                                 ORDER BY ts DESC LIMIT {{recent:UInt64}})
              GROUP BY event_id, model_version) AS p
        INNER JOIN ({_LABELS}) AS l ON p.event_id = l.event_id""",
        {
            "pipeline": pipeline,
            "versions": list(versions),
            "since_ms": int(since_ms),
            "recent": int(recent),
        },
    )


def served_rows(pipeline: str, prefix: str) -> Query:
    """(index, version, served, predicted class, label) of every model on every labelled
    event whose id is ``<prefix><index>``."""
    return Query(
        """
        SELECT toUInt64(substring(p.event_id, {start:UInt64})) AS i, p.model_version,
               p.served, p.predicted_class, l.label
        FROM (SELECT event_id, model_version, max(served) AS served,
                     any(predicted_class) AS predicted_class
              FROM predictions
              WHERE pipeline = {pipeline:String} AND startsWith(event_id, {prefix:String})
              GROUP BY event_id, model_version) AS p
        INNER JOIN (SELECT event_id, argMax(label, inserted_at) AS label FROM labels
                    WHERE pipeline = {pipeline:String} GROUP BY event_id) AS l
        ON p.event_id = l.event_id""",
        {"pipeline": pipeline, "prefix": prefix, "start": len(prefix.encode()) + 1},
    )


# --- alert rules ---------------------------------------------------------------------
MODEL_METRICS = ("accuracy", "f1", "roc_auc", "rmse", "mae")
_SINCE = "now64(3) - toIntervalMillisecond({window_ms:Int64})"


def alert_metric(pipeline: str, metric: str, window_s: float) -> Query | None:
    """(value, n) of an alert rule's metric over its window; None for one not measured
    in the warehouse (consumer lag)."""
    params: dict[str, Any] = {"pipeline": pipeline, "window_ms": int(window_s * 1000)}
    if metric in MODEL_METRICS:
        return Query(
            "SELECT sum(value * n) / sum(n), sum(n) FROM metrics FINAL "
            "WHERE pipeline = {pipeline:String} AND role = 'champion' "
            f"AND metric = {{metric:String}} AND updated_at >= {_SINCE}",
            {**params, "metric": metric},
        )
    if metric == "dead_letter_rate":
        return Query(
            "SELECT d / greatest(d + p, 1), d + p FROM ("
            "SELECT (SELECT count() FROM dead_letters WHERE pipeline = {pipeline:String} "
            f"AND inserted_at >= {_SINCE}) AS d, (SELECT count() FROM predictions WHERE "
            f"pipeline = {{pipeline:String}} AND served = 1 AND inserted_at >= {_SINCE}) AS p)",
            params,
        )
    if metric == "p99_latency_ms":
        return Query(
            "SELECT quantile(0.99)(e2e_latency_ms), count() FROM predictions WHERE "
            f"pipeline = {{pipeline:String}} AND served = 1 AND inserted_at >= {_SINCE}",
            params,
        )
    return None


# --- the demo's report and the benchmarks --------------------------------------------
_FROM_MS = "fromUnixTimestamp64Milli({since_ms:Int64})"


def _run(pipeline: str, since_ms: int) -> dict[str, Any]:
    return {"pipeline": pipeline, "since_ms": int(since_ms)}


def demo_progress(pipeline: str, prefix: str, since_ms: int) -> Query:
    """(events of this run in the warehouse, dead letters since the run began)."""
    return Query(
        "SELECT (SELECT uniqExact(event_id) FROM predictions WHERE pipeline = "
        "{pipeline:String} AND startsWith(event_id, {prefix:String})), "
        "(SELECT count() FROM dead_letters FINAL WHERE pipeline = {pipeline:String} "
        f"AND ts >= {_FROM_MS})",
        {**_run(pipeline, since_ms), "prefix": prefix},
    )


def accuracy_per_minute(pipeline: str, prefix: str) -> Query:
    """(minute, n, accuracy) of the served answers to this run's events."""
    return Query(
        """
        SELECT toStartOfMinute(p.ts) AS minute, count() AS n,
               round(avg(p.predicted_class = l.label), 3) AS accuracy
        FROM (SELECT event_id, ts, predicted_class FROM predictions FINAL
              WHERE pipeline = {pipeline:String} AND startsWith(event_id, {prefix:String})
              AND served = 1) AS p
        INNER JOIN (SELECT event_id, label FROM labels FINAL
                    WHERE pipeline = {pipeline:String}) AS l
        USING event_id
        GROUP BY minute ORDER BY minute""",
        {"pipeline": pipeline, "prefix": prefix},
    )


def latency_quantiles(pipeline: str, prefix: str) -> Query:
    """p50/p99 of scoring and of event-to-prediction latency, and the answers counted."""
    return Query(
        """
        SELECT quantile(0.5)(latency_ms), quantile(0.99)(latency_ms),
               quantile(0.5)(e2e_latency_ms), quantile(0.99)(e2e_latency_ms), count()
        FROM predictions FINAL WHERE pipeline = {pipeline:String}
        AND startsWith(event_id, {prefix:String}) AND served = 1""",
        {"pipeline": pipeline, "prefix": prefix},
    )


def dead_letter_causes(pipeline: str, since_ms: int) -> Query:
    """(error_class, n, example reason) of the dead letters since ``since_ms``."""
    return Query(
        "SELECT error_class, count() AS n, any(reason) AS example FROM dead_letters FINAL "
        f"WHERE pipeline = {{pipeline:String}} AND ts >= {_FROM_MS} "
        "GROUP BY error_class ORDER BY n DESC",
        _run(pipeline, since_ms),
    )


def audit_trail(pipeline: str, since_ms: int) -> Query:
    """(at, action, version, previous, why) of the lifecycle's audit events."""
    return Query(
        """
        SELECT formatDateTime(ts, '%H:%i:%S') AS at, action, version, previous,
               substring(reason, 1, 70) AS why
        FROM audit_events FINAL WHERE pipeline = {pipeline:String}
        AND ts >= fromUnixTimestamp64Milli({since_ms:Int64})
        AND action NOT IN ('drift_detected', 'alert') ORDER BY ts, action""",
        _run(pipeline, since_ms),
    )


def drift_summary(pipeline: str, since_ms: int) -> Query:
    """(kind, detector, target, n, first) of the drift events."""
    return Query(
        "SELECT kind, detector, target, count() AS n, min(ts) AS first FROM drift_events FINAL "
        f"WHERE pipeline = {{pipeline:String}} AND ts >= {_FROM_MS} "
        "GROUP BY kind, detector, target ORDER BY first",
        _run(pipeline, since_ms),
    )


def role_accuracy(pipeline: str, since_ms: int) -> Query:
    """(model_version, role, labelled, accuracy) from the windowed metrics."""
    return Query(
        """
        SELECT model_version, role, sum(n) AS labelled,
               round(sum(value * n) / sum(n), 3) AS accuracy
        FROM metrics FINAL WHERE pipeline = {pipeline:String} AND metric = 'accuracy'
        AND window_start >= toStartOfMinute(fromUnixTimestamp64Milli({since_ms:Int64}))
        GROUP BY model_version, role ORDER BY min(window_start), role""",
        _run(pipeline, since_ms),
    )


def first_detail_ms(table: str, key: str, pipeline: str, since_ms: int, **match: str) -> Query:
    """The least ``details.<key>`` (ms) of the rows of an events table (``audit_events``
    or ``drift_events``) since ``since_ms`` whose columns equal ``match``."""
    if table not in ("audit_events", "drift_events"):
        raise ValidationError(f"not an events table: {table!r}")
    where = "".join(f" AND {identifier(c)} = {{m_{c}:String}}" for c in match)
    return Query(
        f"SELECT min(JSONExtractInt(details, {{key:String}})) FROM {table} FINAL "
        f"WHERE pipeline = {{pipeline:String}} AND ts >= {_FROM_MS}{where}",
        {**_run(pipeline, since_ms), "key": key, **{f"m_{c}": v for c, v in match.items()}},
    )


def first_promotion_ms(
    pipeline: str, since_ms: int, reason_prefix: str, version_prefix: str
) -> Query:
    """When the first promotion since ``since_ms`` with a reason and version starting so
    was made (ms)."""
    return Query(
        "SELECT toUnixTimestamp64Milli(ts) FROM audit_events FINAL "
        f"WHERE pipeline = {{pipeline:String}} AND action = 'promoted' AND ts >= {_FROM_MS} "
        "AND startsWith(reason, {reason_prefix:String}) "
        "AND startsWith(version, {version_prefix:String}) ORDER BY ts LIMIT 1",
        {
            **_run(pipeline, since_ms),
            "reason_prefix": reason_prefix,
            "version_prefix": version_prefix,
        },
    )


def first_served_after_ms(pipeline: str, prefix: str, after_ms: int) -> Query:
    """The event time (ms) of the first answer served after ``after_ms`` (insert time)."""
    return Query(
        "SELECT toUnixTimestamp64Milli(min(ts)) FROM predictions "
        "WHERE pipeline = {pipeline:String} AND startsWith(event_id, {prefix:String}) "
        "AND served = 1 AND inserted_at >= fromUnixTimestamp64Milli({after_ms:Int64})",
        {"pipeline": pipeline, "prefix": prefix, "after_ms": int(after_ms)},
    )


def served_events(pipeline: str, prefix: str) -> Query:
    """How many events with ids starting ``prefix`` were answered."""
    return Query(
        "SELECT count() FROM (SELECT event_id FROM predictions WHERE pipeline = "
        "{pipeline:String} AND served = 1 AND startsWith(event_id, {prefix:String}) "
        "GROUP BY event_id)",
        {"pipeline": pipeline, "prefix": prefix},
    )


def audit_details(pipeline: str) -> Query:
    """(action, details, ts_ms) of every audit event of a pipeline, oldest first."""
    return Query(
        "SELECT action, details, toUnixTimestamp64Milli(ts) FROM audit_events FINAL "
        "WHERE pipeline = {pipeline:String} ORDER BY ts",
        {"pipeline": pipeline},
    )


# --- streamml ask: the vetted templates ----------------------------------------------
# Each answers one kind of question about one pipeline, read-only; `streamml ask` picks
# one by meaning and fills in the parameters. Times are event time, as ms since the epoch,
# over [start_ms, end_ms); version '' means every model version.
_ASK_RANGE = (
    "{col} >= fromUnixTimestamp64Milli({{start_ms:Int64}}) "
    "AND {col} < fromUnixTimestamp64Milli({{end_ms:Int64}})"
)
_ASK_VERSION = "({{version:String}} = '' OR {col} = {{version:String}})"


def _ask(pipeline: str, start_ms: int, end_ms: int, **more: Any) -> dict[str, Any]:
    return {"pipeline": pipeline, "start_ms": int(start_ms), "end_ms": int(end_ms), **more}


def _in_range(col: str = "ts") -> str:
    return _ASK_RANGE.format(col=col)


def _of_version(col: str = "model_version") -> str:
    return _ASK_VERSION.format(col=col)


def ask_served_accuracy(pipeline: str, start_ms: int, end_ms: int, version: str) -> Query:
    """(hour, model_version, labelled, accuracy) of the served answers that have a label."""
    return Query(
        f"""
        SELECT toStartOfHour(p.ts) AS hour, p.model_version AS model_version,
               count() AS labelled, round(avg(p.predicted_class = l.label), 4) AS accuracy
        FROM (SELECT event_id, ts, model_version, predicted_class FROM predictions FINAL
              WHERE pipeline = {{pipeline:String}} AND served = 1
              AND {_in_range()} AND {_of_version()}) AS p
        INNER JOIN (SELECT event_id, label FROM labels FINAL
                    WHERE pipeline = {{pipeline:String}}) AS l ON p.event_id = l.event_id
        GROUP BY hour, model_version ORDER BY hour, model_version""",
        _ask(pipeline, start_ms, end_ms, version=version),
    )


def ask_drift_events(pipeline: str, start_ms: int, end_ms: int, version: str, limit: int) -> Query:
    """The latest drift detections: when, on which model, kind, detector and statistic."""
    return Query(
        f"""
        SELECT ts, model_version, kind, detector, target, round(statistic, 4) AS statistic,
               round(threshold, 4) AS threshold
        FROM drift_events FINAL
        WHERE pipeline = {{pipeline:String}} AND {_in_range()} AND {_of_version()}
        ORDER BY ts DESC, drift_id LIMIT {{limit:UInt32}}""",
        _ask(pipeline, start_ms, end_ms, version=version, limit=int(limit)),
    )


def ask_dead_letters(pipeline: str, start_ms: int, end_ms: int) -> Query:
    """(error_class, n, first, last, example reason) of the dead letters."""
    return Query(
        f"""
        SELECT error_class, count() AS n, min(ts) AS first, max(ts) AS last,
               argMin(reason, ts) AS example
        FROM dead_letters FINAL WHERE pipeline = {{pipeline:String}} AND {_in_range()}
        GROUP BY error_class ORDER BY n DESC, error_class""",
        _ask(pipeline, start_ms, end_ms),
    )


def ask_champion_vs_challengers(pipeline: str, start_ms: int, end_ms: int, version: str) -> Query:
    """Accuracy and ROC AUC per model version and role from the per-minute metrics,
    weighted by the labels each minute counted; the champion first (and kept when one
    challenger ``version`` is named)."""

    def weighted(metric: str) -> str:
        return (
            f"round(sumIf(value * n, metric = '{metric}')\n"
            f"                     / nullIf(sumIf(n, metric = '{metric}'), 0), 4)"
        )

    return Query(
        f"""
        SELECT model_version, role,
               {weighted("accuracy")} AS accuracy,
               {weighted("roc_auc")} AS roc_auc,
               sumIf(n, metric = 'accuracy') AS labelled,
               min(window_start) AS first_minute, max(window_start) AS last_minute
        FROM metrics FINAL
        WHERE pipeline = {{pipeline:String}} AND {_in_range("window_start")}
        AND ({_of_version()} OR role = 'champion')
        GROUP BY model_version, role
        ORDER BY role = 'champion' DESC, model_version, role""",
        _ask(pipeline, start_ms, end_ms, version=version),
    )


def ask_latency(pipeline: str, start_ms: int, end_ms: int, version: str) -> Query:
    """p50/p95/p99 of scoring latency and of event-to-prediction latency per model."""
    cols = ",\n               ".join(
        f"round(quantile({q})({c}), 3) AS {name}_p{int(q * 100)}"
        for c, name in (("latency_ms", "score"), ("e2e_latency_ms", "e2e"))
        for q in (0.5, 0.95, 0.99)
    )
    return Query(
        f"""
        SELECT model_version, role, count() AS predictions, {cols}
        FROM predictions FINAL
        WHERE pipeline = {{pipeline:String}} AND {_in_range()} AND {_of_version()}
        GROUP BY model_version, role ORDER BY model_version, role""",
        _ask(pipeline, start_ms, end_ms, version=version),
    )


def ask_volume(pipeline: str, start_ms: int, end_ms: int, version: str, bucket_s: int) -> Query:
    """Per time bucket: events answered (served) and predictions made by every model."""
    return Query(
        f"""
        SELECT toStartOfInterval(ts, toIntervalSecond({{bucket_s:UInt32}})) AS bucket,
               countIf(served = 1) AS served, count() AS predictions
        FROM predictions FINAL
        WHERE pipeline = {{pipeline:String}} AND {_in_range()} AND {_of_version()}
        GROUP BY bucket ORDER BY bucket""",
        _ask(pipeline, start_ms, end_ms, version=version, bucket_s=int(bucket_s)),
    )


def ask_alerts_firing(pipeline: str) -> Query:
    """The alert rules whose latest transition is 'firing': since when, value, threshold."""
    return Query(
        """
        SELECT rule, metric, since, value, threshold, message FROM (
            SELECT rule, argMax(state, ts) AS state, argMax(metric, ts) AS metric,
                   max(ts) AS since, argMax(value, ts) AS value,
                   argMax(threshold, ts) AS threshold, argMax(message, ts) AS message
            FROM alerts FINAL WHERE pipeline = {pipeline:String} GROUP BY rule)
        WHERE state = 'firing' ORDER BY since DESC, rule""",
        {"pipeline": pipeline},
    )


def ask_alert_history(pipeline: str, start_ms: int, end_ms: int, limit: int) -> Query:
    """Alert transitions (firing, resolved), newest first."""
    return Query(
        f"""
        SELECT ts, rule, state, metric, value, threshold, message FROM alerts FINAL
        WHERE pipeline = {{pipeline:String}} AND {_in_range()}
        ORDER BY ts DESC, rule LIMIT {{limit:UInt32}}""",
        _ask(pipeline, start_ms, end_ms, limit=int(limit)),
    )


def ask_model_changes(pipeline: str, start_ms: int, end_ms: int, version: str, limit: int) -> Query:
    """The audit trail of which model serves: promotions, rollbacks, challengers set,
    archived versions, newest first."""
    return Query(
        f"""
        SELECT ts, action, version, previous, reason, actor FROM audit_events FINAL
        WHERE pipeline = {{pipeline:String}} AND {_in_range()}
        AND action IN ('promoted', 'rolled_back', 'challenger_set', 'archived')
        AND ({_of_version("version")} OR previous = {{version:String}})
        ORDER BY ts DESC, action LIMIT {{limit:UInt32}}""",
        _ask(pipeline, start_ms, end_ms, version=version, limit=int(limit)),
    )


def ask_label_coverage(pipeline: str, start_ms: int, end_ms: int) -> Query:
    """(answered, labelled, coverage): the share of served events that have a label."""
    return Query(
        f"""
        SELECT count() AS answered,
               countIf(event_id IN (SELECT event_id FROM labels
                                    WHERE pipeline = {{pipeline:String}})) AS labelled,
               round(labelled / greatest(answered, 1), 4) AS coverage
        FROM (SELECT DISTINCT event_id FROM predictions
              WHERE pipeline = {{pipeline:String}} AND served = 1 AND {_in_range()})""",
        _ask(pipeline, start_ms, end_ms),
    )


def ask_weak_label_accuracy(pipeline: str, start_ms: int, end_ms: int) -> Query:
    """Per weak labeller (annotations.source): how many events it annotated, how many of
    them have a true label, how often it agreed with it, its mean confidence."""
    return Query(
        f"""
        SELECT a.source AS source, count() AS annotated, sum(l.known) AS labelled,
               round(sumIf(a.label = l.label, l.known = 1) / greatest(labelled, 1), 4)
                   AS accuracy,
               round(avg(a.confidence), 4) AS mean_confidence
        FROM (SELECT event_id, source, label, confidence FROM annotations FINAL
              WHERE pipeline = {{pipeline:String}} AND {_in_range()}) AS a
        LEFT JOIN (SELECT event_id, label, toUInt8(1) AS known FROM labels FINAL
                   WHERE pipeline = {{pipeline:String}}) AS l ON a.event_id = l.event_id
        GROUP BY source ORDER BY source""",
        _ask(pipeline, start_ms, end_ms),
    )


def ask_flags(pipeline: str, start_ms: int, end_ms: int) -> Query:
    """Flags (served model and weak labeller confidently disagreeing) per labeller and
    judge verdict, and, among the flags a true label came for, how often the flag was right
    (the served class wrong) and how often the weak label was."""
    return Query(
        f"""
        SELECT f.source AS source, if(f.judge = '', '(not judged)', f.judge) AS verdict,
               count() AS flags,
               round(avg(f.served_confidence), 4) AS served_confidence,
               round(avg(f.weak_confidence), 4) AS weak_confidence,
               countIf(l.event_id != '') AS labelled,
               round(countIf(l.event_id != '' AND l.label != f.predicted_class)
                     / greatest(labelled, 1), 4) AS served_wrong,
               round(countIf(l.event_id != '' AND l.label = f.weak_label)
                     / greatest(labelled, 1), 4) AS weak_right
        FROM (SELECT * FROM flags FINAL
              WHERE pipeline = {{pipeline:String}} AND {_in_range()}) AS f
        LEFT JOIN (SELECT event_id, argMax(label, inserted_at) AS label FROM labels
                   WHERE pipeline = {{pipeline:String}} GROUP BY event_id) AS l
        ON f.event_id = l.event_id
        GROUP BY source, verdict ORDER BY flags DESC, source, verdict""",
        _ask(pipeline, start_ms, end_ms),
    )


def ask_class_mix(pipeline: str, start_ms: int, end_ms: int, version: str) -> Query:
    """(predicted_class, n, share) of the served answers."""
    return Query(
        f"""
        SELECT predicted_class, count() AS n, round(n / sum(n) OVER (), 4) AS share
        FROM predictions FINAL
        WHERE pipeline = {{pipeline:String}} AND served = 1 AND {_in_range()}
        AND {_of_version()}
        GROUP BY predicted_class ORDER BY n DESC, predicted_class""",
        _ask(pipeline, start_ms, end_ms, version=version),
    )


def ask_confusion(pipeline: str, start_ms: int, end_ms: int, version: str) -> Query:
    """(label, predicted, n): the served answers against the true labels."""
    return Query(
        f"""
        SELECT l.label AS label, p.predicted_class AS predicted, count() AS n
        FROM (SELECT event_id, predicted_class FROM predictions FINAL
              WHERE pipeline = {{pipeline:String}} AND served = 1
              AND {_in_range()} AND {_of_version()}) AS p
        INNER JOIN (SELECT event_id, label FROM labels FINAL
                    WHERE pipeline = {{pipeline:String}}) AS l ON p.event_id = l.event_id
        GROUP BY label, predicted ORDER BY label, predicted""",
        _ask(pipeline, start_ms, end_ms, version=version),
    )


def ask_model_versions(pipeline: str, limit: int) -> Query:
    """The registered model versions: stage, kind, traffic share, when made, newest first."""
    return Query(
        """
        SELECT version, model_name, kind, stage, traffic_share, created_at, parent_version
        FROM model_versions FINAL WHERE pipeline = {pipeline:String}
        ORDER BY created_at DESC, version LIMIT {limit:UInt32}""",
        {"pipeline": pipeline, "limit": int(limit)},
    )


def ask_known_versions(pipeline: str) -> Query:
    """Every model version that predicted, was measured or was registered for a pipeline."""
    return Query(
        "SELECT DISTINCT model_version FROM predictions WHERE pipeline = {pipeline:String} "
        "UNION DISTINCT SELECT model_version FROM metrics WHERE pipeline = {pipeline:String} "
        "UNION DISTINCT SELECT version FROM model_versions WHERE pipeline = {pipeline:String}",
        {"pipeline": pipeline},
    )


# --- the tickets demo's report -------------------------------------------------------
# One run's events have ids ``<prefix><index>``; ``start`` is where the index begins
# (substring() counts bytes).
def _tickets_run(pipeline: str, prefix: str, **more: Any) -> dict[str, Any]:
    return {"pipeline": pipeline, "prefix": prefix, **more}


def _index_start(prefix: str) -> int:
    return len(prefix.encode()) + 1


def tickets_progress(pipeline: str, prefix: str, source: str, since_ms: int) -> Query:
    """(events served, dead letters since ``since_ms``, events weak-labelled by
    ``source``, events labelled) of this run."""
    return Query(
        """
        SELECT (SELECT uniqExact(event_id) FROM predictions WHERE pipeline = {pipeline:String}
                AND served = 1 AND startsWith(event_id, {prefix:String})),
               (SELECT count() FROM dead_letters FINAL WHERE pipeline = {pipeline:String}
                AND ts >= fromUnixTimestamp64Milli({since_ms:Int64})),
               (SELECT uniqExact(event_id) FROM annotations WHERE pipeline = {pipeline:String}
                AND source = {source:String} AND startsWith(event_id, {prefix:String})),
               (SELECT uniqExact(event_id) FROM labels WHERE pipeline = {pipeline:String}
                AND startsWith(event_id, {prefix:String}))""",
        _tickets_run(pipeline, prefix, source=source, since_ms=since_ms),
    )


# this run's events (ids starting with {prefix}): their latest labels and served answers
_RUN_LABELS = """(SELECT event_id, argMax(label, inserted_at) AS label FROM labels
    WHERE pipeline = {pipeline:String} AND startsWith(event_id, {prefix:String})
    GROUP BY event_id) AS l"""
_RUN_SERVED = """(SELECT event_id, any(predicted_class) AS cls FROM predictions
    WHERE pipeline = {pipeline:String} AND served = 1
    AND startsWith(event_id, {prefix:String}) GROUP BY event_id) AS p"""


def tickets_rolling_accuracy(pipeline: str, prefix: str, last: int) -> Query:
    """(served accuracy,) on the latest ``last`` labelled and served events of this run
    (-1: none yet)."""
    return Query(
        """
        SELECT if(count() = 0, -1, avg(right)) FROM (
            SELECT p.cls = l.label AS right
            FROM """
        + _RUN_LABELS
        + """
            INNER JOIN """
        + _RUN_SERVED
        + """
            ON l.event_id = p.event_id
            ORDER BY toUInt64(substring(l.event_id, {start:UInt64})) DESC LIMIT {last:UInt32})""",
        _tickets_run(pipeline, prefix, start=_index_start(prefix), last=last),
    )


def tickets_labeller_labelled(pipeline: str, since_ms: int) -> Query:
    """(labelled events,) counted by the labeller's accuracy rows of the windowed metrics
    from the minute of ``since_ms`` on (NULL: none yet)."""
    return Query(
        "SELECT sum(n) FROM metrics FINAL WHERE pipeline = {pipeline:String} "
        "AND role = 'labeller' AND metric = 'accuracy' "
        "AND window_start >= toStartOfMinute(fromUnixTimestamp64Milli({since_ms:Int64}))",
        {"pipeline": pipeline, "since_ms": since_ms},
    )


def tickets_labelled(pipeline: str, prefix: str, source: str) -> Query:
    """(index, served class, weak label of ``source``, true label) of this run's labelled
    events, by index; '' where no answer or no weak label came."""
    return Query(
        """
        SELECT toUInt64(substring(l.event_id, {start:UInt64})) AS i, p.cls, a.weak, l.label
        FROM """
        + _RUN_LABELS
        + """
        LEFT JOIN """
        + _RUN_SERVED
        + """
        ON l.event_id = p.event_id
        LEFT JOIN (SELECT event_id, argMax(label, inserted_at) AS weak FROM annotations
                   WHERE pipeline = {pipeline:String} AND source = {source:String}
                   AND startsWith(event_id, {prefix:String}) GROUP BY event_id) AS a
        ON l.event_id = a.event_id
        ORDER BY i""",
        _tickets_run(pipeline, prefix, source=source, start=_index_start(prefix)),
    )


def tickets_drift(pipeline: str, since_ms: int) -> Query:
    """(kind, detector, target, detections, first event time ms, partition) of the drift
    events since ``since_ms``, first detected first; a new cluster's id is its partition's
    (partition -1: every partition)."""
    return Query(
        "SELECT kind, detector, target, count(), min(JSONExtractInt(details, 'event_ts_ms')), "
        "if(detector = 'new_cluster', JSONExtractInt(details, 'partition'), -1) AS part "
        "FROM drift_events FINAL WHERE pipeline = {pipeline:String} "
        "AND ts >= fromUnixTimestamp64Milli({since_ms:Int64}) "
        "GROUP BY kind, detector, target, part ORDER BY 5",
        {"pipeline": pipeline, "since_ms": since_ms},
    )


def tickets_clusters(pipeline: str, prefix: str, feature: str) -> Query:
    """(index, entity key, cluster key ``<feature>#<id>`` or '') of every event of this
    run in the features logged, from the cluster feature named ``feature``."""
    return Query(
        "SELECT toUInt64(substring(event_id, {start:UInt64})), entity_key, "
        "arrayFirst(k -> startsWith(k, {feature:String}), mapKeys(features)) "
        "FROM features FINAL WHERE pipeline = {pipeline:String} "
        "AND startsWith(event_id, {prefix:String})",
        _tickets_run(pipeline, prefix, feature=f"{feature}#", start=_index_start(prefix)),
    )


def tickets_flags(pipeline: str, prefix: str) -> Query:
    """(index, served class, served confidence, weak label, weak confidence) of this
    run's flags, in a fixed order that mixes the events (by hash of the id)."""
    return Query(
        "SELECT toUInt64(substring(event_id, {start:UInt64})) AS i, predicted_class, "
        "served_confidence, weak_label, weak_confidence FROM flags FINAL "
        "WHERE pipeline = {pipeline:String} AND startsWith(event_id, {prefix:String}) "
        "ORDER BY cityHash64(event_id)",
        _tickets_run(pipeline, prefix, start=_index_start(prefix)),
    )


def tickets_summaries(pipeline: str, prefix: str) -> Query:
    """(index, summary) of this run's summarised events, by index."""
    return Query(
        "SELECT toUInt64(substring(event_id, {start:UInt64})) AS i, summary "
        "FROM summaries FINAL WHERE pipeline = {pipeline:String} "
        "AND startsWith(event_id, {prefix:String}) ORDER BY i",
        _tickets_run(pipeline, prefix, start=_index_start(prefix)),
    )

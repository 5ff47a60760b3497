"""``streamml ask``: a plain-language question answered by a vetted, parameterized query.

Pure core. The question is matched by sentence embeddings (MiniLM) to the phrasings of a
fixed catalogue of templates over the warehouse tables (SQL in :mod:`streamml.sql`); the
pipeline, time range, model version and row limit are read from it and checked, and go
into the query as parameters. No SQL is ever generated. What does not match well enough,
asks to change data, or asks for personal data is refused, as a value saying why.

>>> NOW = dt.datetime(2026, 12, 1, 12, 30, tzinfo=dt.UTC)
>>> plan = extract_params("drift in the last 2 hours for v3", CATALOGUE["drift_events"],
...                       ["demo"], NOW)
>>> plan.query.parameters["pipeline"], plan.query.parameters["version"], plan.window.label
('demo', 'v3', 'last 2 hours')
>>> refusal("please delete all predictions").reason
"this asks to change data ('delete'); ask only reads"
"""

from __future__ import annotations

import datetime as dt
import re
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from streamml import querysafety, sql
from streamml.errors import StreamMLError
from streamml.sql import Query

if TYPE_CHECKING:
    from streamml.streams.warehouse import QueryResult

THRESHOLD = 0.50  # the least cosine of a question to a template's closest phrasing
MARGIN = 0.02  # a runner-up over other tables this close makes the question ambiguous
TIMED_MARGIN = 0.15  # within this of a runner-up on the same tables, a time range decides
MAX_LIMIT = 1000
MAX_QUESTION_CHARS = 500
DEFAULT_HOURS = 24.0


class AskRefused(StreamMLError, ValueError):
    """``ask`` will not answer this question; asking the same again is refused again."""


@dataclass(frozen=True)
class Refusal:
    """Why a question is not answered, and what to do instead."""

    reason: str
    hint: str = ""

    def error(self) -> AskRefused:
        return AskRefused(self.reason, hint=self.hint or None)


@dataclass(frozen=True)
class Window:
    """A time range [start, end) of event time, and how the question said it."""

    start: dt.datetime
    end: dt.datetime
    label: str

    def ms(self) -> tuple[int, int]:
        return int(self.start.timestamp() * 1000), int(self.end.timestamp() * 1000)


@dataclass(frozen=True)
class Args:
    """What a template's query is built from (validated)."""

    pipeline: str
    start_ms: int
    end_ms: int
    version: str
    limit: int
    bucket_s: int


@dataclass(frozen=True)
class Template:
    """A vetted question: id, what it answers, phrasings to match, and its query."""

    id: str
    description: str
    examples: tuple[str, ...]
    tables: frozenset[str]
    build: Callable[[Args], Query]
    timed: bool = True  # takes a time range (default: the last DEFAULT_HOURS)
    versioned: bool = False  # can filter on one model version
    limited: bool = False  # takes a row limit


@dataclass(frozen=True)
class Match:
    template: Template
    score: float  # cosine to its closest phrasing
    runner_up: str  # the next best template
    margin: float  # score - runner-up's score


@dataclass(frozen=True)
class Plan:
    """A matched question with its parameters: what ``ask`` runs."""

    template: Template
    query: Query
    window: Window | None
    notes: tuple[str, ...] = ()
    score: float = 0.0


class Embeds(Protocol):
    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


def _t(
    name: str, what: str, tables: str, build: Callable[[Args], Query], *examples: str, **kw: Any
) -> Template:
    return Template(name, what, examples, frozenset(tables.split()), build, **kw)


_TEMPLATES = [
    _t("served_accuracy", "served accuracy by model and hour", "predictions labels",
       lambda a: sql.ask_served_accuracy(a.pipeline, a.start_ms, a.end_ms, a.version),
       "what was the accuracy of each model per hour", "hourly accuracy per model version",
       "how accurate were the served predictions", "is the model getting worse over time",
       "accuracy trend of the served model",
       versioned=True),
    _t("drift_events", "recent drift events", "drift_events",
       lambda a: sql.ask_drift_events(a.pipeline, a.start_ms, a.end_ms, a.version, a.limit),
       "show recent drift events", "has any drift been detected",
       "when did data drift or concept drift happen", "list the drift detections",
       "which drift detectors fired",
       versioned=True, limited=True),
    _t("dead_letters", "dead letters by error class", "dead_letters",
       lambda a: sql.ask_dead_letters(a.pipeline, a.start_ms, a.end_ms),
       "how many dead letters per error class", "why were records rejected",
       "show the invalid records sent to the dead letter queue",
       "what validation errors did we get", "count of bad records per error type",
       "rejected messages in the DLQ by reason"),
    _t("champion_vs_challengers",
       "champion against challengers: accuracy and ROC AUC per model version and role",
       "metrics",
       lambda a: sql.ask_champion_vs_challengers(a.pipeline, a.start_ms, a.end_ms, a.version),
       "compare the champion with the challengers", "how does the shadow model compare",
       "accuracy and roc auc per model version and role",
       "is the challenger better than the current champion",
       "which model version performs best",
       versioned=True),
    _t("latency", "latency quantiles (p50, p95, p99) per model", "predictions",
       lambda a: sql.ask_latency(a.pipeline, a.start_ms, a.end_ms, a.version),
       "what are the p50 p95 p99 latencies per model", "how fast is scoring",
       "prediction latency percentiles", "end to end latency per model version",
       "how slow are the predictions",
       versioned=True),
    _t("volume", "prediction volume per minute or hour", "predictions",
       lambda a: sql.ask_volume(a.pipeline, a.start_ms, a.end_ms, a.version, a.bucket_s),
       "how many predictions per minute", "prediction throughput per hour",
       "number of events scored over time", "how much traffic did the pipeline get",
       "count of predictions made",
       versioned=True),
    _t("alerts_firing", "alerts firing now", "alerts",
       lambda a: sql.ask_alerts_firing(a.pipeline),
       "which alerts are firing right now", "are there any active alerts",
       "what is currently alerting", "show open alerts",
       timed=False),
    _t("alert_history", "alert history: rules firing and resolving", "alerts",
       lambda a: sql.ask_alert_history(a.pipeline, a.start_ms, a.end_ms, a.limit),
       "show the alert history", "which alerts fired and resolved",
       "list past alert transitions", "which alerts fired this week",
       limited=True),
    _t("model_changes", "audit trail of promotions and rollbacks", "audit_events",
       lambda a: sql.ask_model_changes(a.pipeline, a.start_ms, a.end_ms, a.version, a.limit),
       "when was the model promoted or rolled back", "promotion and rollback history",
       "which model versions were promoted", "audit trail of model changes",
       "who promoted this version", "who changed the serving model and why",
       "when did the champion change",
       versioned=True, limited=True),
    _t("label_coverage", "label coverage: share of served predictions that have a label",
       "predictions labels",
       lambda a: sql.ask_label_coverage(a.pipeline, a.start_ms, a.end_ms),
       "what share of predictions have labels", "how many predictions got ground truth",
       "label coverage", "percentage of events that were labelled",
       "how many labels are missing", "how many predictions are still unlabelled"),
    _t("weak_label_accuracy", "weak-label accuracy per source (annotations against labels)",
       "annotations labels",
       lambda a: sql.ask_weak_label_accuracy(a.pipeline, a.start_ms, a.end_ms),
       "how accurate are the weak labels from each source",
       "how often do the zero-shot annotations agree with the true labels",
       "accuracy of the annotators", "compare the weak labellers with the ground truth",
       "how good is the generative labeller"),
    _t("flags", "flags: served model and weak labeller disagreeing, per source and verdict",
       "flags",
       lambda a: sql.ask_flags(a.pipeline, a.start_ms, a.end_ms),
       "how many flags were raised", "count the flagged events per source",
       "where did the model and the weak labels disagree",
       "what did the judge say about flagged predictions"),
    _t("class_mix", "distribution of the predicted classes served", "predictions",
       lambda a: sql.ask_class_mix(a.pipeline, a.start_ms, a.end_ms, a.version),
       "what classes does the model predict", "distribution of predicted classes",
       "how many predictions of each class", "share of positive predictions",
       "how often is fraud predicted",
       versioned=True),
    _t("confusion", "confusion matrix: served answers against true labels",
       "predictions labels",
       lambda a: sql.ask_confusion(a.pipeline, a.start_ms, a.end_ms, a.version),
       "show the confusion matrix", "predicted versus actual labels",
       "true class against predicted", "how many false positives and false negatives",
       "errors by true class",
       versioned=True),
    _t("model_versions", "registered model versions, their stage and traffic share",
       "model_versions",
       lambda a: sql.ask_model_versions(a.pipeline, a.limit),
       "which model versions are registered", "which model versions exist",
       "list the models and their stages", "which model is deployed",
       "show the model registry", "what traffic share does each version get",
       timed=False, limited=True),
]  # fmt: skip
CATALOGUE: Mapping[str, Template] = {t.id: t for t in _TEMPLATES}


def capabilities(catalogue: Mapping[str, Template] = CATALOGUE) -> str:
    """What ``ask`` can answer, one template a line (for refusals)."""
    return "\n".join(f"  - {t.description}" for t in catalogue.values())


# --- refusals before matching ----------------------------------------------------------
_WRITE_WORDS = re.compile(
    r"\b(delete|deleting|remove|erase|wipe|purge|truncate|destroy|overwrite|insert|"
    r"alter|grant|revoke|optimize\s+table|drop\s+(?:the\s+)?(?:\w+\s+)?"
    r"(?:table|tables|database|column|partition|view|all|everything|rows|data)|"
    r"update\s+\w+\s+set|create\s+(?:a\s+)?(?:table|database|view|user))\b"
)
_POLITE = (
    r"^(?:(?:please|now|ok|then|and|go ahead and|can you|could you|would you|will you|"
    r"i want to|i'd like to|let's|let us)\s+)*"
)
# words that are also nouns ("label coverage", "drop in accuracy") count as a command
# only when an object follows them
_OBJECT = r"(?=\s+(?:the|a|an|all|this|that|these|those|every|each|my|our|it|them|new|v\d+|to)\b)"
_IMPERATIVE = re.compile(
    _POLITE + r"(promote|demote|roll\s?back|retrain|deploy|undeploy|archive|register|rename|"
    r"modify|reset|kill|restart|replace|produce|add|create|update|"
    r"(?:change|set|clear|label|mark|stop|fix|move|send|drop|load|import)" + _OBJECT + r")\b"
)
_ACTION = re.compile(
    _POLITE + r"(predict|classify|summari[sz]e|translate|generate|write|execute|tell me a|"
    r"(?:score|train|run|start|make)" + _OBJECT + r")\b"
)
_SENSITIVE = re.compile(
    r"\b(e-?mails?|passwords?|passwd|phone|ssn|social security|credit cards?|card numbers?|"
    r"addresses|home address|personal data|pii|secrets?|api keys?|tokens?|credentials?)\b"
)


def refusal(question: str) -> Refusal | None:
    """Why ``question`` is refused before any matching (it would change data, asks for
    personal data or secrets, or is empty or too long), or None.

    >>> refusal("drop table labels").reason
    "this asks to change data ('drop table'); ask only reads"
    >>> refusal("promote v3 to champion").reason
    "this asks to change data ('promote'); ask only reads"
    >>> refusal("show me the users' emails").reason
    "personal data and secrets ('emails') are not answered"
    >>> refusal("did accuracy drop after the last promotion?") is None
    True
    """
    text = " ".join(question.lower().split())
    if not text:
        return Refusal("an empty question", hint="ask e.g. 'drift events in the last day'")
    if len(text) > MAX_QUESTION_CHARS:
        return Refusal(f"the question is longer than {MAX_QUESTION_CHARS} characters")
    found = _WRITE_WORDS.search(text) or _IMPERATIVE.match(text)
    if found:
        word = " ".join(found.group(found.lastindex or 0).split()[:2])
        return Refusal(
            f"this asks to change data ({word!r}); ask only reads",
            hint="models change through `streamml models ...` and the lifecycle; "
            "ask answers questions about what happened",
        )
    found = _ACTION.match(text)
    if found:
        return Refusal(
            f"this asks to do something ({found.group(1)!r}); ask only answers questions "
            "from the warehouse",
            hint="ask can answer:\n" + capabilities(),
        )
    found = _SENSITIVE.search(text)
    if found:
        return Refusal(
            f"personal data and secrets ({found.group(1)!r}) are not answered",
            hint="ask answers questions about models, drift, alerts and data quality",
        )
    return None


# --- matching --------------------------------------------------------------------------
def match(
    question: str,
    catalogue: Mapping[str, Template],
    embedder: Embeds,
    threshold: float = THRESHOLD,
    margin: float = MARGIN,
) -> Match | Refusal:
    """The template whose closest phrasing (or description) is nearest in meaning to the
    question, if near enough and clearly nearer than a template over other tables."""
    texts: list[str] = []
    owners: list[str] = []
    for template in catalogue.values():
        for text in (template.description, *template.examples):
            texts.append(text)
            owners.append(template.id)
    vectors = embedder.embed([question.strip(), *texts])
    cosines = vectors[1:] @ vectors[0]
    best: dict[str, float] = {}
    for owner, cosine in zip(owners, cosines.tolist(), strict=True):
        best[owner] = max(best.get(owner, -1.0), float(cosine))
    ranked = sorted(best.items(), key=lambda kv: -kv[1])
    (top, score), (second, second_score) = ranked[0], ranked[1]
    if score < threshold:
        return Refusal(
            f"no vetted question is close enough to this one (best: {top!r}, "
            f"cosine {score:.2f} < {threshold:.2f})",
            hint="ask can answer:\n" + capabilities(catalogue) + "\nfor anything else, "
            'run read-only SQL with `streamml query "SELECT ..."`',
        )
    if score - second_score < margin and catalogue[top].tables != catalogue[second].tables:
        return Refusal(
            f"the question fits two answers about as well: {catalogue[top].description!r} "
            f"and {catalogue[second].description!r}",
            hint="say which of the two you mean",
        )
    return Match(catalogue[top], score, second, score - second_score)


# --- parameters ------------------------------------------------------------------------
_NUMBER_WORDS = {
    "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
    "seven": 7, "eight": 8, "nine": 9, "ten": 10, "twelve": 12, "fifteen": 15,
    "twenty": 20, "thirty": 30, "forty-eight": 48, "sixty": 60,
}  # fmt: skip
_UNITS = {"m": 60, "min": 60, "h": 3600, "hr": 3600, "hour": 3600, "d": 86400, "day": 86400}
_UNITS |= {"minute": 60, "w": 604800, "wk": 604800, "week": 604800}
_UNIT = r"(minutes?|mins?|m|hours?|hrs?|h|days?|d|weeks?|wks?|w)"
_NUMBER = r"(\d{1,6}|" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + ")"
_LAST = re.compile(
    r"\b(?:last|past|previous|recent|latest)\s+(?:" + _NUMBER + r"\s*)?" + _UNIT + r"\b"
)
_DATE = r"(\d{4}-\d{2}-\d{2})(?:[ t](\d{1,2}):(\d{2}))?"
_BETWEEN = re.compile(r"\b(?:between|from)\s+" + _DATE + r"\s+(?:and|to|until)\s+" + _DATE)
_SINCE = re.compile(r"\b(?:since|from|after)\s+" + _DATE)
_ON = re.compile(r"\bon\s+" + _DATE)
_MAX_SPAN = dt.timedelta(days=3660)


def _date(day: str, hour: str | None, minute: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(day).replace(
            hour=int(hour or 0), minute=int(minute or 0), tzinfo=dt.UTC
        )
    except ValueError:
        return None


def parse_time_range(text: str, now: dt.datetime) -> Window | Refusal | None:
    """The time range a question names (UTC), a refusal for one that cannot be, or None.

    >>> now = dt.datetime(2026, 12, 1, 12, 30, tzinfo=dt.UTC)
    >>> w = parse_time_range("p99 latency in the last 15 minutes", now)
    >>> w.start.isoformat(), w.label
    ('2026-12-01T12:15:00+00:00', 'last 15 minutes')
    >>> parse_time_range("past three days", now).start.isoformat()
    '2026-11-28T12:30:00+00:00'
    >>> w = parse_time_range("dead letters yesterday", now)
    >>> w.start.isoformat(), w.end.isoformat()
    ('2026-11-30T00:00:00+00:00', '2026-12-01T00:00:00+00:00')
    >>> parse_time_range("promotions since 2026-11-30", now).start.isoformat()
    '2026-11-30T00:00:00+00:00'
    >>> parse_time_range("since 2026-13-45", now).reason
    "'2026-13-45' is not a date (YYYY-MM-DD)"
    >>> parse_time_range("since 2027-01-01", now).reason
    'the range starts after it ends (2027-01-01 00:00 UTC)'
    >>> parse_time_range("which alerts are firing", now) is None
    True
    """
    t = " ".join(text.lower().split())
    midnight = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    window: tuple[dt.datetime | None, dt.datetime | None, str] | None = None
    if m := _BETWEEN.search(t):
        window = (_date(*m.group(1, 2, 3)), _date(*m.group(4, 5, 6)), m.group(0))
        bad = m.group(1) if window[0] is None else m.group(4)
    elif m := _SINCE.search(t):
        window, bad = (_date(*m.group(1, 2, 3)), now, f"since {m.group(1)}"), m.group(1)
    elif m := _ON.search(t):
        day = _date(m.group(1), m.group(2), m.group(3))
        end = day + dt.timedelta(days=1) if day else None
        window, bad = (day, end, f"on {m.group(1)}"), m.group(1)
    elif m := _LAST.search(t):
        count = m.group(1) or "1"
        n = int(count) if count.isdigit() else _NUMBER_WORDS[count]
        unit = m.group(2).rstrip("s")
        seconds = _UNITS.get(unit) or _UNITS[unit[0]]
        if n == 0 or n * seconds > _MAX_SPAN.total_seconds():
            return Refusal(f"{m.group(0)!r} is not a range ask can use (1 minute to 10 years)")
        name = next(k for k in ("minute", "hour", "day", "week") if _UNITS[k] == seconds)
        label = f"last {n} {name}s" if n > 1 else f"last {name}"
        return Window(now - dt.timedelta(seconds=n * seconds), now, label)
    elif re.search(r"\byesterday\b", t):
        return Window(midnight - dt.timedelta(days=1), midnight, "yesterday")
    elif re.search(r"\btoday\b", t):
        return Window(midnight, now, "today")
    elif re.search(r"\bthis week\b", t):
        return Window(midnight - dt.timedelta(days=midnight.weekday()), now, "this week")
    if window is None:
        return None
    start, end, label = window
    if start is None or end is None:
        return Refusal(f"{bad!r} is not a date (YYYY-MM-DD)")
    if start >= end:
        return Refusal(f"the range starts after it ends ({start:%Y-%m-%d %H:%M} UTC)")
    return Window(start, end, label)


_VERSION = re.compile(r"\b(v\d{1,6}|online-[0-9a-f]{4,16})\b")
_LIMIT = re.compile(
    r"\b(?:top|limit|first|last|latest|recent|show)\s+(?P<a>\d{1,7})\b(?!\s*" + _UNIT + r"\b)"
    r"|\b(?P<b>\d{1,7})\s+(?:most\s+recent|latest|newest|last)\b"
)
_BUCKETS = {
    60: r"\b(?:per|by|each|every|a)\s+minute\b|\bminutely\b",
    3600: r"\b(?:per|by|each|every|an?)\s+hour\b|\bhourly\b",
    86400: r"\b(?:per|by|each|every|a)\s+day\b|\bdaily\b",
}


def extract_params(
    question: str,
    template: Template,
    pipelines: Sequence[str],
    now: dt.datetime,
    pipeline: str | None = None,
    default_limit: int = 50,
) -> Plan | Refusal:
    """The template's query with the parameters the question names, checked: the
    pipeline (``pipeline`` if given, else the one named, else the only one there is),
    the time range (else the last 24 hours), a model version and a row limit.

    >>> now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    >>> extract_params("dead letters", CATALOGUE["dead_letters"], ["demo", "phishing"], now)
    ... # doctest: +ELLIPSIS
    Refusal(reason='which pipeline? there are 2: demo, phishing', hint='name one in the ...')
    >>> plan = extract_params("top 5 drift events of phishing", CATALOGUE["drift_events"],
    ...                       ["demo", "phishing"], now)
    >>> plan.query.parameters["pipeline"], plan.query.parameters["limit"], plan.window.label
    ('phishing', 5, 'last 24 hours')
    >>> extract_params("latency of v2 and v3", CATALOGUE["latency"], ["demo"], now).reason
    'name at most one model version (v2, v3)'
    """
    text = " ".join(question.lower().split())
    notes: list[str] = []
    chosen = _pipeline(text, pipelines, pipeline)
    if isinstance(chosen, Refusal):
        return chosen
    window = parse_time_range(text, now)
    if isinstance(window, Refusal):
        return window
    if not template.timed:
        if window is not None:
            notes.append(f"{template.id} is about now: the time range is not used")
        window = None
    elif window is None:
        window = Window(now - dt.timedelta(hours=DEFAULT_HOURS), now, "last 24 hours")
    versions = sorted(set(_VERSION.findall(text)))
    if len(versions) > 1:
        return Refusal(f"name at most one model version ({', '.join(versions)})")
    if versions and not template.versioned:
        notes.append(f"{template.id} covers every model: version {versions[0]} is not used")
        versions = []
    limit = default_limit
    if (found := _LIMIT.search(text)) and template.limited:
        limit = int(found.group("a") or found.group("b"))
        if not 1 <= limit <= MAX_LIMIT:
            return Refusal(f"a row limit must be 1 to {MAX_LIMIT}, not {limit}")
    start_ms, end_ms = window.ms() if window else (0, 0)
    bucket_s = next((b for b, p in _BUCKETS.items() if re.search(p, text)), 0)
    if not bucket_s:
        span_s = (end_ms - start_ms) / 1000
        bucket_s = 60 if span_s <= 7200 else 3600 if span_s <= 3 * 86400 else 86400
    args = Args(chosen, start_ms, end_ms, versions[0] if versions else "", limit, bucket_s)
    return Plan(template, template.build(args), window, tuple(notes))


def _pipeline(text: str, pipelines: Sequence[str], given: str | None) -> str | Refusal:
    known = ", ".join(sorted(pipelines)) or "(none)"
    named = sorted(p for p in pipelines if re.search(rf"(?<![\w-]){re.escape(p.lower())}\b", text))
    if given is not None:
        if given not in pipelines:
            return Refusal(f"no pipeline named {given!r}", hint=f"known: {known}")
        if named and given not in named:
            return Refusal(f"the question names {', '.join(named)} but --pipeline is {given}")
        return given
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        return Refusal(f"the question names several pipelines ({', '.join(named)})")
    if len(pipelines) == 1:
        return pipelines[0]
    if not pipelines:
        return Refusal("no pipeline specs found", hint="set STREAMML_PIPELINES_DIR")
    return Refusal(
        f"which pipeline? there are {len(pipelines)}: {known}",
        hint="name one in the question or pass --pipeline",
    )


def plan(
    question: str,
    embedder: Embeds,
    pipelines: Sequence[str],
    now: dt.datetime,
    pipeline: str | None = None,
    catalogue: Mapping[str, Template] = CATALOGUE,
) -> Plan | Refusal:
    """What to run for ``question``: refused up front, matched, then parameterized."""
    refused = refusal(question)
    if refused is not None:
        return refused
    found = match(_VERSION.sub("version", question.lower()), catalogue, embedder)
    if isinstance(found, Refusal):
        return found
    template, other = found.template, catalogue[found.runner_up]
    if (
        other.tables == template.tables
        and other.timed != template.timed
        and (found.margin < TIMED_MARGIN)
    ):  # "alerts in the last day" is the history; "alerts firing" is now
        timed = isinstance(parse_time_range(question, now), Window)
        template = other if other.timed == timed else template
    made = extract_params(question, template, pipelines, now, pipeline)
    if isinstance(made, Refusal):
        return made
    return Plan(made.template, made.query, made.window, made.notes, found.score)


def shown(query: Query) -> str:
    """The query's text and its parameter values, as ``ask`` prints them.

    >>> print(shown(Query("SELECT {n:UInt32}, {t_ms:Int64}", {"n": 3, "t_ms": 1796083200000})))
    SELECT {n:UInt32}, {t_ms:Int64}
    -- n = 3
    -- t_ms = 1796083200000  (2026-12-01 00:00:00.000 UTC)
    """
    lines = [textwrap.dedent(query.text).strip()]
    for name, value in query.parameters.items():
        when = ""
        if name.endswith("_ms") and isinstance(value, int) and value > 0:
            stamp = dt.datetime.fromtimestamp(value / 1000, dt.UTC)
            when = f"  ({stamp:%Y-%m-%d %H:%M:%S}.{value % 1000:03d} UTC)"
        lines.append(f"-- {name} = {value!r}{when}")
    return "\n".join(lines)


def run_read_only(
    query_fn: Callable[..., QueryResult], query: Query, table_functions: bool = False
) -> QueryResult:
    """Run ``query`` with ``query_fn`` (``Warehouse.query``) as the worker's /query does
    (:func:`streamml.querysafety.run_read_only`): parsed, checked, run read-only."""
    return querysafety.run_read_only(
        query_fn, query.text, query.parameters, table_functions=table_functions
    )


def check_version(query: Query, known: Sequence[str]) -> Refusal | None:
    """Why the model version a query filters on is unknown (it never predicted, was
    measured or was registered for the pipeline), or None.

    >>> q = Query("SELECT {pipeline:String}, {version:String}",
    ...           {"pipeline": "demo", "version": "v9"})
    >>> check_version(q, ["v1", "v2"])
    Refusal(reason="no model version 'v9' in pipeline 'demo'", hint='known: v1, v2')
    """
    version = query.parameters.get("version", "")
    if not version or version in known:
        return None
    listed = ", ".join(sorted(known)[:20]) or "(none yet)"
    pipeline = query.parameters.get("pipeline")
    return Refusal(
        f"no model version {version!r} in pipeline {pipeline!r}", hint=f"known: {listed}"
    )

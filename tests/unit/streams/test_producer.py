"""The producer's pure core: the send schedule, the ack ledger a resume starts from, the
progress file and which errors are worth a re-send. No broker involved."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    RequestTimedOutError,
    TopicAuthorizationFailedError,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from streamml.config import load_settings
from streamml.models.synthetic import Example
from streamml.schemas.catalog import load_pipelines
from streamml.schemas.spec import PipelineSpec
from streamml.streams.ledger import Acked, FileProgress, Ledger
from streamml.streams.producer import (
    Send,
    _retriable,
    count_records,
    read_file,
    schedule,
)

ROOT = Path(__file__).resolve().parents[3]
[SPEC] = load_pipelines(ROOT / "pipelines", ["demo"])


def _examples(n: int, unlabelled_every: int = 0) -> list[Example]:
    """``n`` records; every ``unlabelled_every``-th has no label (so no label message)."""
    return [
        Example(
            f"u{i % 5}",
            {"event_id": f"e{i}", "user_id": f"u{i % 5}", "amount": float(i)},
            None if unlabelled_every and i % unlabelled_every == 0 else i % 2 == 0,
        )
        for i in range(n)
    ]


def _plan(
    examples: list[Example],
    ledger: Ledger | None = None,
    delay: int = 0,
    limit: int | None = None,
    spec: PipelineSpec = SPEC,
) -> tuple[list[tuple[str, int]], bool]:
    sends: list[Send] = []
    plan = schedule(examples, spec, ledger or Ledger(), True, delay, limit)
    while True:
        try:
            sends.append(next(plan))
        except StopIteration as stop:
            return [(s.kind, s.position) for s in sends], bool(stop.value)


def _acked(sends: list[tuple[str, int]]) -> Ledger:
    ledger = Ledger()
    for kind, i in sends:
        (ledger.records if kind == "record" else ledger.labels).add(i)
    return ledger


def test_acked_keeps_a_contiguous_prefix_and_the_few_beyond_it() -> None:
    acked = Acked()
    for i in (2, 0, 5, 1, 1, 0):
        acked.add(i)
    assert (acked.prefix, acked.beyond, len(acked)) == (3, {5}, 4)
    assert [i in acked for i in range(7)] == [True, True, True, False, False, True, False]


def test_ledger_survives_json_and_resumes_at_the_first_record_missing_its_label() -> None:
    ledger = _acked([("record", i) for i in range(10)] + [("label", i) for i in (0, 1, 2, 4)])
    again = Ledger.from_json(orjson.loads(orjson.dumps(ledger.to_json())))
    assert again == ledger
    assert again.next_index == 3  # record 3 is in Kafka, its label is not


def test_labels_follow_their_record_by_the_delay() -> None:
    plain, whole = _plan(_examples(3), delay=0)
    assert whole and plain == [
        ("record", 0),
        ("label", 0),
        ("record", 1),
        ("label", 1),
        ("record", 2),
        ("label", 2),
    ]
    late, _ = _plan(_examples(4), delay=2)
    assert late == [
        ("record", 0),
        ("record", 1),
        ("label", 0),
        ("record", 2),
        ("label", 1),
        ("record", 3),
        ("label", 2),
        ("label", 3),
    ]


def test_a_label_message_names_its_event_and_goes_to_the_labels_topic() -> None:
    [record, label] = list(schedule(_examples(1), SPEC, Ledger()))
    assert (record.topic, label.topic) == (SPEC.topic("raw"), SPEC.topic("labels"))
    assert orjson.loads(label.value) == {"event_id": "e0", SPEC.label.field: True}
    assert record.key == label.key == b"u0" and (record.seq, label.seq) == (1, 2)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 25),
    delay=st.integers(0, 6),
    unlabelled_every=st.integers(0, 4),
    data=st.data(),
)
def test_resume_sends_exactly_what_was_not_acknowledged_in_order(
    n: int, delay: int, unlabelled_every: int, data: st.DataObject
) -> None:
    """Any acked prefix plus stray acks beyond it (other partitions answered first):
    the resumed run sends each remaining message once, in the original order."""
    examples = _examples(n, unlabelled_every)
    full, _ = _plan(examples, delay=delay)
    cut = data.draw(st.integers(0, len(full)))
    stray = data.draw(st.sets(st.sampled_from(full[cut:])) if cut < len(full) else st.just(set()))
    acked = full[:cut] + sorted(stray)
    rest, whole = _plan(examples, _acked(acked), delay)
    assert whole and rest == [m for m in full if m not in acked]


@pytest.mark.parametrize("delay", [0, 3])
def test_a_limited_run_is_a_prefix_and_its_resume_completes_it(delay: int) -> None:
    examples = _examples(12, unlabelled_every=5)
    full, _ = _plan(examples, delay=delay)
    first, whole = _plan(examples, delay=delay, limit=5)
    assert not whole and first == full[: len(first)]
    assert [m for m in first if m[0] == "record"] == [("record", i) for i in range(5)]
    ledger = _acked(first)
    second, whole = _plan(examples, ledger, delay)
    assert whole and first + second == full
    for kind, i in second:  # the schedule marked the unlabelled records label-done
        (ledger.records if kind == "record" else ledger.labels).add(i)
    assert ledger.next_index == 12


def test_records_without_a_label_do_not_hold_the_resume_point_back() -> None:
    examples = _examples(4, unlabelled_every=2)  # records 0 and 2 have no label
    ledger = _acked([("record", i) for i in range(4)] + [("label", 1)])
    _plan(examples, ledger)
    assert ledger.next_index == 3


def test_progress_file_round_trip_and_a_changed_file_is_noticed(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    data = tmp_path / "in.jsonl"
    data.write_text('{"a": 1}\n{"a": 2}\n')
    store = FileProgress.of(settings, "demo", data)
    assert store.load() is None
    ledger = _acked([("record", 0), ("label", 0), ("record", 1)])
    store.save(ledger, complete=False)
    saved = FileProgress.of(settings, "demo", data).load()
    assert saved is not None and saved.same_file and not saved.complete
    assert saved.ledger == ledger
    assert FileProgress.of(settings, "other", data).load() is None  # per pipeline
    data.write_text('{"a": 1}\n{"a": 3}\n')  # same size, other content
    os.utime(data, ns=(store.fingerprint["mtime_ns"],) * 2)  # ... and the same mtime
    changed = FileProgress.of(settings, "demo", data).load()
    assert changed is not None and not changed.same_file


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_count_records_agrees_with_read_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"in{suffix}"
    if suffix == ".csv":
        path.write_text('user_id,amount,note\nu1,1.5,"two\nlines"\nu2,2,\n')
    else:
        path.write_text('{"user_id": "u1"}\n\n{"user_id": "u2"}\n   \n{"user_id": "u3"}\n')
    assert count_records(path) == len(list(read_file(path, SPEC))) == (2 if suffix == ".csv" else 3)


def test_only_errors_a_retry_can_fix_are_retried() -> None:
    for exc in (
        KafkaConnectionError(),
        KafkaTimeoutError(),
        NotLeaderForPartitionError(),
        RequestTimedOutError(),
        OutOfOrderSequenceNumber(),
        ConnectionResetError(),
    ):
        assert _retriable(exc), exc
    for exc in (MessageSizeTooLargeError(), TopicAuthorizationFailedError(), ValueError()):
        assert not _retriable(exc), exc

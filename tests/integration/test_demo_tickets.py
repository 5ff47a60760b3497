"""``streamml demo tickets`` end to end, in this process, on the session's broker.

The demo function runs as the command runs it (its own state dir, a worker for the
shipped ``tickets`` spec, 1,200 tickets, the ask question through the CLI code), and
the report's facts must agree with each other: every answer, label and weak label
accounted for, served accuracy well above the majority baseline, weak labels right on at
least 0.8 of the labelled tickets, the ask template's answer equal to the demo's own
join, every served ticket in one cluster, and a PNG.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamml.config import Settings
from streamml.demo_tickets import TicketsTick, run_tickets_demo
from streamml.demo_tickets_report import TicketsReport
from streamml.testing import free_port

from .helpers import ROOT

EVENTS, RATE = 1200, 300.0


@pytest.fixture(scope="module")
def run(
    stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TicketsReport, list[TicketsTick], list[str]]:
    tmp = tmp_path_factory.mktemp("demo-tickets")
    settings = stack_settings.model_copy(
        update={
            "state_dir": tmp,
            "web_port": free_port(),
            "app_id": "grpdemotix",
            "pipelines_dir": ROOT / "pipelines",
            "kafka_bootstrap": stack_settings.bootstrap_servers,  # the session's broker
        }
    )
    ticks: list[TicketsTick] = []
    said: list[str] = []
    report = run_tickets_demo(settings, EVENTS, said.append, ticks.append, rate=RATE)
    print(f"\ntickets demo: {report.seconds:.0f} s; worker log {tmp / 'demo-tickets'}")
    return report, ticks, said


def test_every_ticket_is_accounted_for_and_progress_was_shown(
    run: tuple[TicketsReport, list[TicketsTick], list[str]],
) -> None:
    report, ticks, said = run
    assert (report.good, report.bad) == (EVENTS - EVENTS // 200, EVENTS // 200)
    assert sum(int(n) for _, n, _ in report.dead_letters) == report.bad
    assert sum(b.labelled for b in report.buckets) == report.labelled > 0.6 * report.good
    last = ticks[-1]
    assert last.produced == EVENTS and last.in_warehouse == report.good
    assert last.scored >= report.good and last.weak_labels >= report.weak_judged
    assert any("streaming 1200 support tickets" in line for line in said)
    # it stopped its worker and left the broker it did not start alone
    assert any("worker" in line and "stopped" in line for line in report.stopped)
    assert report.left_running == []


def test_served_accuracy_beats_the_baseline_and_weak_labels_are_right(
    run: tuple[TicketsReport, list[TicketsTick], list[str]],
) -> None:
    report = run[0]
    print(
        f"\nserved {report.served_accuracy:.3f}, baseline {report.baseline:.3f}, weak labels "
        f"{report.weak_accuracy:.3f} on {report.weak_judged}"
    )
    assert report.served_accuracy > report.baseline + 0.3
    assert report.buckets[-1].served > report.buckets[-1].baseline + 0.15
    assert report.weak_accuracy >= 0.8 and report.weak_judged > 0.3 * report.labelled
    assert "embedding body_vec" in report.model
    # the labeller is scored like a model, on every label
    roles = {str(row[1]): row for row in report.roles}
    assert {"champion", "labeller"} <= set(roles)
    assert int(roles["labeller"][2]) == report.labelled


def test_the_ask_question_is_answered_with_the_demos_own_figures(
    run: tuple[TicketsReport, list[TicketsTick], list[str]],
) -> None:
    report = run[0]
    command, output = report.ask
    assert command.startswith("streamml ask") and report.ask_rows == 1, output
    assert "FROM annotations FINAL" in output  # the SQL it ran is shown
    found = re.search(r"zero_shot:topic\W+(\d+)\W+(\d+)\W+([\d.]+)", output)
    assert found, output
    annotated, labelled, accuracy = int(found[1]), int(found[2]), float(found[3])
    assert labelled == report.weak_judged and annotated >= labelled
    assert abs(accuracy - report.weak_accuracy) < 1e-4


def test_clusters_cover_every_ticket_and_the_png_is_saved(
    run: tuple[TicketsReport, list[TicketsTick], list[str]],
) -> None:
    report = run[0]
    assert sum(c.events for c in report.clusters) == report.good
    assert sum(c.new_product for c in report.clusters) > 0
    for _, partition, at in report.new_clusters:  # each reported cluster is in the table
        assert any(c.partition == partition and c.reported_at == at for c in report.clusters)
    assert report.png is not None and Path(report.png).stat().st_size > 10_000

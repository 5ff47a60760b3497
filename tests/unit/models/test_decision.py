"""Serving decision: metrics, the paired bootstrap, and when a candidate replaces the champion."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamml.errors import ModelError
from streamml.models.decision import (
    Outputs,
    baseline_outputs,
    decide,
    metric_value,
    paired_bootstrap,
)

CLF: dict[str, Any] = {"positive": "yes", "task": "classification", "lower_is_better": False}


def _plain(metric: str, labels: Sequence[Any], out: Outputs, positive: str | None) -> float:
    """The metric written out by hand, pair by pair for ROC AUC: the module's is vectorised."""
    said, score, n = [str(p) for p in out.predicted], [float(s) for s in out.score], len(labels)
    if metric == "rmse":
        return math.sqrt(sum((s - float(y)) ** 2 for s, y in zip(score, labels, strict=True)) / n)
    if metric == "mae":
        return sum(abs(s - float(y)) for s, y in zip(score, labels, strict=True)) / n
    if metric == "accuracy":
        return sum(p == str(y) for p, y in zip(said, labels, strict=True)) / n
    if metric == "roc_auc":
        pos = [s for s, y in zip(score, labels, strict=True) if y == positive]
        neg = [s for s, y in zip(score, labels, strict=True) if y != positive]
        if not pos or not neg:
            return math.nan
        wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
        return wins / (len(pos) * len(neg))
    tp = sum(p == y == positive for p, y in zip(said, labels, strict=True))
    said_pos, is_pos = said.count(str(positive)), list(labels).count(positive)
    precision = tp / said_pos if said_pos else 0.0
    recall = tp / is_pos if is_pos else 0.0
    if metric == "precision":
        return precision
    if metric == "recall":
        return recall
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _clf(version: str, y: np.ndarray, noise: float, seed: int, role: str = "shadow") -> Outputs:
    """A classifier whose score is the truth plus Gaussian noise (more noise: worse)."""
    rng = np.random.default_rng(seed)
    score = np.clip(y + rng.normal(0.0, noise, len(y)), 0.0, 1.0)
    return Outputs(version, role, score, np.where(score > 0.5, "yes", "no"))


def _truth(n: int, rate: float = 0.4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    y = np.random.default_rng(seed).random(n) < rate
    return y, np.where(y, "yes", "no")


# --- metrics -------------------------------------------------------------------------------


def test_classification_metrics_known_answers() -> None:
    labels = ["yes", "yes", "yes", "no", "no", "no", "no", "no"]
    said = ["yes", "yes", "no", "yes", "no", "no", "no", "no"]  # tp 2, fn 1, fp 1, tn 4
    out = Outputs("v1", "champion", np.zeros(8), said)
    got = {m: metric_value(m, labels, out, "yes") for m in ("accuracy", "precision", "recall")}
    assert got == {"accuracy": 0.75, "precision": 2 / 3, "recall": 2 / 3}
    assert metric_value("f1", labels, out, "yes") == pytest.approx(2 / 3)
    never = Outputs("v2", "shadow", np.zeros(8), ["no"] * 8)
    assert [metric_value(m, labels, never, "yes") for m in ("precision", "recall", "f1")] == [
        0.0
    ] * 3


def test_roc_auc_counts_ties_half_and_is_undefined_with_one_class() -> None:
    labels = ["a", "b", "b", "a"]
    # positives 0.9, 0.1; negatives 0.2, 0.9: win, tie, loss, loss -> 1.5 of 4 pairs
    out = Outputs("v1", "champion", np.array([0.9, 0.2, 0.9, 0.1]))
    assert metric_value("roc_auc", labels, out, "a") == 0.375
    flat = Outputs("v1", "champion", np.full(4, 0.3))
    assert metric_value("roc_auc", labels, flat, "a") == 0.5
    ranked = Outputs("v1", "champion", np.array([0.8, 0.1, 0.3, 0.8]))
    assert metric_value("roc_auc", labels, ranked, "a") == 1.0
    assert metric_value("roc_auc", labels, ranked, "b") == 0.0
    assert math.isnan(metric_value("roc_auc", ["a", "a"], Outputs("v", "x", np.ones(2)), "a"))


def test_regression_metrics_known_answers() -> None:
    out = Outputs("v1", "champion", np.array([1.0, 2.0, 5.0, 4.0]))
    labels = [1.0, 4.0, 2.0, 4.0]  # errors 0, -2, 3, 0
    assert metric_value("mae", labels, out, None) == 1.25
    assert metric_value("rmse", labels, out, None) == pytest.approx(math.sqrt(13 / 4))
    assert math.isnan(metric_value("rmse", [], Outputs("v1", "x", np.array([])), None))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["p", "q", "r"]), st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        min_size=1,
        max_size=40,
    )
)
def test_roc_auc_matches_pairwise_counting(events: list[tuple[str, float]]) -> None:
    labels = [y for y, _ in events]
    out = Outputs("v", "x", np.array([s for _, s in events]))
    got, want = metric_value("roc_auc", labels, out, "p"), _plain("roc_auc", labels, out, "p")
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_baseline_is_the_majority_class_with_a_constant_score_or_the_mean() -> None:
    labels = ["no", "yes", "no", "no"]
    base = baseline_outputs("classification", labels, "yes")
    assert list(base.predicted) == ["no"] * 4 and base.score.tolist() == [0.25] * 4
    assert metric_value("roc_auc", labels, base, "yes") == 0.5
    assert metric_value("accuracy", labels, base, "yes") == 0.75
    assert baseline_outputs("regression", [2.0, 4.0], None).score.tolist() == [3.0, 3.0]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ModelError, match="finite"):
        Outputs("v1", "champion", np.array([0.1, math.nan]))
    short = Outputs("v1", "champion", np.array([0.5]), ["yes"])
    with pytest.raises(ModelError, match="1 outputs for 2"):
        metric_value("roc_auc", ["yes", "no"], short, "yes")
    _, labels = _truth(50)
    a = _clf("v1", labels == "yes", 0.5, 1)
    with pytest.raises(ModelError, match="lower-is-better"):
        paired_bootstrap("rmse", labels, a, a, lower_is_better=False)
    with pytest.raises(ModelError, match="distinct"):
        decide(a, [a], labels, metric="accuracy", min_delta=0, min_labeled_events=1, **CLF)
    with pytest.raises(ModelError, match="unknown metric 'auc'"):
        metric_value("auc", labels, a, None)
    with pytest.raises(ModelError, match="does not fit"):
        decide(
            a,
            [],
            labels,
            metric="rmse",
            min_delta=0,
            min_labeled_events=1,
            positive=None,
            task="classification",
            lower_is_better=True,
        )


# --- paired bootstrap ----------------------------------------------------------------------


def _coin_models(n: int, seed: int) -> tuple[np.ndarray, Outputs, Outputs, np.ndarray]:
    """Models right on each event with probability 0.70 and 0.75: a true gain of 0.05."""
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(n) < 0.5, "yes", "no")
    flip = np.where(labels == "yes", "no", "yes")
    right_a, right_b = rng.random(n) < 0.70, rng.random(n) < 0.75
    a = Outputs("a", "champion", np.zeros(n), np.where(right_a, labels, flip))
    b = Outputs("b", "shadow", np.zeros(n), np.where(right_b, labels, flip))
    return labels, a, b, right_b.astype(float) - right_a.astype(float)


def test_bootstrap_interval_covers_the_true_difference_and_matches_the_normal_width() -> None:
    n = 20_000
    labels, a, b, diff = _coin_models(n, seed=0)
    c = paired_bootstrap("accuracy", labels, a, b, lower_is_better=False, positive="yes")
    assert c.low < 0.05 < c.high and c.n == n
    normal = 2 * 1.96 * diff.std() / math.sqrt(n)  # about 0.018
    assert c.high - c.low == pytest.approx(normal, rel=0.15)
    assert c.delta == pytest.approx(diff.mean())


def test_bootstrap_intervals_cover_the_true_difference_about_95_times_in_100() -> None:
    covered = 0
    for seed in range(100):
        labels, a, b, _ = _coin_models(500, seed)
        c = paired_bootstrap(
            "accuracy", labels, a, b, lower_is_better=False, positive="yes", n_boot=500, seed=seed
        )
        covered += c.low < 0.05 < c.high
    assert covered >= 88  # binomial(100, 0.95): mean 95, sd 2.2 (the width is checked above)


def test_pairing_detects_a_small_gain_that_separate_intervals_would_miss() -> None:
    y, labels = _truth(2_000, seed=5)
    a = _clf("a", y, 0.6, 6, role="champion")
    fixed = np.array(a.predicted)
    wrong = np.flatnonzero(fixed != labels)[:30]  # b = a, with 30 of its errors fixed
    fixed[wrong] = labels[wrong]
    b = Outputs("b", "shadow", a.score, fixed)
    c = paired_bootstrap("accuracy", labels, a, b, lower_is_better=False, positive="yes")
    assert c.delta == pytest.approx(0.015) and c.low > 0.005
    # unpaired, each accuracy alone has a 95% half-width of about 0.02: they would overlap


def test_lower_is_better_gains_are_positive_and_results_are_deterministic() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=1_000)
    a = Outputs("a", "champion", truth + rng.normal(0, 1.0, 1_000))
    b = Outputs("b", "shadow", truth + rng.normal(0, 0.5, 1_000))
    for metric in ("rmse", "mae"):
        c = paired_bootstrap(metric, truth, a, b, lower_is_better=True, seed=1)
        assert 0 < c.low < c.delta < c.high
        assert c == paired_bootstrap(metric, truth, a, b, lower_is_better=True, seed=1)
        assert c != paired_bootstrap(metric, truth, a, b, lower_is_better=True, seed=2)
        back = paired_bootstrap(metric, truth, b, a, lower_is_better=True, seed=1)
        assert back.delta == pytest.approx(-c.delta) and back.high == pytest.approx(-c.low)


def test_auc_bounds_are_undefined_when_resamples_often_miss_a_class() -> None:
    labels = np.array(["yes"] + ["no"] * 59)  # one positive: ~37% of resamples lack it
    said = np.full(60, "no")
    a = Outputs("a", "x", np.linspace(0, 1, 60), said)
    b = Outputs("b", "y", np.linspace(1, 0, 60), said)
    c = paired_bootstrap("roc_auc", labels, a, b, lower_is_better=False, positive="yes")
    assert math.isnan(c.low) and math.isnan(c.high) and not math.isnan(c.delta)
    d = decide(a, [b], labels, metric="roc_auc", min_delta=0, min_labeled_events=10, **CLF)
    assert d.action == "wait" and "undefined" in d.reason


# --- decide ---------------------------------------------------------------------------------


def test_a_clearly_better_candidate_is_promoted_and_the_table_is_auditable() -> None:
    y, labels = _truth(3_000)
    champ, good, meh = (
        _clf("v1", y, 0.8, 1, "champion"),
        _clf("v3", y, 0.3, 2),
        _clf("v2", y, 0.6, 3),
    )
    d = decide(
        champ, [meh, good], labels, metric="roc_auc", min_delta=0.02, min_labeled_events=500, **CLF
    )
    assert (d.action, d.version) == ("promote", "v3")
    assert d.reason.startswith("v3 roc_auc 0.9") and "on 3,000 events; baseline 0.500" in d.reason
    assert [(r.version, r.role) for r in d.table] == [
        ("v1", "champion"),
        ("v2", "shadow"),
        ("v3", "shadow"),
        ("baseline", "baseline"),
    ]
    row = d.table[2]
    same = paired_bootstrap("roc_auc", labels, champ, good, lower_is_better=False, positive="yes")
    assert row.vs_champion == same and row.value == metric_value("roc_auc", labels, good, "yes")
    assert d.table[0].vs_champion.delta == 0.0 and d.table[-1].value == 0.5
    # both v2 and v3 qualify: the higher lower bound wins
    assert d.table[1].vs_champion.low > 0.02 and row.vs_champion.low > d.table[1].vs_champion.low
    again = decide(
        champ, [meh, good], labels, metric="roc_auc", min_delta=0.02, min_labeled_events=500, **CLF
    )
    assert again == d


def test_a_slightly_better_candidate_on_few_events_is_kept_out() -> None:
    y, labels = _truth(120, seed=9)
    champ = _clf("v1", y, 0.45, 1, "champion")
    fixed = np.array(champ.predicted)
    wrong = np.flatnonzero(fixed != labels)[:3]
    fixed[wrong] = labels[wrong]
    better = Outputs("v2", "shadow", champ.score, fixed)  # three more right of 120
    d = decide(
        champ, [better], labels, metric="accuracy", min_delta=0.01, min_labeled_events=100, **CLF
    )
    row = d.table[1].vs_champion
    assert d.action == "keep" and d.version == "v1"
    assert row.delta == pytest.approx(0.025) and row.low <= 0.01
    assert "not above min_delta 0.01" in d.reason


def test_a_worse_candidate_is_never_promoted() -> None:
    y, labels = _truth(3_000)
    champ, worse = _clf("v1", y, 0.3, 1, "champion"), _clf("v2", y, 0.8, 2)
    for metric in ("roc_auc", "accuracy", "f1"):
        d = decide(champ, [worse], labels, metric=metric, min_delta=0, min_labeled_events=1, **CLF)
        assert d.action == "keep" and d.table[1].vs_champion.high < 0


def test_a_candidate_below_the_baseline_never_replaces_even_a_worse_champion() -> None:
    y, labels = _truth(3_000, rate=0.2)  # baseline "no": accuracy 0.8
    rng = np.random.default_rng(4)
    coin = Outputs("v1", "champion", rng.random(3_000), rng.choice(["yes", "no"], 3_000))
    fair = _clf("v2", y, 1.0, 5)  # better than a coin, worse than always "no"
    d = decide(coin, [fair], labels, metric="accuracy", min_delta=0, min_labeled_events=1, **CLF)
    cand = d.table[1]
    assert cand.vs_champion.low > 0 and cand.vs_baseline.high < 0
    assert cand.roc_auc is not None and cand.roc_auc > 0.5
    assert d.action == "keep_below_baseline" and d.version == "v1"
    assert d.reason.startswith("champion v1 accuracy") and "alert and retrain" in d.reason


def test_a_champion_below_the_baseline_is_replaced_with_min_delta_waived() -> None:
    y, labels = _truth(3_000)
    backwards = _clf("v1", ~y, 0.3, 1, "champion")  # ranks the classes upside down
    fine = _clf("v2", y, 0.9, 2)  # a noisy but honest model
    d = decide(
        backwards, [fine], labels, metric="roc_auc", min_delta=0.9, min_labeled_events=500, **CLF
    )
    assert d.table[0].vs_baseline.high < 0 and d.table[1].vs_champion.low < 0.9
    assert (d.action, d.version) == ("promote", "v2")
    assert d.reason.endswith(
        "; min_delta 0.9 waived because champion v1 roc_auc 0.010 is below the baseline's 0.500 "
        "(-0.490 [-0.493, -0.487])"
    )


def test_a_champion_ranking_below_chance_is_replaced_even_on_a_small_gain() -> None:
    y, labels = _truth(3_000)
    good = _clf("v0", y, 0.4, 1)
    upside_down = Outputs("v1", "champion", 1.0 - good.score, good.predicted)  # right classes
    fixed = np.array(good.predicted)
    wrong = np.flatnonzero(fixed != labels)[:60]
    fixed[wrong] = labels[wrong]
    better = Outputs("v2", "shadow", good.score, fixed)  # 2% more right, and honest scores
    d = decide(
        upside_down,
        [better],
        labels,
        metric="accuracy",
        min_delta=0.05,
        min_labeled_events=500,
        **CLF,
    )
    assert d.table[0].vs_baseline.low > 0 and d.table[1].vs_champion.low < 0.05
    assert (d.action, d.version) == ("promote", "v2")
    assert "min_delta 0.05 waived because champion v1 ROC AUC 0.0" in d.reason
    assert "is no better than chance" in d.reason


def test_a_candidate_ranking_no_better_than_chance_is_not_promoted_on_accuracy() -> None:
    y, labels = _truth(3_000)
    champ = _clf("v1", y, 0.7, 1, "champion")
    good = _clf("v2", y, 0.3, 2)
    scrambled = Outputs("v2", "shadow", 1.0 - good.score, good.predicted)  # right class, AUC < .5
    d = decide(
        champ, [scrambled], labels, metric="accuracy", min_delta=0, min_labeled_events=1, **CLF
    )
    assert d.table[1].vs_champion.low > 0 and d.table[1].vs_baseline.low > 0
    assert d.action == "keep" and "no better than chance" in d.reason
    honest = decide(
        champ, [good], labels, metric="accuracy", min_delta=0, min_labeled_events=1, **CLF
    )
    assert honest.action == "promote"


@pytest.mark.parametrize("metric", ["rmse", "mae"])
def test_regression_promotes_lower_error_only(metric: str) -> None:
    rng = np.random.default_rng(2)
    truth = rng.normal(10.0, 3.0, 2_000)
    champ = Outputs("v1", "champion", truth + rng.normal(0, 2.0, 2_000))
    sharp = Outputs("v2", "canary", truth + rng.normal(0, 1.0, 2_000))
    blunt = Outputs("v3", "fresh", truth + rng.normal(0, 2.5, 2_000))
    rule: dict[str, Any] = {"metric": metric, "lower_is_better": True, "positive": None}
    d = decide(
        champ,
        [blunt, sharp],
        truth,
        min_delta=0.1,
        min_labeled_events=1_000,
        task="regression",
        **rule,
    )
    assert (d.action, d.version) == ("promote", "v2") and d.table[2].vs_champion.low > 0.1
    assert d.table[1].vs_champion.delta < 0 and d.table[0].roc_auc is None
    kept = decide(
        champ, [blunt], truth, min_delta=0.1, min_labeled_events=1_000, task="regression", **rule
    )
    assert kept.action == "keep"


def test_it_waits_for_enough_labels_and_for_both_classes() -> None:
    y, labels = _truth(400)
    champ, good = _clf("v1", y, 0.8, 1, "champion"), _clf("v2", y, 0.2, 2)
    few = decide(
        champ, [good], labels, metric="roc_auc", min_delta=0, min_labeled_events=500, **CLF
    )
    assert (few.action, few.version, few.reason) == ("wait", "v1", "400 of 500 labelled events")
    ones = np.full(400, "no")
    one = decide(champ, [good], ones, metric="accuracy", min_delta=0, min_labeled_events=1, **CLF)
    assert one.action == "wait" and "one class only" in one.reason


# --- properties ----------------------------------------------------------------------------


@st.composite
def _contest(draw: st.DrawFn) -> dict[str, Any]:
    """A champion and candidates of random quality on random labelled events."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    metric = draw(st.sampled_from(["roc_auc", "accuracy", "f1", "precision", "rmse", "mae"]))
    n = draw(st.integers(2, 300))
    noises = draw(st.lists(st.floats(0.05, 2.0), min_size=2, max_size=4))
    flips = draw(st.lists(st.booleans(), min_size=len(noises), max_size=len(noises)))
    if metric in ("rmse", "mae"):
        truth = rng.normal(0.0, 1.0, n)
        models = [
            Outputs(f"v{i}", "shadow", truth + rng.normal(0.5 * flip, noise, n))
            for i, (noise, flip) in enumerate(zip(noises, flips, strict=True))
        ]
        labels: Any = truth
    else:
        y = rng.random(n) < draw(st.floats(0.05, 0.95))
        models = []
        for i, (noise, flip) in enumerate(zip(noises, flips, strict=True)):
            m = _clf(f"v{i}", y != flip, noise, int(rng.integers(2**31)))
            models.append(m)
        labels = np.where(y, "yes", "no")
    return {
        "models": models,
        "labels": labels,
        "metric": metric,
        "min_delta": draw(st.sampled_from([0.0, 0.01, 0.05])),
        "min_labeled_events": draw(st.integers(1, 200)),
        "seed": draw(st.integers(0, 3)),
    }


def _run(c: dict[str, Any]) -> Any:
    regression = c["metric"] in ("rmse", "mae")
    return decide(
        c["models"][0],
        c["models"][1:],
        c["labels"],
        metric=c["metric"],
        lower_is_better=regression,
        min_delta=c["min_delta"],
        min_labeled_events=c["min_labeled_events"],
        positive=None if regression else "yes",
        task="regression" if regression else "classification",
        seed=c["seed"],
        n_boot=300,
    )


@settings(max_examples=100, deadline=None)
@given(_contest())
def test_a_promoted_model_beats_the_baseline_and_clears_min_delta(c: dict[str, Any]) -> None:
    d = _run(c)
    n, labels, metric = len(c["labels"]), list(c["labels"]), c["metric"]
    if n < c["min_labeled_events"]:
        assert d.action == "wait"
    if d.action != "promote":
        return
    regression = metric in ("rmse", "mae")
    positive = None if regression else "yes"
    chosen = next(m for m in c["models"] if m.version == d.version)
    if regression:
        base_value = _plain(metric, labels, Outputs("b", "b", np.full(n, np.mean(labels))), None)
    else:
        majority = max(sorted(set(labels)), key=labels.count)
        rate = labels.count("yes") / n
        base = Outputs("b", "b", np.full(n, rate), [majority] * n)
        base_value = _plain(metric, labels, base, positive)
        assert _plain("roc_auc", labels, chosen, positive) > 0.5
    value = _plain(metric, labels, chosen, positive)
    assert value < base_value if regression else value > base_value
    row = next(r for r in d.table if r.version == d.version)
    champ = d.table[0]
    champion_auc = None if regression else _plain("roc_auc", labels, c["models"][0], positive)
    rescue = champ.vs_baseline.high < 0 or (champion_auc is not None and champion_auc <= 0.5)
    assert row.vs_champion.low > (0.0 if rescue else c["min_delta"])
    if rescue and row.vs_champion.low <= c["min_delta"]:
        assert "waived" in d.reason


@settings(max_examples=100, deadline=None)
@given(_contest(), st.integers(1, 1_000))
def test_never_promotes_on_fewer_than_min_labeled_events(c: dict[str, Any], more: int) -> None:
    c["min_labeled_events"] = len(c["labels"]) + more
    d = _run(c)
    assert d.action == "wait" and d.version == "v0" and d.table == []

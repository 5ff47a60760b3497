"""Evaluation of a trained batch model: metrics, time-series CV, error analysis, the
promotion decision and a report on disk (JSON, PNG plots, a short Markdown summary).

Predicted classes come from :func:`streamml.models.training.classify` with the model's
decision threshold, as serving decides, so the report describes what will be served."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]

from streamml.errors import ModelError, TrainingError
from streamml.models.training import (
    Dataset,
    EpochLoss,
    FloatArray,
    Label,
    Params,
    Splits,
    TrainResult,
    Trial,
    batch_spec,
    classify,
    decision_threshold,
    fit,
    predict,
    prepare,
    train,
)
from streamml.schemas.operations import LOWER_IS_BETTER, PromotionSpec
from streamml.schemas.spec import PipelineSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# --- metrics -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts with true classes as rows and predicted classes as columns."""

    classes: list[str]
    counts: list[list[int]]


def confusion_matrix(
    y_true: npt.NDArray[np.int64], y_pred: npt.NDArray[np.int64], classes: list[Label]
) -> ConfusionMatrix:
    k = len(classes)
    counts = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    return ConfusionMatrix([str(c) for c in classes], counts.tolist())


def roc_auc(positive: npt.NDArray[np.bool_], score: FloatArray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties averaged); 0.0 with one class only."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.0
    ranks = pd.Series(score.astype(np.float64)).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(
    y_true: npt.NDArray[np.int64],
    proba: FloatArray,
    positive_index: int | None,
    threshold: float | None = None,
) -> dict[str, float]:
    """accuracy, and precision/recall/F1/ROC AUC of the positive class (0.0 if undefined);
    classes are predicted with ``threshold`` (see training.classify)."""
    y_pred = classify(proba, positive_index, threshold)
    out = {"accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0}
    if positive_index is None:
        return out | {"precision": 0.0, "recall": 0.0, "f1": 0.0, "roc_auc": 0.0}
    is_pos, said_pos = y_true == positive_index, y_pred == positive_index
    tp = int((is_pos & said_pos).sum())
    precision = tp / int(said_pos.sum()) if said_pos.any() else 0.0
    recall = tp / int(is_pos.sum()) if is_pos.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    auc = roc_auc(is_pos, proba[:, positive_index])
    return out | {"precision": precision, "recall": recall, "f1": f1, "roc_auc": auc}


def regression_metrics(y_true: FloatArray, y_pred: FloatArray) -> dict[str, float]:
    err = y_pred.astype(np.float64).ravel() - y_true.astype(np.float64).ravel()
    mse = float((err**2).mean()) if len(err) else 0.0
    mae = float(np.abs(err).mean()) if len(err) else 0.0
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": mae}


def metrics_for(
    data: Dataset, outputs: FloatArray, threshold: float | None = None
) -> dict[str, float]:
    """The task's metrics for the model outputs on ``data`` (classes cut at ``threshold``)."""
    if data.task == "regression":
        return regression_metrics(data.y.astype(np.float32), outputs)
    y_true = data.y.astype(np.int64)
    return classification_metrics(y_true, outputs, data.positive_index, threshold)


# --- time-series cross-validation --------------------------------------------------------


@dataclass(frozen=True)
class FoldResult:
    fold: int
    train_rows: int  # rows before the test block (training plus early-stopping rows)
    test_rows: int
    test_start_ms: int
    test_end_ms: int
    metrics: dict[str, float]
    threshold: float | None = None  # chosen on the fold's own validation rows


@dataclass(frozen=True)
class CVResult:
    folds: list[FoldResult]
    mean: dict[str, float]
    std: dict[str, float]


def time_series_cv(
    spec: PipelineSpec,
    frame: pd.DataFrame,
    folds: int | None = None,
    *,
    params: Params | None = None,
    epochs: int | None = None,
) -> CVResult:
    """Expanding-window CV: fold i trains on the first i of ``folds + 1`` time blocks (its
    latest share held out for early stopping and the decision threshold, chosen as train()
    chooses it) and tests on block i + 1."""
    batch = batch_spec(spec)
    folds = folds or batch.cv_folds
    data = prepare(spec, frame)
    chosen = params or Params.of(batch)
    edges = _block_edges(data.ts_ms, folds + 1)
    results = []
    for i in range(1, folds + 1):
        train_end, test_end = edges[i], edges[i + 1]
        val_start = _block_edges(data.ts_ms[:train_end], 2, share=1 - batch.split.validation)[1]
        if not 0 < val_start < train_end < test_end:
            raise TrainingError(f"fold {i} of {folds} is empty", hint="use fewer cv_folds")
        rows = (slice(0, val_start), slice(val_start, train_end))
        fitted = fit(spec, data, *rows, chosen, trial=i, epochs=epochs)
        threshold = decision_threshold(spec, fitted.model, data.take(rows[1]))
        test = data.take(slice(train_end, test_end))
        scores = metrics_for(test, predict(fitted.model, test.X), threshold)
        first, last = int(test.ts_ms[0]), int(test.ts_ms[-1])
        results.append(FoldResult(i, train_end, len(test), first, last, scores, threshold))
    names = list(results[0].metrics)
    table = np.array([[r.metrics[n] for n in names] for r in results])
    mean = dict(zip(names, table.mean(axis=0).tolist(), strict=True))
    return CVResult(results, mean, dict(zip(names, table.std(axis=0).tolist(), strict=True)))


def _block_edges(ts: npt.NDArray[np.int64], blocks: int, share: float | None = None) -> list[int]:
    """Row indexes cutting ``ts`` into equal blocks (or at ``share``) at timestamp changes."""
    n = len(ts)
    cuts = [share] if share is not None else [i / blocks for i in range(1, blocks)]
    edges = [int(np.searchsorted(ts, ts[min(int(n * c), n - 1)], side="left")) for c in cuts]
    return [0, *edges, n]


# --- error analysis ----------------------------------------------------------------------


@dataclass(frozen=True)
class Slice:
    """Rows whose categorical feature has one value (``(missing)``: no one-hot column set)."""

    feature: str
    value: str
    rows: int
    error: float  # error rate (classification) or mean absolute error (regression)
    overall_error: float


@dataclass(frozen=True)
class ErrorCase:
    event_id: str
    ts_ms: int
    label: Label
    prediction: Label
    error: float  # 1 - probability of the true class, or |prediction - label|


def row_errors(
    data: Dataset, outputs: FloatArray, threshold: float | None = None
) -> tuple[FloatArray, FloatArray]:
    """Per row: (wrong 0/1 or abs error, 1 - p(true class) or abs error)."""
    if data.task == "regression":
        err = np.abs(outputs.ravel() - data.y.astype(np.float32))
        return err, err
    wrong = (classify(outputs, data.positive_index, threshold) != data.y).astype(np.float32)
    return wrong, 1 - outputs[np.arange(len(data)), data.y.astype(np.int64)]


def worst_slices(
    data: Dataset,
    outputs: FloatArray,
    *,
    min_rows: int = 20,
    top: int = 10,
    threshold: float | None = None,
) -> list[Slice]:
    """Slices of one-hot features (``name=value`` columns) ranked by error, worst first."""
    errors = row_errors(data, outputs, threshold)[0]
    overall = float(errors.mean()) if len(errors) else 0.0
    groups: dict[str, list[tuple[str, int]]] = {}
    for j, name in enumerate(data.feature_names):
        if "=" in name:
            feature, value = name.split("=", 1)
            groups.setdefault(feature, []).append((value, j))
    found = []
    for feature, columns in groups.items():
        active = data.X[:, [j for _, j in columns]] != 0
        masks = [(value, active[:, c]) for c, (value, _) in enumerate(columns)]
        for value, mask in [*masks, ("(missing)", ~active.any(axis=1))]:
            if int(mask.sum()) >= min_rows:
                rows, err = int(mask.sum()), float(errors[mask].mean())
                found.append(Slice(feature, value, rows, err, overall))
    return sorted(found, key=lambda s: (-s.error, -s.rows))[:top]


def largest_errors(
    data: Dataset, outputs: FloatArray, *, top: int = 10, threshold: float | None = None
) -> list[ErrorCase]:
    """The rows the model got most wrong (for classification: misclassified rows only)."""
    wrong, errors = row_errors(data, outputs, threshold)
    predicted = classify(outputs, data.positive_index, threshold)
    if data.task == "classification":
        errors = np.where(wrong > 0, errors, -1.0)
    cases = []
    for i in np.argsort(-errors, kind="stable")[:top].tolist():
        if errors[i] < 0:
            break
        if data.task == "regression":
            prediction: Label = float(outputs[i, 0])
        else:
            prediction = data.classes[int(predicted[i])]
        label = data.labels[i]
        cases.append(
            ErrorCase(data.event_ids[i], int(data.ts_ms[i]), label, prediction, float(errors[i]))
        )
    return cases


# --- promotion ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    deploy: bool
    reason: str
    metric: str
    candidate: float
    champion: float | None
    margin: float | None  # how much better the candidate is (positive = better)


def compare(
    candidate_metrics: Mapping[str, float],
    champion_metrics: Mapping[str, float] | None,
    promotion: PromotionSpec,
    *,
    labeled_events: int | None = None,
) -> Decision:
    """Deploy when there is no champion, or the candidate beats it by more than
    ``min_delta`` on ``promotion.metric`` (lower is better for rmse/mae). With
    ``labeled_events`` below ``min_labeled_events`` the comparison is not trusted."""
    metric = promotion.metric
    if metric not in candidate_metrics:
        raise ModelError(f"the candidate has no {metric!r} metric: {sorted(candidate_metrics)}")
    cand = float(candidate_metrics[metric])
    if champion_metrics is None:
        return Decision(True, "no champion yet", metric, cand, None, None)
    if metric not in champion_metrics:
        raise ModelError(f"the champion has no {metric!r} metric: {sorted(champion_metrics)}")
    champ = float(champion_metrics[metric])
    margin = champ - cand if metric in LOWER_IS_BETTER else cand - champ
    vs = f"{metric} {cand:.4f} vs champion {champ:.4f}"
    if labeled_events is not None and labeled_events < promotion.min_labeled_events:
        why = f"only {labeled_events} labelled events (< {promotion.min_labeled_events}); {vs}"
        return Decision(False, why, metric, cand, champ, margin)
    if not math.isfinite(margin):
        return Decision(False, f"{vs}: not comparable", metric, cand, champ, margin)
    deploy = margin > promotion.min_delta
    verdict = "beats" if deploy else "does not beat"
    reason = f"{vs}: {verdict} it by more than min_delta {promotion.min_delta}"
    return Decision(deploy, reason, metric, cand, champ, margin)


# --- report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearningCurve:
    """The chosen trial's loss per epoch (class-weighted as trained; regression: on the
    standardised target); ``train_loss[i]`` is epoch ``i + 1``."""

    trial: int
    best_epoch: int
    epochs_run: int
    min_epochs: int  # early stopping could not end the trial before this epoch
    stopped_early: bool
    train_loss: list[float]
    val_loss: list[float]


def learning_curve(trial: Trial, history: list[EpochLoss]) -> LearningCurve:
    epochs = sorted((e for e in history if e.trial == trial.number), key=lambda e: e.epoch)
    return LearningCurve(
        trial.number,
        trial.best_epoch,
        trial.epochs_run,
        trial.min_epochs,
        trial.stopped_early,
        [e.train_loss for e in epochs],
        [e.val_loss for e in epochs],
    )


@dataclass(frozen=True)
class EvaluationReport:
    pipeline: str
    task: str
    metrics: dict[str, float]  # on the test split
    confusion: ConfusionMatrix | None
    cv: CVResult | None
    slices: list[Slice]
    errors: list[ErrorCase]
    history: list[EpochLoss]
    splits: Splits
    best_params: dict[str, float | int | str | list[int]]
    seed: int
    best_trial: int
    decision: Decision | None = None
    residuals: tuple[list[float], list[float]] | None = None  # (prediction, label) per row
    threshold: float | None = None  # positive iff p(positive_class) >= threshold
    threshold_metric: str | None = None  # the metric the threshold was chosen for
    positive_class: str | None = None
    learning_curve: LearningCurve | None = None


def evaluate(
    spec: PipelineSpec,
    result: TrainResult,
    frame: pd.DataFrame,
    *,
    cv_folds: int | None = None,
    cv_epochs: int | None = None,
    champion_metrics: Mapping[str, float] | None = None,
    min_slice_rows: int = 20,
    cv: CVResult | None = None,
) -> EvaluationReport:
    """Score ``result`` on the rows of ``frame`` from the start of its test split on (all
    rows the model never trained on) and decide against ``champion_metrics`` (measured on
    the same rows); ``cv_folds=0`` skips cross-validation, ``cv`` passes one already run
    (:func:`fit_and_validate`)."""
    data = prepare(spec, frame, feature_names=result.feature_names, classes=result.classes)
    start = int(np.searchsorted(data.ts_ms, result.splits.test.ts_min_ms, side="left"))
    test = data.take(slice(start, None))
    if not len(test):
        raise ModelError("the frame has no rows in or after the test split")
    outputs = predict(result.model, test.X)
    threshold = result.threshold
    metrics = metrics_for(test, outputs, threshold)
    confusion = residuals = None
    if spec.task == "classification":
        pred = classify(outputs, result.positive_index, threshold)
        confusion = confusion_matrix(test.y.astype(np.int64), pred, result.classes)
    else:
        residuals = (outputs.ravel().tolist(), test.y.astype(np.float32).tolist())
    folds = batch_spec(spec).cv_folds if cv_folds is None else cv_folds
    if folds and cv is None:
        cv = time_series_cv(spec, frame, folds, params=result.best_params, epochs=cv_epochs)
    # the labelled-events bar is for judging a challenger online, not this offline gate
    decision = compare(metrics, champion_metrics, spec.promotion)
    best = next(t for t in result.trials if t.params == result.best_params)
    positive = result.positive_index
    return EvaluationReport(
        pipeline=spec.name,
        task=spec.task,
        metrics=metrics,
        confusion=confusion,
        cv=cv,
        slices=worst_slices(test, outputs, min_rows=min_slice_rows, threshold=threshold),
        errors=largest_errors(test, outputs, threshold=threshold),
        history=result.history,
        splits=result.splits,
        best_params=result.best_params.as_dict(),
        seed=result.seed,
        best_trial=best.number,
        decision=decision,
        residuals=residuals,
        threshold=threshold,
        threshold_metric=result.threshold_metric,
        positive_class=None if positive is None else str(result.classes[positive]),
        learning_curve=learning_curve(best, result.history),
    )


def fit_and_validate(
    spec: PipelineSpec, frame: pd.DataFrame, weak: pd.DataFrame | None = None
) -> tuple[TrainResult, CVResult | None]:
    """Train (with the weakly labelled rows, if any), then cross-validate the chosen
    parameters on the true labels: the costly part of a retrain, in one call that a
    process of its own can run."""
    result = train(spec, frame, weak=weak)
    folds = batch_spec(spec).cv_folds
    cv = time_series_cv(spec, frame, folds, params=result.best_params) if folds else None
    return result, cv


def write_report(report: EvaluationReport, out_dir: Path) -> list[Path]:
    """Write report.json, loss_curves.png (every trial), learning_curve.png (the chosen
    trial), confusion_matrix.png or residuals.png and summary.md into ``out_dir``; return
    the paths written."""
    from matplotlib.figure import Figure  # lazy: plotting is only needed here

    out_dir.mkdir(parents=True, exist_ok=True)
    body = dataclasses.asdict(report)
    body.pop("residuals")
    paths = [out_dir / "report.json"]
    paths[0].write_text(json.dumps(body, indent=2, default=str) + "\n", "utf-8")

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for trial in sorted({e.trial for e in report.history}):
        epochs = [e for e in report.history if e.trial == trial]
        x = [e.epoch for e in epochs]
        chosen = " (chosen)" if trial == report.best_trial else ""
        (line,) = ax.plot(x, [e.val_loss for e in epochs], label=f"trial {trial}{chosen}")
        ax.plot(x, [e.train_loss for e in epochs], ls="--", alpha=0.5, color=line.get_color())
    ax.set(xlabel="epoch", ylabel="loss", title="validation loss per trial (dashed: train)")
    ax.legend(fontsize="small")
    paths.append(out_dir / "loss_curves.png")
    fig.savefig(paths[-1], dpi=100)

    if report.learning_curve is not None:
        paths.append(out_dir / "learning_curve.png")
        _plot_learning_curve(report.learning_curve, Figure(figsize=(7, 4))).savefig(
            paths[-1], dpi=100
        )

    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    if report.confusion is not None:
        counts = np.array(report.confusion.counts)
        ax.imshow(counts, cmap="Blues")
        for (i, j), value in np.ndenumerate(counts):
            color = "white" if value > counts.max() / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=color)
        ticks = range(len(report.confusion.classes))
        ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true")
        ax.set_xticklabels(report.confusion.classes)
        ax.set_yticklabels(report.confusion.classes)
        paths.append(out_dir / "confusion_matrix.png")
        fig.savefig(paths[-1], dpi=100)
    elif report.residuals is not None:
        pred, label = np.array(report.residuals[0]), np.array(report.residuals[1])
        ax.scatter(pred, label - pred, s=6)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set(xlabel="prediction", ylabel="label - prediction", title="residuals (test)")
        paths.append(out_dir / "residuals.png")
        fig.savefig(paths[-1], dpi=100)

    paths.append(out_dir / "summary.md")
    paths[-1].write_text(summary(report), "utf-8")
    return paths


def _plot_learning_curve(curve: LearningCurve, fig: Figure) -> Figure:
    ax = fig.subplots()
    x = range(1, len(curve.train_loss) + 1)
    ax.plot(x, curve.train_loss, label="train")
    ax.plot(x, curve.val_loss, label="validation")
    ax.axvline(
        curve.best_epoch, color="black", ls=":", lw=1, label=f"best (epoch {curve.best_epoch})"
    )
    if curve.min_epochs > 1:
        ax.axvspan(0.5, curve.min_epochs + 0.5, color="grey", alpha=0.1, label="no early stop")
    ax.set(xlabel="epoch", ylabel="loss", title=f"learning curve: trial {curve.trial} (chosen)")
    ax.legend(fontsize="small")
    return fig


def summary(report: EvaluationReport) -> str:
    """A short Markdown summary a person reads first."""
    s = report.splits
    lines = [
        f"# {report.pipeline}: batch model evaluation",
        "",
        f"- rows: train {s.train.rows}, validation {s.validation.rows}, test {s.test.rows} "
        f"(test from ts {s.test.ts_min_ms} to {s.test.ts_max_ms})",
        f"- chosen params: {report.best_params} (seed {report.seed})",
        "- test metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in report.metrics.items()),
    ]
    if report.cv is not None:
        cv = ", ".join(f"{k} {v:.4f} ± {report.cv.std[k]:.4f}" for k, v in report.cv.mean.items())
        lines.append(f"- {len(report.cv.folds)}-fold time-series CV: {cv}")
    if report.threshold is not None:
        lines.append(
            f"- decision threshold: {report.positive_class} iff its probability >= "
            f"{report.threshold:.4f} (chosen on the validation rows for "
            f"{report.threshold_metric}; metrics and serving use it)"
        )
    if report.decision is not None:
        verb = "deploy" if report.decision.deploy else "keep the champion"
        lines.append(f"- decision: {verb} ({report.decision.reason})")
    if report.learning_curve is not None:
        lines += ["", *_curve_lines(report.learning_curve)]
    if report.slices:
        lines += ["", "Worst slices:", ""]
        lines += [
            f"- {x.feature}={x.value}: error {x.error:.3f} over {x.rows} rows "
            f"(overall {x.overall_error:.3f})"
            for x in report.slices[:5]
        ]
    if report.errors:
        lines += ["", "Largest errors:", ""]
        lines += [
            f"- {e.event_id}: label {e.label!r}, predicted {e.prediction!r} (error {e.error:.3f})"
            for e in report.errors[:5]
        ]
    return "\n".join(lines) + "\n"


def _curve_lines(curve: LearningCurve, rows: int = 8) -> list[str]:
    """The learning curve in words and a short table (about ``rows`` epochs)."""
    n, best = len(curve.train_loss), curve.best_epoch
    how = "stopped early" if curve.stopped_early else "ran its epoch budget"
    step = max(1, math.ceil(n / rows))
    shown = sorted(e for e in {*range(1, n + 1, step), best, n} if 1 <= e <= n)
    return [
        f"Learning curve (trial {curve.trial}, learning_curve.png): best validation loss at "
        f"epoch {best} of {n} ({how}; early stopping allowed from epoch {curve.min_epochs}).",
        "",
        "| epoch | train loss | validation loss |",
        "|---:|---:|---:|",
        *(
            f"| {e}{' (best)' if e == best else ''} | {curve.train_loss[e - 1]:.4f} "
            f"| {curve.val_loss[e - 1]:.4f} |"
            for e in shown
        ),
    ]

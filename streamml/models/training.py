"""Batch training of a pipeline's MLP: time-ordered split, early stopping, search, and the
decision threshold that serving applies.

Pure core: a DataFrame of labelled feature vectors in, a torch module and the record
of how it was trained out. No Kafka, nothing downloaded. The module standardises its
own inputs (mean/std are buffers) and ``forward`` returns what serving returns:
class probabilities ``[n, k]`` in ``classes`` order, or predictions ``[n, 1]``.
Classification losses weigh the classes by their training frequencies (``class_weight``);
a binary model's cut on the positive-class probability is chosen on the validation rows
for the metric promotion uses (:func:`choose_threshold`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]
import torch
from torch import nn

from streamml.errors import TrainingError
from streamml.models.online import coerce_label, positive_label
from streamml.schemas.operations import BatchModelSpec, SplitSpec
from streamml.schemas.spec import PipelineSpec

RESERVED = ("event_id", "ts", "label")
MIN_ROWS = 50
Label = bool | int | float | str
Progress = Callable[[int, int, float, float], None]  # (trial, epoch, train_loss, val_loss)
FloatArray = npt.NDArray[np.float32]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}
# Below this many multiply-adds per batch a single intra-op thread is fastest (threads only
# add synchronisation, and spin badly on a busy machine).
SINGLE_THREAD_WORK = 1 << 22


# --- data --------------------------------------------------------------------------------


def frame_from_rows(rows: Iterable[tuple[str, int, Mapping[str, float], object]]) -> pd.DataFrame:
    """``(event_id, ts_ms, features, label)`` rows as a frame: one column per feature name
    (sorted), a key missing from a vector is 0.0."""
    table = list(rows)
    vectors = [features for _, _, features, _ in table]
    names = sorted({name for vector in vectors for name in vector})
    clash = sorted(set(names) & set(RESERVED))
    if clash:
        raise TrainingError(f"feature names {clash} clash with the frame's own columns")
    index = {name: j for j, name in enumerate(names)}
    values = np.zeros((len(vectors), len(names)), dtype=np.float64)
    for i, vector in enumerate(vectors):
        for name, value in vector.items():
            values[i, index[name]] = value
    columns: dict[str, object] = {
        "event_id": [str(row[0]) for row in table],
        "ts": np.asarray([int(row[1]) for row in table], dtype=np.int64),
        "label": pd.Series([row[3] for row in table], dtype=object),
    }
    columns.update({name: values[:, j] for name, j in index.items()})
    return pd.DataFrame(columns)


@dataclass(frozen=True)
class Dataset:
    """A frame as arrays, sorted by (ts, event_id); ``y`` holds class indexes or targets."""

    task: str
    event_ids: list[str]
    ts_ms: npt.NDArray[np.int64]
    X: FloatArray
    labels: list[Label]
    y: npt.NDArray[np.int64] | FloatArray
    feature_names: list[str]
    classes: list[Label]
    positive_index: int | None  # index of label.positive in classes (classification)

    def __len__(self) -> int:
        return len(self.event_ids)

    def take(self, part: slice | Sequence[int]) -> Dataset:
        """The rows of a slice, or of a list of row numbers."""
        if isinstance(part, slice):
            rows = ("event_ids", "ts_ms", "X", "labels", "y")
            return dataclasses.replace(self, **{name: getattr(self, name)[part] for name in rows})
        index = np.asarray(part, dtype=np.int64)
        return dataclasses.replace(
            self,
            event_ids=[self.event_ids[i] for i in part],
            ts_ms=self.ts_ms[index],
            X=self.X[index],
            labels=[self.labels[i] for i in part],
            y=self.y[index],
        )


def prepare(
    spec: PipelineSpec,
    frame: pd.DataFrame,
    *,
    feature_names: Sequence[str] | None = None,
    classes: Sequence[Label] | None = None,
) -> Dataset:
    """Check and convert a frame; ``feature_names``/``classes`` align it to a trained model
    (missing features are 0.0, extra ones are dropped)."""
    missing = [c for c in RESERVED if c not in frame.columns]
    if missing:
        raise TrainingError(f"the frame has no {missing} column", hint="use frame_from_rows")
    if frame["label"].isna().any():
        raise TrainingError(f"{int(frame['label'].isna().sum())} rows have no label")
    names = list(feature_names or [str(c) for c in frame.columns if c not in RESERVED])
    if not names:
        raise TrainingError("the frame has no feature columns")
    aligned = frame.reindex(columns=names, fill_value=0.0)
    try:
        X = aligned.to_numpy(dtype=np.float32, na_value=0.0)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"feature columns must be numeric: {exc}") from None
    if not np.isfinite(X).all():
        raise TrainingError("features contain inf", hint="clip or log-transform the feature")
    ts = _ts_ms(frame["ts"])
    ids = [str(v) for v in frame["event_id"].tolist()]
    order = np.lexsort((np.asarray(ids, dtype=str), ts)) if ids else np.arange(0)
    classification = spec.task == "classification"
    raw = frame["label"].tolist()
    try:
        labels: list[Label] = [coerce_label(raw[i], classification) for i in order]
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"regression labels must be numbers: {exc}") from None
    if not classification:
        found: list[Label] = []
        y: npt.NDArray[np.int64] | FloatArray = np.asarray(labels, dtype=np.float32)
        positive = None
    else:
        found = list(classes) if classes is not None else sorted(set(labels), key=_class_key)
        index = {str(c): i for i, c in enumerate(found)}
        unknown = {str(v) for v in labels} - set(index)
        if unknown:
            raise TrainingError(f"labels {sorted(unknown)} are not among the classes {found}")
        y = np.asarray([index[str(v)] for v in labels], dtype=np.int64)
        positive = index.get(str(positive_label(spec.label.positive)))
    return Dataset(
        spec.task, [ids[i] for i in order], ts[order], X[order], labels, y, names, found, positive
    )


def _ts_ms(column: pd.Series) -> npt.NDArray[np.int64]:
    """Event times as epoch milliseconds (datetimes are read as UTC when naive)."""
    if column.isna().any():
        raise TrainingError(f"{int(column.isna().sum())} rows have no ts")
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return np.asarray(column.to_numpy(dtype=np.float64).round(), dtype=np.int64)
    try:
        stamps = pd.to_datetime(column, utc=True)
    except (TypeError, ValueError) as exc:
        raise TrainingError(f"ts must be datetimes or epoch milliseconds: {exc}") from None
    delta = (stamps - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    return np.asarray(delta.to_numpy(), dtype=np.int64)


def _class_key(value: Label) -> tuple[int, float, str]:
    if isinstance(value, bool | int | float):
        return (0, float(value), "")
    return (1, 0.0, str(value))


# --- split -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitPart:
    """One time-ordered part: rows ``[start, stop)`` of the sorted dataset."""

    start: int
    stop: int
    rows: int
    ts_min_ms: int
    ts_max_ms: int

    @property
    def slice(self) -> slice:
        return slice(self.start, self.stop)


@dataclass(frozen=True)
class Splits:
    train: SplitPart
    validation: SplitPart
    test: SplitPart


def time_split(ts_ms: npt.NDArray[np.int64], split: SplitSpec) -> Splits:
    """Train, then validation, then test, in time order; rows with equal timestamps stay
    in one part, so every test row is strictly later than every training row."""
    n = len(ts_ms)
    test_start = _cut(ts_ms, n - math.ceil(n * split.test), n)
    val_start = _cut(ts_ms, test_start - math.ceil(n * split.validation), test_start)
    if not 0 < val_start < test_start < n:
        raise TrainingError(
            f"cannot split {n} rows by time into train/validation/test",
            hint="too many equal timestamps or too few rows; collect more labelled events",
        )
    bounds = ((0, val_start), (val_start, test_start), (test_start, n))
    parts = [SplitPart(a, b, b - a, int(ts_ms[a]), int(ts_ms[b - 1])) for a, b in bounds]
    return Splits(*parts)


def _cut(ts: npt.NDArray[np.int64], i: int, hi: int) -> int:
    """The index nearest to ``i`` (within ``(0, hi)``) where the timestamp changes."""
    if i <= 0 or i >= hi or ts[i] != ts[i - 1]:
        return i
    back = int(np.searchsorted(ts, ts[i], side="left"))
    ahead = int(np.searchsorted(ts, ts[i - 1], side="right"))
    options = [c for c in (back, ahead) if 0 < c < hi]
    return min(options, key=lambda c: abs(c - i)) if options else i


# --- model -------------------------------------------------------------------------------


Z_LIMIT = 10.0  # standardized inputs are clipped to +-this
MIN_STD = 1e-3  # a training column varying less than this is switched off
OFF_SCALE = 1e12


class MLP(nn.Module):
    """Standardise, hidden layers, output head; ``forward`` is what ONNX exports."""

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(
        self, n_in: int, hidden: Sequence[int], activation: str, n_out: int, head: str, pos: int
    ) -> None:
        super().__init__()
        self.head = head  # "sigmoid" (bce), "softmax" (cross_entropy) or "identity" (mse)
        self.pos = pos
        self.register_buffer("x_mean", torch.zeros(n_in))
        self.register_buffer("x_std", torch.ones(n_in))
        self.register_buffer("y_mean", torch.zeros(1))
        self.register_buffer("y_std", torch.ones(1))
        layers: list[nn.Module] = []
        width = n_in
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, n_out))
        self.net = nn.Sequential(*layers)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # clipped: an input far outside what training saw must not saturate every unit
        z = torch.clamp((x - self.x_mean) / self.x_std, -Z_LIMIT, Z_LIMIT)
        out: torch.Tensor = self.net(z)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits(x)
        if self.head == "sigmoid":
            p = torch.sigmoid(out)
            return torch.cat([1 - p, p] if self.pos == 1 else [p, 1 - p], dim=1)
        if self.head == "softmax":
            return torch.softmax(out, dim=1)
        return out * self.y_std + self.y_mean


def predict(model: nn.Module, X: FloatArray) -> FloatArray:
    """The module's serving output for ``X`` (probabilities or predictions)."""
    model.eval()
    with torch.no_grad():
        out: FloatArray = model(torch.from_numpy(np.ascontiguousarray(X, np.float32))).numpy()
    return out


# --- training ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """One point of the hyperparameter space."""

    lr: float
    hidden: tuple[int, ...]
    weight_decay: float
    batch_size: int
    activation: str

    @classmethod
    def of(cls, batch: BatchModelSpec) -> Params:
        """The values the spec's batch_model section names."""
        hidden = tuple(batch.hidden)
        return cls(batch.lr, hidden, batch.weight_decay, batch.batch_size, batch.activation)

    def as_dict(self) -> dict[str, float | int | str | list[int]]:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}


@dataclass(frozen=True)
class EpochLoss:
    trial: int  # 1-based, into plan_trials()
    epoch: int  # 1-based
    train_loss: float
    val_loss: float


@dataclass(frozen=True)
class Trial:
    number: int
    params: Params
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    min_epochs: int = 1  # early stopping waited for this epoch (batch_model.min_steps)


@dataclass(frozen=True)
class Fitted:
    model: MLP
    trial: Trial
    history: list[EpochLoss]


@dataclass(frozen=True)
class TrainResult:
    """The chosen model (eval mode) and how it was found. Losses of regression models are
    on the standardised target."""

    model: MLP
    task: str
    loss: str
    feature_names: list[str]
    classes: list[Label]
    positive_index: int | None
    best_params: Params
    trials: list[Trial]
    history: list[EpochLoss]
    splits: Splits
    seed: int
    # binary classification: positive iff p(positive) >= threshold, chosen on the
    # validation rows for threshold_metric; None: the most probable class (argmax)
    threshold: float | None = None
    threshold_metric: str | None = None
    weak_rows: int = 0  # weakly labelled rows added to the training part


def ready() -> bool:
    """Nothing; calling it in a fresh process imports torch and this module ahead of use."""
    return True


def plan_trials(batch: BatchModelSpec) -> list[Params]:
    """The parameter sets a search tries, in order (just the spec's values without search)."""
    base = Params.of(batch)
    if batch.search is None:
        return [base]
    axes = batch.search.space.axes()
    total = math.prod(len(v) for v in axes.values())
    picks: Sequence[int] = range(total)
    if batch.search.method == "random":
        picks = random.Random(batch.seed).sample(range(total), min(batch.search.trials, total))
    plans = []
    for pick in picks:
        chosen: dict[str, Any] = {}
        rest = pick
        for key, values in reversed(axes.items()):  # mixed-radix decode, last key fastest
            rest, digit = divmod(rest, len(values))
            chosen[key] = tuple(values[digit]) if key == "hidden" else values[digit]
        plans.append(dataclasses.replace(base, **chosen))
    return plans


@dataclass(frozen=True)
class WeakRows:
    """Weakly labelled rows (no true label came) added to the training part only, each
    drawn into an epoch with probability ``confidence`` -- in expectation, a loss
    weighted by the labeller's confidence. Validation, test and every metric use true
    labels only."""

    data: Dataset
    confidence: FloatArray

    @property
    def used(self) -> int:
        return len(self.data)


def weak_rows(
    spec: PipelineSpec, frame: pd.DataFrame, data: Dataset, before_ms: int
) -> WeakRows | None:
    """The rows of ``frame`` (a training frame of weak labels with a ``confidence``
    column) before ``before_ms`` (the start of validation) whose label is one of the
    classes ``data`` was trained on, aligned to its features."""
    if frame is None or frame.empty:
        return None
    keep = (frame["ts"].to_numpy() < before_ms) & frame["label"].astype(str).isin(
        {str(c) for c in data.classes}
    ).to_numpy()
    frame = frame[keep]
    if frame.empty:
        return None
    confidence = frame["confidence"].to_numpy(dtype=np.float64)
    aligned = prepare(
        spec,
        frame.drop(columns=["confidence"]),
        feature_names=data.feature_names,
        classes=data.classes,
    )
    order = np.lexsort(
        (np.asarray(frame["event_id"].astype(str).tolist(), dtype=str), frame["ts"].to_numpy())
    )
    return WeakRows(aligned, np.clip(confidence[order], 0.0, 1.0))


def train(
    spec: PipelineSpec,
    frame: pd.DataFrame,
    *,
    progress: Progress | None = None,
    weak: pd.DataFrame | None = None,
) -> TrainResult:
    """Split by time, try every planned parameter set, keep the lowest validation loss, and
    choose the decision threshold on the validation rows. ``weak``: weakly labelled rows
    (``confidence`` column) that join the training part only (:class:`WeakRows`)."""
    batch = batch_spec(spec)
    if len(frame) < MIN_ROWS:
        raise TrainingError(
            f"only {len(frame)} labelled rows; training needs at least {MIN_ROWS}",
            hint="let more labels arrive or widen the training window",
        )
    data = prepare(spec, frame)
    splits = time_split(data.ts_ms, batch.split)
    extra = None
    if weak is not None and spec.task == "classification":
        extra = weak_rows(spec, weak, data, int(data.ts_ms[splits.validation.slice][0]))
    runs = []
    for number, params in enumerate(plan_trials(batch), start=1):
        rows = (splits.train.slice, splits.validation.slice)
        runs.append(fit(spec, data, *rows, params, trial=number, progress=progress, weak=extra))
    best = min(runs, key=lambda r: r.trial.best_val_loss)  # first of equals wins
    threshold = decision_threshold(spec, best.model, data.take(splits.validation.slice))
    return TrainResult(
        model=best.model,
        task=spec.task,
        loss=batch.loss,
        feature_names=data.feature_names,
        classes=data.classes,
        positive_index=data.positive_index,
        best_params=best.trial.params,
        trials=[r.trial for r in runs],
        history=[e for r in runs for e in r.history],
        splits=splits,
        seed=batch.seed,
        threshold=threshold,
        threshold_metric=None if threshold is None else spec.promotion.metric,
        weak_rows=0 if extra is None else extra.used,
    )


def batch_spec(spec: PipelineSpec) -> BatchModelSpec:
    if spec.batch_model is None:
        raise TrainingError(
            f"pipeline {spec.name!r} has no batch model", hint="add a batch_model section"
        )
    return spec.batch_model


def fit(
    spec: PipelineSpec,
    data: Dataset,
    train_rows: slice,
    val_rows: slice,
    params: Params,
    *,
    trial: int = 1,
    epochs: int | None = None,
    progress: Progress | None = None,
    weak: WeakRows | None = None,
) -> Fitted:
    """Train one model on ``train_rows``, early-stopping on ``val_rows``; best weights kept.
    ``epochs`` overrides the budget of :func:`epoch_budget` (a quick run takes just that).
    ``weak`` rows join each epoch's training rows, each with probability its confidence."""
    batch = batch_spec(spec)
    tr, va = data.take(train_rows), data.take(val_rows)
    model, loss_fn, y_tr, y_va = _setup(batch, tr, va, params)
    n_true = len(tr)
    draw = np.random.default_rng(batch.seed + 1)
    if weak is not None and weak.used:  # classification: bce or cross_entropy targets
        y_weak = torch.from_numpy(weak.data.y)
        if batch.loss == "bce":
            y_weak = (y_weak == (tr.positive_index or 0)).float().unsqueeze(1)
        y_tr = torch.cat([y_tr, y_weak.to(y_tr.dtype)])
        tr = dataclasses.replace(tr, X=np.concatenate([tr.X, weak.data.X]))
    opt = _optimizer(batch.optimizer, model, params)
    order = np.random.default_rng(batch.seed)
    x_tr, x_va = torch.from_numpy(tr.X), torch.from_numpy(va.X)
    history: list[EpochLoss] = []
    best_loss, best_epoch, best_state = math.inf, 0, _copy_state(model)
    epoch, stopped = 0, False
    expected = n_true + (0 if weak is None else int(weak.confidence.sum()))  # rows per epoch
    most, fewest = epoch_budget(batch, expected, params.batch_size, epochs)
    work = params.batch_size * sum(p.numel() for p in model.parameters())
    with _threads(1 if work < SINGLE_THREAD_WORK else None):
        for epoch in range(1, most + 1):
            rows = np.arange(len(tr.X))
            if len(tr.X) > n_true:  # weak rows: each drawn with probability its confidence
                assert weak is not None
                drawn = draw.random(len(tr.X) - n_true) < weak.confidence
                rows = np.concatenate([rows[:n_true], rows[n_true:][drawn]])
            perm = torch.from_numpy(rows[order.permutation(len(rows))])
            train_loss = _epoch(model, opt, loss_fn, x_tr[perm], y_tr[perm], params.batch_size)
            model.eval()
            with torch.no_grad():
                val_loss = float(loss_fn(model.logits(x_va), y_va).item())
            history.append(EpochLoss(trial, epoch, train_loss, val_loss))
            if progress is not None:
                progress(trial, epoch, train_loss, val_loss)
            if not math.isfinite(train_loss):
                raise TrainingError(f"training loss diverged in trial {trial}", hint="lower lr")
            if val_loss < best_loss:
                best_loss, best_epoch, best_state = val_loss, epoch, _copy_state(model)
            elif batch.early_stopping_patience <= epoch - best_epoch and fewest <= epoch < most:
                stopped = True
                break
    model.load_state_dict(best_state)
    model.eval()
    record = Trial(trial, params, best_loss, best_epoch, epoch, stopped, fewest)
    return Fitted(model, record, history)


def epoch_budget(
    batch: BatchModelSpec, rows: int, batch_size: int, epochs: int | None = None
) -> tuple[int, int]:
    """(most, fewest) epochs of a trial on ``rows`` training rows. A window of a few thousand
    rows is only a few dozen minibatches per epoch, too few Adam steps to converge in
    ``epochs`` passes, so both grow until a trial makes ``min_steps`` optimizer steps;
    early stopping waits for the fewest. An explicit ``epochs`` caps both."""
    per_epoch = max(1, math.ceil(rows / batch_size))
    fewest = max(1, math.ceil(batch.min_steps / per_epoch))
    if epochs is not None:
        return epochs, min(fewest, epochs)
    return max(batch.epochs, fewest), fewest


def _optimizer(kind: str, model: MLP, params: Params) -> torch.optim.Optimizer:
    # fused: one kernel per step instead of a Python loop over tensors; on models this small
    # that loop was a third of the training time
    decay = params.weight_decay
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), params.lr, weight_decay=decay, fused=True)
    return torch.optim.SGD(  # plain SGD with the usual momentum
        model.parameters(), params.lr, momentum=0.9, weight_decay=decay, fused=True
    )


def _epoch(
    model: MLP,
    opt: torch.optim.Optimizer,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
) -> float:
    """One pass over (already shuffled) rows in minibatches; the mean training loss."""
    model.train()
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        opt.zero_grad()
        loss = loss_fn(model.logits(xb), yb)
        torch.autograd.backward(loss)
        opt.step()
        total += float(loss.item()) * len(xb)
    return total / len(x)


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _setup(
    batch: BatchModelSpec, tr: Dataset, va: Dataset, params: Params
) -> tuple[MLP, LossFn, torch.Tensor, torch.Tensor]:
    """The module (seeded init, input/target statistics from ``tr``), loss and targets."""
    loss, seed = batch.loss, batch.seed
    n_classes = len(tr.classes)
    if tr.task == "classification" and len(set(tr.y.tolist())) < 2:
        raise TrainingError(
            f"the training window has a single class ({tr.labels[0]!r})",
            hint="widen the window or wait for labels of the other classes",
        )
    if loss == "bce" and (n_classes != 2 or tr.positive_index is None):
        raise TrainingError(
            f"loss bce needs two classes including label.positive; found {tr.classes}",
            hint="set label.positive to one of them, or use loss: cross_entropy",
        )
    head, n_out = {"bce": ("sigmoid", 1), "cross_entropy": ("softmax", n_classes)}.get(
        loss, ("identity", 1)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pos = tr.positive_index or 0
        model = MLP(tr.X.shape[1], params.hidden, params.activation, n_out, head, pos)
    std = tr.X.std(axis=0)
    model.x_mean.copy_(torch.from_numpy(tr.X.mean(axis=0)))
    # A feature (nearly) constant over the training window -- e.g. the hour of day over a
    # few minutes of events -- carries nothing to learn; scaled by a small std it would blow
    # up when serving sees it move. Such columns are switched off (a huge scale).
    model.x_std.copy_(torch.from_numpy(np.where(std > MIN_STD, std, OFF_SCALE).astype(np.float32)))
    weights = torch.ones(n_classes)
    if batch.class_weight == "balanced" and loss != "mse":
        weights = torch.from_numpy(class_weights(tr.y.astype(np.int64), n_classes))
    if loss == "bce":
        y_tr, y_va = (torch.from_numpy(d.y == pos).float().unsqueeze(1) for d in (tr, va))
        return model, _weighted_bce(weights[pos], weights[1 - pos]), y_tr, y_va
    if loss == "cross_entropy":
        ce = nn.CrossEntropyLoss(weight=weights)
        return model, ce, torch.from_numpy(tr.y), torch.from_numpy(va.y)
    mean, sd = float(tr.y.mean()), float(tr.y.std())
    sd = sd if sd > 0 else 1.0
    model.y_mean.fill_(mean)
    model.y_std.fill_(sd)
    y_tr, y_va = (torch.from_numpy((d.y - mean) / sd).float().unsqueeze(1) for d in (tr, va))
    return model, nn.MSELoss(), y_tr, y_va


def class_weights(y: npt.NDArray[np.int64], n_classes: int) -> FloatArray:
    """Balanced weights ``n / (k * n_c)`` for the ``k`` classes present in ``y`` (their mean
    over the rows is 1, as in scikit-learn); 1.0 for a class absent from ``y``."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = len(y) / (int(present.sum()) * counts[present])
    return weights.astype(np.float32)


def _weighted_bce(w_pos: torch.Tensor, w_neg: torch.Tensor) -> LossFn:
    """Binary cross-entropy with ``w_pos`` on positive rows and ``w_neg`` on negative ones."""
    bce = nn.BCEWithLogitsLoss(pos_weight=(w_pos / w_neg).reshape(1))

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = bce(logits, y) * w_neg
        return out

    return loss


# --- decision threshold ------------------------------------------------------------------

# Which score a cut maximises per promotion metric: accuracy, or F-beta with beta. Precision
# or recall alone is maximised by a degenerate cut (one row positive, or all of them), so
# they lean through F0.5 and F2. ROC AUC does not depend on the cut: the most accurate cut
# keeps predicted_class "the likelier class", as the online model's argmax is, so accuracy
# alerts and online/batch comparisons stay like for like.
THRESHOLD_RULES: dict[str, tuple[str, float]] = {
    "accuracy": ("accuracy", 0.0),
    "roc_auc": ("accuracy", 0.0),
    "f1": ("f_beta", 1.0),
    "precision": ("f_beta", 0.5),
    "recall": ("f_beta", 2.0),
}
DEFAULT_THRESHOLD = 0.5  # when the rows cannot choose one (a single class, constant scores)


def choose_threshold(
    positive: npt.NDArray[np.bool_], score: npt.NDArray[np.floating[Any]], metric: str
) -> float:
    """The cut on the positive-class probability (positive iff ``score >= cut``) that
    maximises ``metric`` (see THRESHOLD_RULES) on these rows. Cuts lie halfway between
    neighbouring distinct scores, and a cut putting every row in one class is never chosen;
    of equally good cuts the middle one is.

    >>> pos = np.array([True, True, False, True, False, False])
    >>> choose_threshold(pos, np.array([0.95, 0.85, 0.75, 0.5, 0.25, 0.125]), "accuracy")
    0.375
    """
    kind, beta = THRESHOLD_RULES[metric]
    order = np.argsort(-score, kind="stable")
    s, y = score[order].astype(np.float64), positive[order]
    n, n_pos = len(s), int(y.sum())
    k = np.flatnonzero(s[:-1] > s[1:]) + 1  # top-k rows positive; distinct scores only
    if n_pos in (0, n) or not len(k):
        return DEFAULT_THRESHOLD
    tp = np.cumsum(y)[k - 1].astype(np.float64)
    fp, fn = k - tp, n_pos - tp
    if kind == "accuracy":
        value = (tp + (n - n_pos - fp)) / n
    else:
        b2 = beta * beta
        value = (1 + b2) * tp / np.maximum((1 + b2) * tp + b2 * fn + fp, 1.0)
    best = np.flatnonzero(value == value.max())
    j = int(k[best[len(best) // 2]])
    return float((s[j - 1] + s[j]) / 2)


def decision_threshold(spec: PipelineSpec, model: nn.Module, rows: Dataset) -> float | None:
    """The cut for ``spec.promotion.metric`` chosen on ``rows`` (validation rows); None
    unless the task is binary with label.positive among the classes."""
    if rows.task != "classification" or len(rows.classes) != 2 or rows.positive_index is None:
        return None
    pos = rows.positive_index
    return choose_threshold(rows.y == pos, predict(model, rows.X)[:, pos], spec.promotion.metric)


def classify(
    outputs: FloatArray, positive_index: int | None, threshold: float | None
) -> npt.NDArray[np.int64]:
    """Class index per row: with a threshold (binary), positive iff p(positive) >= it;
    otherwise the most probable class."""
    if threshold is None or positive_index is None or outputs.shape[1] != 2:
        return np.asarray(outputs.argmax(axis=1), dtype=np.int64)
    hit = outputs[:, positive_index] >= threshold
    return np.where(hit, positive_index, 1 - positive_index).astype(np.int64)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads for the block (None: leave as is), then restore."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

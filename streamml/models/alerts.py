"""Alert rules over windowed metrics: which rules fire, reported once per change.

The caller measures each rule's metric over its window (``rule.window_s``) and passes
the value with the number of events behind it; :class:`AlertBook` answers with a
transition only when a rule starts or stops firing.

>>> from streamml.schemas.operations import AlertRule
>>> rule = AlertRule(name="acc", metric="accuracy", op="below", threshold=0.6, window_s=120)
>>> book = AlertBook([rule])
>>> book.update("acc", 0.52, n=340).message
'accuracy 0.52 below 0.6 over the last 120 s (n=340)'
>>> book.update("acc", 0.50, n=400) is None  # still firing: no news
True
>>> book.update("acc", 0.71, n=420).state
'resolved'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from streamml.schemas.operations import AlertRule


@dataclass(frozen=True)
class AlertTransition:
    rule: str
    state: str  # "firing" | "resolved"
    metric: str
    value: float
    threshold: float
    op: str
    window_s: float
    message: str  # one human line, e.g. "accuracy 0.52 below 0.6 over the last 120 s (n=340)"


def breached(rule: AlertRule, value: float) -> bool:
    """Is ``value`` on the wrong side of the rule's threshold? (NaN never is.)

    >>> rule = AlertRule(name="lag", metric="consumer_lag", op="above", threshold=20000)
    >>> breached(rule, 25000), breached(rule, 20000)
    (True, False)
    """
    if math.isnan(value):
        return False
    return value < rule.threshold if rule.op == "below" else value > rule.threshold


def _number(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


class AlertBook:
    """Tracks each rule's state; reports only changes (fire once, resolve once).

    A ``None`` value (nothing measured) or fewer than ``rule.min_events`` events behind
    the value leaves the state as it is.
    """

    def __init__(self, rules: Sequence[AlertRule]) -> None:
        self.rules = {rule.name: rule for rule in rules}
        self._firing: set[str] = set()

    @property
    def firing(self) -> list[str]:
        """Names of the rules firing now, in declaration order."""
        return [name for name in self.rules if name in self._firing]

    def update(self, rule: str, value: float | None, n: int) -> AlertTransition | None:
        """The rule's latest ``value`` over its window, measured on ``n`` events."""
        try:
            spec = self.rules[rule]
        except KeyError:
            raise KeyError(f"unknown alert rule {rule!r}; one of {list(self.rules)}") from None
        if value is None or n < spec.min_events:
            return None
        now = breached(spec, value)
        if now == (rule in self._firing):
            return None
        if now:
            self._firing.add(rule)
        else:
            self._firing.discard(rule)
        relation = spec.op if now else f"no longer {spec.op}"
        message = (
            f"{spec.metric} {_number(value)} {relation} {_number(spec.threshold)} "
            f"over the last {spec.window_s:g} s (n={n})"
        )
        return AlertTransition(
            rule=rule,
            state="firing" if now else "resolved",
            metric=spec.metric,
            value=value,
            threshold=spec.threshold,
            op=spec.op,
            window_s=spec.window_s,
            message=message,
        )

"""Events on ``streamml.control``: the control plane and the audit trail in one stream.

Every step of a model's life is one event, keyed by pipeline: what happened (``action``),
when, why, who did it, and the versions involved. Scorers react to the deployment
actions (hot swap); the warehouse sink writes every event to ClickHouse
``audit_events``, and those that carry a registry row also to ``model_versions``.

>>> event = ControlEvent.new("demo", "promoted", version="v2", previous="v1", reason="f1 +0.04")
>>> ControlEvent.from_json(event.to_json()) == event
True
>>> event.changes_deployment
True
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

# Actions that change which model serves or shadows; scorers reload on these.
DEPLOYMENT_ACTIONS = frozenset(
    {"registered", "challenger_set", "promoted", "rolled_back", "archived", "model_published"}
)
ACTIONS = DEPLOYMENT_ACTIONS | frozenset(
    {
        "drift_detected",
        "drift_confirmed",
        "drift_dismissed",
        "judged",
        "retrain_requested",
        "trained",
        "evaluated",
        "model_refused",
        "alert",
    }
)


def default_actor() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ControlEvent:
    pipeline: str
    action: str
    event_id: str
    ts_ms: int
    version: str = ""
    previous: str = ""
    reason: str = ""
    actor: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    # a model_versions row (registry state after the action), when the action has one
    model: dict[str, Any] | None = None

    @classmethod
    def new(cls, pipeline: str, action: str, **fields: Any) -> ControlEvent:
        if action not in ACTIONS:
            raise ValueError(f"unknown control action {action!r}; one of {sorted(ACTIONS)}")
        fields.setdefault("actor", default_actor())
        return cls(pipeline, action, uuid.uuid4().hex, int(time.time() * 1000), **fields)

    @property
    def changes_deployment(self) -> bool:
        return self.action in DEPLOYMENT_ACTIONS

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self), default=str)

    @classmethod
    def from_json(cls, payload: bytes) -> ControlEvent:
        data = orjson.loads(payload)
        if not isinstance(data, dict) or data.get("action") not in ACTIONS:
            raise ValueError("not a streamml control event")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

"""A/B rollout decisions: messages a person or a system sends while a split is running.

A decision is ``set_weights`` (a new weight for the new version), ``promote`` or ``rollback``; the
last two end the experiment. The app receives them on ``POST /rollout/decisions`` and keeps them
in a log (``statestore.open_decisions``: a file locally, the state's ConfigMap in the cluster),
which the DAG's decision sensor reads.
"""
from __future__ import annotations

from dataclasses import dataclass

ACTIONS = ("set_weights", "promote", "rollback")
TERMINAL = ("promote", "rollback")


class InvalidDecision(ValueError):
    pass


@dataclass(frozen=True)
class Decision:
    id: int
    new_version: str
    action: str
    weight: int | None = None
    by: str = ""
    at: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.action in TERMINAL


def check(action: str, weight: int | None) -> None:
    if action not in ACTIONS:
        raise InvalidDecision(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}")
    if action == "set_weights" and (weight is None or not 0 <= weight <= 100):
        raise InvalidDecision("set_weights needs a weight between 0 and 100 for the new version")

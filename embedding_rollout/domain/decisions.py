"""A/B rollout decisions: messages a person or a system sends while a split is running.

A decision is ``set_weights`` (a new weight for the new version), ``promote`` or ``rollback``; the
last two end the experiment. The log is an append-only JSON-lines file shared by the app (which
receives decisions on ``POST /rollout/decisions``) and the DAG's decision sensor; appends are
serialised with ``flock`` so ids stay unique across processes.
"""
from __future__ import annotations

import fcntl
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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


class DecisionLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, new_version: str, action: str, weight: int | None = None, by: str = "") -> Decision:
        check(action, weight)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            handle.seek(0)
            next_id = sum(1 for line in handle if line.strip()) + 1
            decision = Decision(next_id, new_version, action, weight, by, time.time())
            handle.write(json.dumps(asdict(decision)) + "\n")
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
        return decision

    def read(self, new_version: str | None = None, since: float = 0.0) -> list[Decision]:
        if not self.path.exists():
            return []
        decisions = [Decision(**json.loads(line)) for line in self.path.read_text().splitlines() if line.strip()]
        return [d for d in decisions if (new_version is None or d.new_version == new_version) and d.at >= since]

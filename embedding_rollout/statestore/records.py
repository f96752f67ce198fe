"""The rollout's records beside the deployment state: each backfill's checkpoint and the A/B
decisions. Locally each is a file under ``ER_HOME``; in the kubernetes runtime each is a key of the
state's ConfigMap (``backfill.<version>.from.<source>.json``, ``decisions.json``), written with the
same compare-and-swap, so no pod needs a shared volume for them.

A checkpoint says "every source document up to ``last_id`` is written". A ConfigMap slot writes
it at most every ``min_interval`` seconds (and always once the load is done): a load resumed from
an older checkpoint writes some documents again, which the index's versioned writes make
harmless, while one write per batch would put every batch through etcd and every app's watch.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from ..domain.decisions import Decision, check


class FileSlot:
    """One record in a file, replaced atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return str(self.path)

    def read(self) -> str | None:
        return self.path.read_text() if self.path.exists() else None

    def write(self, text: str, final: bool = False) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


class ConfigMapSlot:
    """One record as a key of the state's ConfigMap (``ConfigMapState``)."""

    def __init__(self, state, key: str, min_interval: float = 2.0):
        self.state, self.key, self.min_interval = state, key, min_interval
        self._written_at = float("-inf")

    def __repr__(self) -> str:
        return f"{self.state}[{self.key}]"

    def read(self) -> str | None:
        return self.state.read_key(self.key)

    def write(self, text: str, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self._written_at >= self.min_interval:
            self.state.update_key(self.key, lambda _: text)
            self._written_at = now


class DecisionLog:
    """The decisions, append-only, in a JSON-lines file; appends serialised with ``flock`` so ids
    stay unique across processes."""

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
        return selected(decisions, new_version, since)


class ConfigMapDecisionLog:
    """The decisions as a JSON list under one key of the state's ConfigMap. An append is a
    compare-and-swap, so ids stay unique across app pods; the newest ``keep`` are kept (a
    ConfigMap holds at most 1 MiB)."""

    KEY = "decisions.json"

    def __init__(self, state, keep: int = 500):
        self.state, self.keep = state, keep

    def append(self, new_version: str, action: str, weight: int | None = None, by: str = "") -> Decision:
        check(action, weight)
        appended: list[Decision] = []

        def add(text: str | None) -> str:
            decisions = json.loads(text) if text else []
            next_id = decisions[-1]["id"] + 1 if decisions else 1
            appended[:] = [Decision(next_id, new_version, action, weight, by, time.time())]
            return json.dumps([*decisions, asdict(appended[0])][-self.keep:])

        self.state.update_key(self.KEY, add)
        return appended[0]

    def read(self, new_version: str | None = None, since: float = 0.0) -> list[Decision]:
        text = self.state.read_key(self.KEY)
        return selected([Decision(**d) for d in json.loads(text)] if text else [], new_version, since)


def selected(decisions: list[Decision], new_version: str | None, since: float) -> list[Decision]:
    return [d for d in decisions if (new_version is None or d.new_version == new_version) and d.at >= since]

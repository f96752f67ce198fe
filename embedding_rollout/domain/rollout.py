"""A rollout's progress and its legal transitions, free of I/O.

Modelled on Argo Rollouts: the step list (the new version's weight at each step) and the index of
the current step live in the deployment state, not in the orchestrator, and only these transitions
move them. The record is also the deployment's lock: while a rollout is active, no other run may
begin one.

    Progressing ──pass_step──► (next step) … ──promote──► Promoted ──finish──► Succeeded
        │  ▲ pause/resume (a person decides an inconclusive step)          │
        └──┴──────────────────────────abort─────────────────────────────────┘
                                        ▼
                                     Aborted ──finish──► RolledBack

``Aborted`` is entered the moment anything fails or a rollback is decided; from then on no step may
change the weights (``guard_weights``), and the rollback, which owns the traffic, sends it back.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

PROGRESSING, PAUSED, PROMOTED, ABORTED = "Progressing", "Paused", "Promoted", "Aborted"
SUCCEEDED, ROLLED_BACK = "Succeeded", "RolledBack"
ACTIVE = (PROGRESSING, PAUSED, PROMOTED, ABORTED)  # the rollout holds the deployment
RAMPED, AB = "ramped", "ab"


class RolloutError(ValueError):
    """A transition the rollout's phase or step does not allow."""


class RolloutInProgress(RolloutError):
    """Another run's rollout holds the deployment."""


@dataclass(frozen=True)
class Rollout:
    run_id: str
    new: str
    current: str
    strategy: str = RAMPED
    plan: tuple[int, ...] = ()          # the new version's weight at each ramp step (empty for A/B)
    phase: str = PROGRESSING
    step: int = 0                        # the step in progress; len(plan) once every step passed
    step_started_at: float | None = None  # when the current step's weight was set (epoch seconds)
    extensions: int = 0                  # extra windows an inconclusive analysis added to this step
    message: str = ""
    owner: str = ""                      # the DAG whose run this is
    started_at: float = 0.0
    updated_at: float = 0.0

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    @property
    def steps_passed(self) -> bool:
        return self.step >= len(self.plan)

    def weight_at(self, step: int) -> int:
        return self.plan[step]

    def describe(self) -> str:
        where = (f"step {min(self.step + 1, len(self.plan))} of {len(self.plan)}" if self.plan
                 else self.strategy)
        return (f"rollout of {self.new} over {self.current} by {self.owner or 'run'} {self.run_id} "
                f"({where}): {self.phase}{' - ' + self.message if self.message else ''}")

    # -- transitions: each returns the new record or raises RolloutError -------------------------
    def _require(self, run_id: str, *phases: str) -> None:
        if run_id != self.run_id:
            raise RolloutError(f"run {run_id} does not hold the deployment: {self.describe()}")
        if self.phase not in phases:
            raise RolloutError(f"{self.describe()}; this needs phase {' or '.join(phases)}")

    def _current_step(self, step: int) -> None:
        if step != self.step or self.steps_passed:
            raise RolloutError(f"step {step + 1} is not the current step of {self.describe()}")

    def _with(self, now: float, **changes) -> "Rollout":
        return dataclasses.replace(self, updated_at=now, **changes)

    def start_step(self, run_id: str, step: int, now: float) -> "Rollout":
        """The current step's weight is being set now: its analysis window starts (again, on a retry)."""
        self._require(run_id, PROGRESSING)
        self._current_step(step)
        return self._with(now, step_started_at=now, extensions=0,
                          message=f"{self.new} at {self.plan[step]} %, analysing")

    def extend(self, run_id: str, step: int, reason: str, now: float) -> "Rollout":
        """An inconclusive analysis: gather one more window of data before judging again."""
        self._require(run_id, PROGRESSING)
        self._current_step(step)
        return self._with(now, extensions=self.extensions + 1, message=f"inconclusive, waiting longer: {reason}")

    def pass_step(self, run_id: str, step: int, reason: str, now: float) -> "Rollout":
        self._require(run_id, PROGRESSING)
        self._current_step(step)
        return self._with(now, step=step + 1, step_started_at=None, extensions=0, message=f"step {step + 1} "
                          f"passed: {reason}")

    def pause(self, run_id: str, reason: str, now: float) -> "Rollout":
        """Wait for a person (Argo pauses on an inconclusive analysis, never advances)."""
        self._require(run_id, PROGRESSING)
        return self._with(now, phase=PAUSED, message=reason)

    def resume(self, run_id: str, by: str, now: float) -> "Rollout":
        """A person accepted the paused step: it passes, and the ramp goes on."""
        self._require(run_id, PAUSED)
        return self._with(now, phase=PROGRESSING, step=self.step + 1, step_started_at=None, extensions=0,
                          message=f"step {self.step + 1} accepted by {by or 'a person'}")

    def promote(self, run_id: str, now: float) -> "Rollout":
        self._require(run_id, PROGRESSING)
        if self.strategy == RAMPED and not self.steps_passed:
            raise RolloutError(f"cannot promote before every ramp step passed: {self.describe()}")
        return self._with(now, phase=PROMOTED, message=f"{self.new} is the stable version")

    def abort(self, run_id: str, reason: str, now: float) -> "Rollout":
        """Idempotent: an aborted rollout stays aborted, with its first reason."""
        if run_id == self.run_id and self.phase == ABORTED:
            return self
        self._require(run_id, PROGRESSING, PAUSED, PROMOTED)
        return self._with(now, phase=ABORTED, message=reason)

    def finish(self, run_id: str, now: float) -> "Rollout":
        """The leftover version is removed: the rollout ends and releases the deployment."""
        self._require(run_id, PROMOTED, ABORTED, SUCCEEDED, ROLLED_BACK)
        if not self.active:
            return self
        if self.phase == PROMOTED:
            return self._with(now, phase=SUCCEEDED, message=f"{self.new} serves all traffic, {self.current} removed")
        return self._with(now, phase=ROLLED_BACK, message=f"rolled back ({self.message}); {self.new} removed")

    # -- guards --------------------------------------------------------------------------------
    def guard_weights(self, run_id: str, step: int | None = None) -> None:
        """A run's task may change the weights only while its rollout progresses (and, for a ramp
        step, only while that step is the current one)."""
        self._require(run_id, PROGRESSING)
        if step is not None:
            self._current_step(step)

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "plan": list(self.plan)}

    @classmethod
    def from_json(cls, data: dict) -> "Rollout":
        return cls(**{**data, "plan": tuple(data.get("plan", ()))})


TRANSITIONS = ("start_step", "extend", "pass_step", "pause", "resume", "promote", "abort", "finish")

"""Deployment state: which versions are deployed, the traffic split, and the write targets.

The state is a small JSON document shared by the app processes, the CLI and the Airflow steps.
``StateFile`` stores it on disk: readers re-check the file on every read (a ``stat`` call), so a
change takes effect at once without a restart; writers serialise read-modify-write under an
exclusive ``flock`` and replace the file atomically, so readers never see half a document.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import random
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..locks import exclusive_lock
from . import lifecycle
from .lifecycle import DEPLOYED, ENDED, ROLLED_BACK, ROUTABLE, STABLE, WRITABLE, StateError
from .rollout import PROMOTED, TRANSITIONS, Rollout, RolloutError, RolloutInProgress
from .traffic import InvalidWeights, assign_version, validate_weights
from .versions import is_version, parse_version

__all__ = ["ConcurrentUpdate", "DeploymentState", "StateError", "StateFile", "VersionSpec"]


class ConcurrentUpdate(RuntimeError):
    """The state changed since it was read (optimistic concurrency)."""


@dataclass(frozen=True)
class VersionSpec:
    """Where one model version lives (its generator endpoints and its index), and how far it got
    in its lifecycle (``lifecycle.PHASES``; ``verification``: the last verification's report)."""

    name: str
    dims: int
    index: str
    model_name: str = "embedder"
    generator_grpc: str = "127.0.0.1:8500"
    generator_rest: str = "http://127.0.0.1:8501"
    run_id: str = ""
    phase: str = DEPLOYED
    verification: dict | None = field(default=None, hash=False)

    @property
    def number(self) -> int:
        return parse_version(self.name)


@dataclass(frozen=True)
class DeploymentState:
    """The deployment as the request path sees it.

    ``weights`` holds the *live* versions: a version is routable (by weight, or explicitly by the
    ``x-model-version`` header) once it has an entry there, even at weight 0. ``write_targets`` get
    every streaming update. ``stable`` serves fallback traffic and is the default current version.
    ``rollout`` is the progress of the latest rollout; while it is active it holds the deployment.
    """

    versions: dict[str, VersionSpec] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    write_targets: tuple[str, ...] = ()
    stable: str | None = None
    rollout: Rollout | None = None
    revision: int = 0

    @property
    def live_versions(self) -> list[str]:
        return list(self.weights)

    def is_live(self, version: str | None) -> bool:
        return version in self.weights

    def spec(self, version: str) -> VersionSpec:
        try:
            return self.versions[version]
        except KeyError:
            raise StateError(f"model version {version} is not deployed") from None

    def assign(self, requested: str | None, user_key: str | None = None,
               rng: random.Random | None = None) -> str:
        """The version for a request: a valid live ``requested`` version, else by the weights."""
        if requested in self.weights:
            return requested
        if not self.weights:
            raise StateError("no live model version: the deployment has no traffic split yet")
        return assign_version(self.weights, user_key, rng)

    def validate(self) -> "DeploymentState":
        for name, spec in self.versions.items():
            if not is_version(name) or spec.name != name:
                raise StateError(f"invalid version entry {name!r}")
            if spec.phase not in lifecycle.PHASES:
                raise StateError(f"{name} has an unknown phase {spec.phase!r}")
        unknown = (set(self.weights) | set(self.write_targets)) - set(self.versions)
        if unknown:
            raise StateError(f"weights or write targets name undeployed versions: {sorted(unknown)}")
        if self.weights:
            try:
                validate_weights(self.weights)
            except InvalidWeights as exc:
                raise StateError(str(exc)) from exc
        if self.stable is not None and self.stable not in self.versions:
            raise StateError(f"stable version {self.stable} is not deployed")
        for name in self.weights:
            if self.phase(name) not in (*ROUTABLE, ROLLED_BACK):
                raise StateError(f"{name} has a weight but is {self.phase(name)}")
        for name in self.write_targets:
            if self.phase(name) not in (*WRITABLE, ROLLED_BACK):
                raise StateError(f"{name} is a write target but is {self.phase(name)}")
        stables = {name for name, spec in self.versions.items() if spec.phase == STABLE}
        if stables != ({self.stable} if self.stable else set()):
            raise StateError(f"the stable version is {self.stable}, but {sorted(stables)} have the stable phase")
        return self

    def phase(self, version: str) -> str:
        return self.spec(version).phase

    def _with_phase(self, version: str, phase: str, **changes) -> "DeploymentState":
        spec = dataclasses.replace(self.spec(version), phase=phase, **changes)
        return dataclasses.replace(self, versions={**self.versions, version: spec})

    # -- the lifecycle: every change of a version's phase goes through ``lifecycle`` --------------
    def with_version(self, spec: VersionSpec) -> "DeploymentState":
        """A newly deployed version: no traffic, no writes yet."""
        held = self.versions.get(spec.name)
        if held is not None and held.phase in ENDED:
            raise lifecycle.IllegalTransition(f"{spec.name} cannot be deployed: it is {held.phase} and being "
                                              f"removed; run remove --version {spec.name} to finish that first")
        spec = dataclasses.replace(spec, phase=DEPLOYED, verification=None)
        return dataclasses.replace(self, versions={**self.versions, spec.name: spec}).validate()

    def with_write_target(self, version: str) -> "DeploymentState":
        state = self._with_phase(version, lifecycle.dual_write(version, self.phase(version)))
        if version not in state.write_targets:
            state = dataclasses.replace(state, write_targets=(*state.write_targets, version))
        return state.validate()

    def with_backfill(self, version: str) -> "DeploymentState":
        """A bulk load of ``version``'s index ended; it needs a verification now (unless it serves)."""
        phase = lifecycle.backfilled(version, self.phase(version))
        kept = self.spec(version).verification if phase in ROUTABLE else None
        return self._with_phase(version, phase, verification=kept).validate()

    def with_verification(self, version: str, report: dict) -> "DeploymentState":
        """Record a verification's ``report`` (``complete``, figures, ``source``, ``at``): a passed
        one verifies the version; a failed one takes a verified version back to backfilled."""
        passed = lifecycle.verified if report.get("complete") else lifecycle.verification_failed
        phase = passed(version, self.phase(version))
        return self._with_phase(version, phase, verification=dict(report)).validate()

    def with_weights(self, weights: dict[str, int], run_id: str | None = None,
                     step: int | None = None) -> "DeploymentState":
        """Set the traffic split; versions left out stop being live. With ``run_id`` (a rollout's
        task) only while that run's rollout progresses, and with ``step`` only in that ramp step.
        Only a verified version can take traffic; a rolled-back one can only lose it."""
        if run_id is not None:
            self._rollout_of(run_id).guard_weights(run_id, step)
        state = self
        for version, weight in weights.items():
            phase = lifecycle.weighted(version, self.phase(version), weight, self.weights.get(version, 0))
            state = state._with_phase(version, phase)
        for version in set(self.weights) - set(weights):
            state = state._with_phase(version, lifecycle.leave_traffic(version, self.phase(version)))
        return dataclasses.replace(state, weights=dict(weights)).validate()

    def with_stable(self, version: str) -> "DeploymentState":
        """``version`` becomes the stable one (verified, at 100 %); the old stable one stays live."""
        phase = lifecycle.make_stable(version, self.phase(version), self.weights.get(version))
        return self._replace_stable(version, phase)

    def _replace_stable(self, version: str, phase: str) -> "DeploymentState":
        state = self
        if self.stable and self.stable != version:
            state = state._with_phase(self.stable, lifecycle.demote(self.stable, self.phase(self.stable),
                                                                    self.stable in self.weights))
        return dataclasses.replace(state._with_phase(version, phase), stable=version).validate()

    def retiring(self, version: str) -> "DeploymentState":
        """Removal begins: the version leaves routing and the write targets (it must have no
        traffic left), then drains; ``without_version`` forgets it once its index is gone."""
        if self.weights.get(version, 0) > 0:
            raise StateError(f"cannot remove {version}: it still has {self.weights[version]} % of traffic")
        if version == self.stable:
            raise StateError(f"cannot remove the stable version {version}; promote another first")
        rollout = self.rollout
        if rollout and rollout.active and version == rollout.current and rollout.phase != PROMOTED:
            raise StateError(f"cannot remove {version}: the {rollout.describe()} would roll back to it")
        state = self._with_phase(version, lifecycle.retire(version, self.phase(version)))
        return dataclasses.replace(
            state,
            weights={k: w for k, w in self.weights.items() if k != version},
            write_targets=tuple(t for t in self.write_targets if t != version),
        ).validate()

    def without_version(self, version: str) -> "DeploymentState":
        """Forget a version (retiring it first if that has not begun)."""
        state = self if self.phase(version) in ENDED and version not in self.write_targets else self.retiring(version)
        return dataclasses.replace(state, versions={k: v for k, v in state.versions.items() if k != version}).validate()

    def check_purge(self, version: str) -> None:
        """Tombstones are what stops an older write (a backfill's, a repair's, a late retry's) from
        bringing a deleted document back; they may go only while no other version exists that
        such writes could come from or go to."""
        others = sorted(v for v in self.versions if v != version)
        if others:
            raise StateError(f"cannot purge the tombstones of {version} while {', '.join(others)} "
                             f"{'is' if len(others) == 1 else 'are'} deployed: a backfill or repair "
                             "between them would resurrect deleted documents; remove the other versions first")

    # -- the rollout --------------------------------------------------------------------------
    def _rollout_of(self, run_id: str) -> Rollout:
        if self.rollout is None:
            raise RolloutError(f"run {run_id} holds no rollout: there is none")
        return self.rollout

    def begin_rollout(self, rollout: Rollout) -> "DeploymentState":
        """Take the deployment for ``rollout``; idempotent for the run that holds it already."""
        held = self.rollout
        if held is not None and held.active:
            if held.run_id == rollout.run_id:
                return self
            raise RolloutInProgress(f"another rollout holds the deployment: {held.describe()}. One rollout "
                                    f"runs at a time; trigger again when it has ended")
        if rollout.current not in self.weights:
            raise StateError(f"current version {rollout.current} is not live (live: {sorted(self.weights)})")
        return dataclasses.replace(self, rollout=rollout)

    def advance_rollout(self, run_id: str, transition: str, now: float, **arguments) -> "DeploymentState":
        """Apply one of the rollout's transitions (``rollout.TRANSITIONS``) for the run holding it.

        ``promote`` also makes the new version the stable one; ``abort`` after a promotion makes
        the old version stable again, which needs it still deployed and written to."""
        rollout = self._rollout_of(run_id)
        changed = getattr(rollout, transition)(run_id, now=now, **arguments)
        state = dataclasses.replace(self, rollout=changed)
        if transition == "promote":
            if rollout.new not in self.write_targets:
                raise RolloutError(f"cannot promote {rollout.new}: it is not a write target")
            state = state.with_stable(rollout.new)
        elif transition == "abort" and rollout.phase != changed.phase:
            if rollout.phase == PROMOTED:
                if rollout.current not in self.versions or rollout.current not in self.write_targets:
                    raise RolloutError(f"cannot roll back to {rollout.current}: its removal has begun")
                state = state._replace_stable(rollout.current,
                                              lifecycle.restore_stable(rollout.current, self.phase(rollout.current)))
            if rollout.new in state.versions:
                state = state._with_phase(rollout.new, lifecycle.roll_back(rollout.new, state.phase(rollout.new)))
        return state.validate()

    def change_rollout(self, transition: str, run_id: str, now: float, rollout: dict | None = None,
                       **arguments) -> "DeploymentState":
        """``begin`` (with the ``rollout`` to record) or one of ``rollout.TRANSITIONS`` with the
        arguments it takes (``step``, ``reason``, ``by``), as the API and the CLI receive them."""
        if transition == "begin":
            if not rollout:
                raise RolloutError("begin needs the rollout to record (new, current, strategy, plan)")
            fields = {k: (tuple(v) if k == "plan" else v) for k, v in rollout.items()}
            return self.begin_rollout(Rollout(run_id=run_id, started_at=now, updated_at=now, **fields))
        if transition not in TRANSITIONS:
            raise RolloutError(f"unknown transition {transition!r}: use begin or one of {', '.join(TRANSITIONS)}")
        wanted = [p for p in inspect.signature(getattr(Rollout, transition)).parameters
                  if p not in ("self", "run_id", "now")]
        missing = [p for p in wanted if arguments.get(p) is None]
        if missing:
            raise RolloutError(f"{transition} needs {', '.join(missing)}")
        return self.advance_rollout(run_id, transition, now, **{p: arguments[p] for p in wanted})

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "revision": self.revision,
            "stable": self.stable,
            "weights": self.weights,
            "write_targets": list(self.write_targets),
            "versions": {k: dataclasses.asdict(v) for k, v in self.versions.items()},
            "rollout": self.rollout.to_json() if self.rollout else None,
        }

    @classmethod
    def from_json(cls, data: dict) -> "DeploymentState":
        rollout = data.get("rollout")
        weights = {k: int(w) for k, w in data.get("weights", {}).items()}
        write_targets = tuple(data.get("write_targets", ()))
        stable = data.get("stable")

        def spec(name: str, fields: dict) -> VersionSpec:  # a state file from before phases has none
            phase = fields.get("phase") or lifecycle.inferred(name, stable, weights, write_targets)
            return VersionSpec(**{**fields, "phase": phase})

        return cls(
            versions={k: spec(k, v) for k, v in data.get("versions", {}).items()},
            weights=weights,
            write_targets=write_targets,
            stable=stable,
            rollout=Rollout.from_json(rollout) if rollout else None,
            revision=int(data.get("revision", 0)),
        ).validate()


class StateFile:
    """The deployment state in a JSON file, safe for several processes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._cache: tuple[tuple[int, int, int], DeploymentState] | None = None
        self._cache_lock = threading.Lock()

    def read(self) -> DeploymentState:
        """The current state; cheap when unchanged (one ``stat``)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return DeploymentState()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._cache_lock:
            if self._cache and self._cache[0] == stamp:
                return self._cache[1]
        state = DeploymentState.from_json(json.loads(self.path.read_text()))
        with self._cache_lock:
            self._cache = (stamp, state)
        return state

    def _locked(self):
        return exclusive_lock(self._lock_path)

    def update(self, change: Callable[[DeploymentState], DeploymentState],
               expected_revision: int | None = None) -> DeploymentState:
        """Apply ``change`` atomically; the revision grows by one when anything changed."""
        with self._locked():
            self._cache = None
            current = self.read()
            if expected_revision is not None and current.revision != expected_revision:
                raise ConcurrentUpdate(
                    f"state revision is {current.revision}, expected {expected_revision}")
            new = change(current).validate()
            if new.to_json() | {"revision": 0} == current.to_json() | {"revision": 0}:
                return current
            new = dataclasses.replace(new, revision=current.revision + 1)
            self._write(new)
            return new

    def _write(self, state: DeploymentState) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(state.to_json(), handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

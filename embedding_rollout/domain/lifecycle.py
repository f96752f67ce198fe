"""A model version's lifecycle and its legal transitions, free of I/O.

    deployed ─dual_write─► dual-writing ─backfilled─► backfilled ─verified─► verified
                                                          ▲                     │ go_live
                                                          └──── (a new load) ───┤
                                                                                ▼
                        retired ◄──retire── (any but stable)     live ─make_stable─► stable
                                                                  │
                                                                  └─roll_back─► rolled-back

Each version records its phase in the deployment state, and only these transitions change it:
every one checks its precondition and names the phase and what is missing when it refuses. A
version is routable (live) only once verified, stable only at 100 % of the traffic, and it can
leave the deployment only once it is not the stable one.
"""
from __future__ import annotations

DEPLOYED, DUAL_WRITING, BACKFILLED, VERIFIED = "deployed", "dual-writing", "backfilled", "verified"
LIVE, STABLE, RETIRED, ROLLED_BACK = "live", "stable", "retired", "rolled-back"
PHASES = (DEPLOYED, DUAL_WRITING, BACKFILLED, VERIFIED, LIVE, STABLE, RETIRED, ROLLED_BACK)
WRITABLE = (DUAL_WRITING, BACKFILLED, VERIFIED, LIVE, STABLE)  # the phases of a write target
ROUTABLE = (LIVE, STABLE)                                        # the phases of a version with a weight
ENDED = (RETIRED, ROLLED_BACK)                                   # leaving the deployment


class StateError(ValueError):
    """An update that would leave the deployment state inconsistent."""


class IllegalTransition(StateError):
    """A lifecycle transition the version's phase does not allow."""


def _refuse(version: str, phase: str, wanted: str, missing: str) -> IllegalTransition:
    return IllegalTransition(f"{version} cannot {wanted}: it is {phase}; {missing}")


def _not_ended(version: str, phase: str, wanted: str) -> None:
    if phase in ENDED:
        raise _refuse(version, phase, wanted, "deploy it again to use it")


def dual_write(version: str, phase: str) -> str:
    """Streaming updates start going to the version (again, on a retry)."""
    _not_ended(version, phase, "become a write target")
    return DUAL_WRITING if phase == DEPLOYED else phase


def backfilled(version: str, phase: str) -> str:
    """A bulk load ended. Only a write target may be loaded, or the writes made during the load
    are lost; a new load needs a new verification, unless the version serves already."""
    _not_ended(version, phase, "be backfilled")
    if phase == DEPLOYED:
        raise _refuse(version, phase, "be backfilled", "start the dual-write first, or the writes made during "
                                                      "the backfill are lost (embedding-rollout dual-write)")
    return phase if phase in ROUTABLE else BACKFILLED


def verified(version: str, phase: str) -> str:
    """A verification found every source document and tombstone in the version's index."""
    _not_ended(version, phase, "be verified")
    if phase in (DEPLOYED, DUAL_WRITING):
        raise _refuse(version, phase, "be verified", "its backfill has not ended (embedding-rollout index load; "
                                                      "a sliced one ends with index finish)")
    return phase if phase in ROUTABLE else VERIFIED


def verification_failed(version: str, phase: str) -> str:
    """A verification found a gap: a verified version must be verified again before it takes
    traffic; one that serves already keeps serving (the rollout decides on the record)."""
    _not_ended(version, phase, "be verified")
    verified(version, phase)  # the same precondition: a finished backfill
    return phase if phase in ROUTABLE else BACKFILLED


def weighted(version: str, phase: str, weight: int, held: int) -> str:
    """The version gets ``weight`` (it held ``held``): a rolled-back version may only lose traffic."""
    if phase == ROLLED_BACK:
        if weight > held:
            raise _refuse(version, phase, "take more traffic", f"it is rolled back and can only lose its {held} %")
        return phase
    return go_live(version, phase)


def go_live(version: str, phase: str) -> str:
    """The version gets a weight (0 included: routable by the version header)."""
    if phase in ROUTABLE:
        return phase
    if phase != VERIFIED:
        missing = ("it is leaving the deployment" if phase in ENDED else
                   "it needs a backfill and a passed verification first (embedding-rollout index verify)")
        raise _refuse(version, phase, "take traffic", missing)
    return LIVE


def leave_traffic(version: str, phase: str) -> str:
    """The version has no weight any more; it may come back while it stays verified."""
    return VERIFIED if phase == LIVE else phase


def make_stable(version: str, phase: str, weight: int | None) -> str:
    """The version becomes the stable one: verified, and serving all the traffic."""
    if phase == STABLE:
        return phase
    if phase not in (VERIFIED, LIVE):
        raise _refuse(version, phase, "become stable", "it needs a passed verification and 100 % of the traffic")
    if weight != 100:
        raise _refuse(version, phase, "become stable",
                      f"it has {'no weight' if weight is None else f'{weight} %'} of the traffic; stable needs 100 %")
    return STABLE


def restore_stable(version: str, phase: str) -> str:
    """A rollback after a promotion: the old version is stable again before it takes the
    traffic back (the rollback's own weight change follows)."""
    if phase not in (VERIFIED, LIVE, STABLE):
        raise _refuse(version, phase, "be stable again", "only a verified version can take the traffic back")
    return STABLE


def demote(version: str, phase: str, routable: bool) -> str:
    """Another version became stable: this one keeps serving its weight, if it has one."""
    if phase != STABLE:
        return phase
    return LIVE if routable else VERIFIED


def roll_back(version: str, phase: str) -> str:
    """A rollout was aborted: its new version takes no more traffic."""
    if phase == STABLE:
        raise _refuse(version, phase, "be rolled back", "make the old version stable first")
    return phase if phase in ENDED else ROLLED_BACK


def retire(version: str, phase: str) -> str:
    """Removal begins: out of routing and write targets, draining, then gone."""
    if phase == STABLE:
        raise _refuse(version, phase, "be removed", "promote another version first")
    return phase if phase == ROLLED_BACK else RETIRED


def inferred(version: str, stable: str | None, weights: dict, write_targets) -> str:
    """The phase of a version recorded before phases existed."""
    if version == stable:
        return STABLE
    if version in weights:
        return LIVE
    return DUAL_WRITING if version in write_targets else DEPLOYED

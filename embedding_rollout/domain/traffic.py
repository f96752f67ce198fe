"""Traffic split between live model versions.

Weights are integer percentages summing to 100, as in Istio's weighted routes. Assignment maps a
request to a version: sticky by a user key (a stable hash bucket) when there is one, otherwise at
random by weight. Buckets are laid out newest version first, so raising the newest version's weight
only ever moves users from older versions to it, never back and forth.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

from .versions import InvalidVersion, is_version, version_key

BUCKETS = 10_000  # 0.01 % resolution for the hash of a user key


class InvalidWeights(ValueError):
    """A traffic split that Istio (or the local router) must not be given."""


def validate_weights(weights: Mapping[str, int]) -> dict[str, int]:
    """Return a clean copy of ``weights`` or raise :class:`InvalidWeights` naming the problem."""
    if not weights:
        raise InvalidWeights("weights must name at least one version")
    clean: dict[str, int] = {}
    for version, weight in weights.items():
        if not is_version(version):
            raise InvalidWeights(f"invalid model version {version!r} in weights")
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise InvalidWeights(f"weight of {version} must be an integer, got {weight!r}")
        if not 0 <= weight <= 100:
            raise InvalidWeights(f"weight of {version} must be between 0 and 100, got {weight}")
        clean[version] = weight
    total = sum(clean.values())
    if total != 100:
        raise InvalidWeights(f"weights must sum to 100, got {total} ({clean})")
    return clean


def split_between(new: str, old: str, new_weight: int) -> dict[str, int]:
    """The two-version split used by the rollout: ``new_weight`` % to ``new``, the rest to ``old``."""
    return validate_weights({new: new_weight, old: 100 - new_weight})


def newest_first(versions: Sequence[str]) -> list[str]:
    try:
        return sorted(versions, key=version_key, reverse=True)
    except InvalidVersion as exc:
        raise InvalidWeights(str(exc)) from exc


def bucket_of(user_key: str) -> int:
    """A stable bucket in ``[0, BUCKETS)`` for a user key (same key, same bucket, every process)."""
    digest = hashlib.sha256(user_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def _pick(weights: Mapping[str, int], point: float) -> str:
    """The version whose cumulative range (newest first, scaled to BUCKETS) contains ``point``."""
    upper = 0.0
    ordered = newest_first([v for v, w in weights.items() if w > 0])
    for version in ordered:
        upper += weights[version] * BUCKETS / 100
        if point < upper:
            return version
    return ordered[-1]


def assign_version(weights: Mapping[str, int], user_key: str | None = None,
                   rng: random.Random | None = None) -> str:
    """Assign one version to a request by the traffic split."""
    if not any(w > 0 for w in weights.values()):
        raise InvalidWeights("no version has a positive weight")
    if user_key:
        return _pick(weights, bucket_of(user_key))
    return _pick(weights, (rng or random).random() * BUCKETS)


def ramp_plan(step_percent: int, max_weight: int = 100) -> list[int]:
    """Weights of the new version at each ramp step, Flagger style: step, 2*step, … up to max."""
    if isinstance(step_percent, bool) or not isinstance(step_percent, int) or not 1 <= step_percent <= 100:
        raise InvalidWeights(f"step_percent must be an integer between 1 and 100, got {step_percent!r}")
    if not 1 <= max_weight <= 100:
        raise InvalidWeights(f"max_weight must be between 1 and 100, got {max_weight!r}")
    plan = list(range(step_percent, max_weight, step_percent))
    return plan + [max_weight]


def validate_plan(weights: Sequence[int]) -> list[int]:
    """An explicit list of new-version weights: each 0–100, non-decreasing, ending at 100."""
    plan = list(weights)
    if not plan:
        raise InvalidWeights("the explicit weight list is empty")
    for weight in plan:
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise InvalidWeights(f"weights must be integers between 0 and 100, got {weight!r}")
    if any(b < a for a, b in zip(plan, plan[1:])):
        raise InvalidWeights(f"the explicit weight list must not decrease: {plan}")
    if plan[-1] != 100:
        raise InvalidWeights(f"the explicit weight list must end at 100, got {plan[-1]}")
    return plan

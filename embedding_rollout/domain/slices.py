"""How a backfill splits into slices: contiguous id ranges, each loaded by its own task with its
own keyset cursor. No I/O here.

A slice holds the ids in ``(after, upto]`` (``None``: unbounded). Ranges rather than hash buckets,
because a range is what a keyset cursor resumes in (``id > last_id AND id <= upto``), served by
the id index of either store, so each slice reads only its part of the source. The split points
are chosen once, from the source's ids, and kept with the plan: every slice and every retry of a
slice sees the same ranges whatever the live writes add meanwhile.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MAX_SLICES = 16
DOCS_PER_SLICE = 200_000  # the default: one slice per this many source documents


class InvalidSlices(ValueError):
    pass


@dataclass(frozen=True)
class IdRange:
    after: str | None = None  # exclusive
    upto: str | None = None   # inclusive

    def __contains__(self, doc_id: str) -> bool:
        return (self.after is None or doc_id > self.after) and (self.upto is None or doc_id <= self.upto)

    def describe(self) -> str:
        return f"({self.after or '-inf'}, {self.upto or '+inf'}]"


def default_slices(documents: int) -> int:
    """Slices for a source of ``documents``: one per ``DOCS_PER_SLICE``, at most ``MAX_SLICES``."""
    return max(1, min(MAX_SLICES, math.ceil(documents / DOCS_PER_SLICE)))


def check_slices(slices: int) -> int:
    if not isinstance(slices, int) or isinstance(slices, bool) or not 1 <= slices <= MAX_SLICES:
        raise InvalidSlices(f"backfill slices must be an integer from 1 to {MAX_SLICES}, got {slices!r}")
    return slices


def split_points(sorted_ids: Sequence[str], slices: int) -> list[str]:
    """``slices - 1`` ascending, distinct split points at the quantiles of ``sorted_ids`` (the
    source's ids, or a sample of them). Fewer distinct ids than slices give fewer points: the
    plan then has fewer non-empty ranges, never overlapping ones."""
    check_slices(slices)
    points: list[str] = []
    for k in range(1, slices):
        if not sorted_ids:
            break
        point = sorted_ids[max(0, k * len(sorted_ids) // slices - 1)]  # the last id of slice k
        if not points or point > points[-1]:
            points.append(point)
    return points


def ranges(points: Sequence[str], slices: int) -> list[IdRange]:
    """The ``slices`` ranges the split points make; together they hold every id exactly once.
    With fewer points than ``slices - 1`` (a small source) the last ranges are empty."""
    check_slices(slices)
    if list(points) != sorted(set(points)) or len(points) > slices - 1:
        raise InvalidSlices(f"split points must be at most {slices - 1} ascending distinct ids, got {list(points)}")
    bounds = [None, *points, None]
    filled = [IdRange(bounds[k], bounds[k + 1]) for k in range(len(points) + 1)]
    last = points[-1] if points else ""
    return filled + [IdRange(last, last)] * (slices - len(filled))  # (x, x] holds no id


@dataclass(frozen=True)
class BackfillPlan:
    """The split of one backfill (``version`` from ``source``) into ``slices`` id ranges."""

    version: str
    source: str
    slices: int
    points: tuple[str, ...]
    documents: int | None = None  # the source's size when planned, for progress

    def __post_init__(self):
        ranges(self.points, self.slices)  # refuses an inconsistent plan

    def range(self, slice_number: int) -> IdRange:
        """Slice ``slice_number`` (1 to ``slices``)."""
        if not 1 <= slice_number <= self.slices:
            raise InvalidSlices(f"slice {slice_number} is not one of the plan's 1 to {self.slices}")
        return ranges(self.points, self.slices)[slice_number - 1]

    def to_json(self) -> dict:
        return {"version": self.version, "source": self.source, "slices": self.slices,
                "points": list(self.points), "documents": self.documents}

    @classmethod
    def from_json(cls, data: dict) -> "BackfillPlan":
        return cls(data["version"], data["source"], int(data["slices"]), tuple(data["points"]),
                   data.get("documents"))

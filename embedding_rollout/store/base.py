"""The vector store contract, shared by the embedded (LanceDB) and Elasticsearch backends.

Every write carries the document's monotonically increasing version ``seq``; a write applies only
when its ``seq`` is strictly higher than the stored one, so a backfill can never overwrite a newer
streaming update whatever the interleaving. Deletes are versioned tombstones, kept until purged,
so an older write arriving after a delete cannot bring the document back.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

FIELDS = ("title", "text", "category", "date")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class StoreUnavailable(RuntimeError):
    """The store could not be reached or answered with a server error."""


class IndexNotFound(LookupError):
    """The named index does not exist."""


class InvalidFilter(ValueError):
    """A search filter on an unknown field or with a malformed value."""


class InvalidDocument(ValueError):
    """A document write the store must not take: a malformed field or an out-of-bounds version."""


def is_date(value) -> bool:
    """A calendar date, YYYY-MM-DD (what both backends store and range-filter on)."""
    if not (isinstance(value, str) and _DATE.match(value)):
        return False
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class StoredDocument:
    """A document as stored in one version's index: its fields, version and embedding."""

    id: str
    seq: int
    fields: Mapping[str, str] = field(default_factory=dict)
    vector: np.ndarray | None = None
    deleted: bool = False


@dataclass(frozen=True)
class Hit:
    id: str
    score: float  # cosine similarity, on both backends
    fields: Mapping[str, str]


@dataclass
class BulkResult:
    written: int = 0
    stale: int = 0  # rejected because the index already holds a newer (or equal) version
    failed: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: "BulkResult") -> None:
        self.written += other.written
        self.stale += other.stale
        self.failed.extend(other.failed)


@dataclass(frozen=True)
class Filters:
    """Search filters: categories (any of) and an inclusive date range."""

    category: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None

    @classmethod
    def from_dict(cls, raw: Mapping | None) -> "Filters":
        raw = dict(raw or {})
        unknown = set(raw) - {"category", "date_from", "date_to"}
        if unknown:
            raise InvalidFilter(f"unknown filter field(s): {', '.join(sorted(unknown))}; "
                                "known: category, date_from, date_to")
        category = raw.get("category") or ()
        category = (category,) if isinstance(category, str) else tuple(category)
        if not all(isinstance(c, str) and c for c in category):
            raise InvalidFilter("filter 'category' must be a string or a list of strings")
        for key in ("date_from", "date_to"):
            value = raw.get(key)
            if value is not None and not is_date(value):
                raise InvalidFilter(f"filter '{key}' must be a date YYYY-MM-DD, got {value!r}")
        return cls(category, raw.get("date_from"), raw.get("date_to"))


class VectorStore(Protocol):
    """One index per model version; index names come from the deployment state."""

    BULK_BATCH: int  # documents per bulk write this store takes best (measured; a load's default)

    def create_index(self, index: str, dims: int, meta: Mapping[str, str]) -> bool:
        """Create the index (True), or confirm an identical one exists (False)."""

    def index_meta(self, index: str) -> dict: ...

    def indices(self) -> list[str]: ...

    def upsert(self, index: str, doc: StoredDocument) -> bool:
        """Write ``doc`` if its ``seq`` is newer than the stored one; True when applied."""

    def delete(self, index: str, doc_id: str, seq: int) -> bool:
        """Write a tombstone at ``seq`` (newer-wins, like an upsert)."""

    def bulk_write(self, index: str, docs: Iterable[StoredDocument]) -> BulkResult: ...

    def search(self, index: str, vector: np.ndarray, k: int, filters: Filters) -> list[Hit]: ...

    def get_many(self, index: str, ids: list[str]) -> dict[str, StoredDocument]:
        """The stored documents or tombstones (without vectors) among ``ids``, by id."""

    def count(self, index: str) -> int:
        """Live documents (tombstones not counted)."""

    def scan(self, index: str, batch_size: int = 500, include_deleted: bool = False,
             after: str | None = None, upto: str | None = None) -> Iterator[StoredDocument]:
        """Every document (without vectors) with an id above ``after`` and up to ``upto``, in
        ascending id order (keyset pages: a scan resumed from an id is correct whatever the writes
        did meanwhile); every write acknowledged before the scan began is seen; memory bounded by
        the batch."""

    def sample_ids(self, index: str, size: int) -> list[str]:
        """About ``size`` ids of the index (tombstones too), sorted: where to split it into slices."""

    def begin_bulk_load(self, index: str) -> None: ...

    def end_bulk_load(self, index: str) -> None:
        """Restore serving settings after a bulk load; safe to call when none began."""

    def purge_tombstones(self, index: str) -> int: ...

    def drop_index(self, index: str) -> bool: ...

    def ready(self) -> None:
        """Raise :class:`StoreUnavailable` unless the store answers."""


def latest_per_id(docs: Iterable[StoredDocument]) -> list[StoredDocument]:
    """One document per id, the highest ``seq`` winning (a batch must not hold duplicates)."""
    best: dict[str, StoredDocument] = {}
    for doc in docs:
        if doc.id not in best or doc.seq > best[doc.id].seq:
            best[doc.id] = doc
    return list(best.values())

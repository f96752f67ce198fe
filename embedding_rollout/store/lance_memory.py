"""A small LanceDB table's live rows held in memory and searched with numpy.

Lance's flat search costs a fixed 6-9 ms per query at 10k rows on two cores (plan, read and decode
the vector column, its own distance kernel), where a numpy scan of the same vectors takes 0.1 ms.
A table that fits a memory budget is therefore searched from a copy of one of its versions; the
store serves the copy only while the table stays at that version (docs/design.md, "Small tables are
searched from memory").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .base import Filters, Hit

COLUMNS = ["id", "vector", "title", "text", "category", "date"]
_FIELDS = ("title", "text", "category", "date")


@dataclass(frozen=True)
class MemoryTable:
    """The live (not deleted) rows of one table version: unit vectors, filter columns, payloads."""

    version: int
    ids: list[str]
    unit_vectors: np.ndarray  # (rows, dims) float32, each row of norm 1 (zero vectors left out)
    categories: np.ndarray  # str, "" where the category is missing
    has_category: np.ndarray  # bool
    dates: np.ndarray  # str, "" where the date is missing
    has_date: np.ndarray  # bool
    fields: list[dict]
    nbytes: int

    @classmethod
    def from_arrow(cls, version: int, rows: pa.Table) -> "MemoryTable":
        """``rows``: the table's live rows, with at least :data:`COLUMNS`."""
        dims = rows.schema.field("vector").type.list_size
        flat = pc.list_flatten(rows["vector"].combine_chunks()) if rows.num_rows else pa.array([], pa.float32())
        vectors = np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dims)
        norms = np.linalg.norm(vectors, axis=1)
        scored = norms > 0  # a zero vector has no cosine: never a hit
        rows, unit = rows.filter(pa.array(scored)), vectors[scored] / norms[scored, None]
        columns = {f: rows[f].to_pylist() for f in _FIELDS}
        return cls(version=version, ids=rows["id"].to_pylist(), unit_vectors=unit,
                   categories=_strings(columns["category"]), has_category=_present(columns["category"]),
                   dates=_strings(columns["date"]), has_date=_present(columns["date"]),
                   fields=[dict(zip(_FIELDS, values)) for values in zip(*(columns[f] for f in _FIELDS))],
                   nbytes=rows.nbytes + unit.nbytes)

    def search(self, vector: np.ndarray, k: int, filters: Filters) -> list[Hit]:
        """The k rows nearest by cosine among those the filters admit, as Lance's exact search
        would return them."""
        query = np.asarray(vector, np.float32)
        norm = math.sqrt(float(query @ query))
        admitted = self._admitted(filters)
        candidates = len(self.ids) if admitted is None else int(np.count_nonzero(admitted))
        if not norm or not candidates:
            return []
        scores = self.unit_vectors @ query  # every row: cheaper than gathering the admitted ones
        if admitted is not None:
            scores[~admitted] = -np.inf
        k = min(k, candidates)
        best = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
        best = best[np.lexsort((best, -scores[best]))]  # ties: the earlier row first
        return [Hit(self.ids[i], float(scores[i]) / norm, self.fields[i]) for i in best]

    def _admitted(self, filters: Filters) -> np.ndarray | None:
        """The rows ``filter_sql`` admits (None: all): a category among the given ones, an inclusive
        date range; a missing category or date admits no filter on it (SQL's NULL)."""
        admitted = None
        if filters.category:
            admitted = self.has_category & np.isin(self.categories, list(filters.category))
        if filters.date_from or filters.date_to:
            admitted = self.has_date if admitted is None else admitted & self.has_date
        if filters.date_from:
            admitted = admitted & (self.dates >= filters.date_from)
        if filters.date_to:
            admitted = admitted & (self.dates <= filters.date_to)
        return admitted

def _strings(values: list) -> np.ndarray:
    return np.array([v or "" for v in values], dtype=str)


def _present(values: list) -> np.ndarray:
    return np.array([v is not None for v in values], dtype=bool)

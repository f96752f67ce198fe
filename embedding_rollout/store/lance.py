"""The embedded default: LanceDB tables on local disk, no server.

Newer-wins writes are a conditional ``merge_insert`` (``target.seq < source.seq``), which Lance
commits atomically and retries on conflicts, so several processes can write one table at once.
Every write makes a table version; ``optimize`` compacts them after bulk loads.
"""
from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping

import lancedb
import numpy as np
import pyarrow as pa
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from .base import (BulkResult, Filters, Hit, IndexNotFound, StoredDocument, StoreUnavailable, latest_per_id)

log = logging.getLogger(__name__)
_COLUMNS = ["id", "seq", "deleted", "title", "text", "category", "date"]


def _schema(dims: int, meta: Mapping[str, str]) -> pa.Schema:
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("deleted", pa.bool_(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dims)),
        pa.field("title", pa.string()),
        pa.field("text", pa.string()),
        pa.field("category", pa.string()),
        pa.field("date", pa.string()),  # ISO dates compare correctly as strings
    ], metadata={**{k: str(v) for k, v in meta.items()}, "dims": str(dims)})


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def filter_sql(filters: Filters) -> str:
    clauses = ["deleted = false"]
    if filters.category:
        clauses.append(f"category IN ({', '.join(_quote(c) for c in filters.category)})")
    if filters.date_from:
        clauses.append(f"date >= {_quote(filters.date_from)}")
    if filters.date_to:
        clauses.append(f"date <= {_quote(filters.date_to)}")
    return " AND ".join(clauses)


def _commit_conflict(exc: BaseException) -> bool:
    return "commit conflict" in str(exc).lower()


class LanceStore:
    COMPACT_EVERY = 500  # streaming writes between background compactions of a table

    def __init__(self, uri: str, consistency_seconds: float = 0.2):
        # Re-check the table's latest version at most this often: other processes' writes
        # become visible to this one well within a second.
        self.uri = uri
        self.db = lancedb.connect(uri, read_consistency_interval=dt.timedelta(seconds=consistency_seconds))
        self._tables: dict[str, object] = {}
        self._writes: dict[str, int] = {}
        self._compacting = threading.Lock()

    # -- indices -------------------------------------------------------------------------------
    def _table(self, index: str):
        table = self._tables.get(index)
        if table is None:
            try:
                table = self.db.open_table(index)
            except (FileNotFoundError, ValueError) as exc:
                raise IndexNotFound(f"index {index} does not exist") from exc
            self._tables[index] = table
        return table

    def indices(self) -> list[str]:
        return sorted(self.db.list_tables().tables)

    def create_index(self, index: str, dims: int, meta: Mapping[str, str]) -> bool:
        if index in self.indices():
            existing = self.index_meta(index)
            if int(existing.get("dims", -1)) != dims:
                raise ValueError(f"index {index} exists with dims {existing.get('dims')}, not {dims}")
            return False
        self.db.create_table(index, schema=_schema(dims, meta), exist_ok=True)
        return True

    def index_meta(self, index: str) -> dict:
        metadata = self._table(index).schema.metadata or {}
        return {k.decode(): v.decode() for k, v in metadata.items()}

    def drop_index(self, index: str) -> bool:
        self._tables.pop(index, None)
        if index not in self.indices():
            return False
        self.db.drop_table(index)
        return True

    # -- writes --------------------------------------------------------------------------------
    def _rows(self, index: str, docs: list[StoredDocument]) -> pa.Table:
        schema = self._table(index).schema
        dims = schema.field("vector").type.list_size
        rows = []
        for doc in docs:
            vector = np.zeros(dims, np.float32) if doc.deleted else np.asarray(doc.vector, np.float32)
            if vector.shape != (dims,):
                raise ValueError(f"document {doc.id}: vector has shape {vector.shape}, index {index} needs ({dims},)")
            fields = {} if doc.deleted else doc.fields
            rows.append({"id": doc.id, "seq": int(doc.seq), "deleted": doc.deleted, "vector": vector,
                         **{f: fields.get(f) for f in ("title", "text", "category", "date")}})
        return pa.Table.from_pylist(rows, schema=schema)

    def _merge(self, index: str, docs: list[StoredDocument]):
        table = self._table(index)
        try:
            return (table.merge_insert("id")
                    .when_matched_update_all(where="target.seq < source.seq")
                    .when_not_matched_insert_all()
                    .execute(self._rows(index, docs)))
        except OSError as exc:
            raise StoreUnavailable(f"lance write to {index} failed: {exc}") from exc

    def upsert(self, index: str, doc: StoredDocument) -> bool:
        result = self._merge(index, [doc])
        self._count_write(index)
        return result.num_inserted_rows + result.num_updated_rows > 0

    def _count_write(self, index: str) -> None:
        """Every write adds a small fragment and a table version; fold them now and then, off the
        request path, so searches don't slow down as streaming updates pile up."""
        self._writes[index] = self._writes.get(index, 0) + 1
        if self._writes[index] % self.COMPACT_EVERY == 0 and self._compacting.acquire(blocking=False):
            threading.Thread(target=self._compact, args=(index,), daemon=True, name="lance-compact").start()

    def _compact(self, index: str) -> None:
        try:
            self._optimize(index)
        finally:
            self._compacting.release()

    def _optimize(self, index: str) -> None:
        """Fold small fragments and drop old versions. A concurrent write (a streaming update) makes
        Lance refuse the rewrite with a retryable commit conflict: try again on the new version, and
        since compaction is an optimisation, log rather than fail when it keeps losing."""
        try:
            for attempt in Retrying(retry=retry_if_exception(_commit_conflict), stop=stop_after_attempt(5),
                                    wait=wait_exponential(multiplier=0.1, max=2), reraise=True):
                with attempt:
                    self._table(index).optimize(cleanup_older_than=dt.timedelta(minutes=1))
        except Exception as exc:
            log.warning("compacting %s failed: %s", index, exc)

    def delete(self, index: str, doc_id: str, seq: int) -> bool:
        return self.upsert(index, StoredDocument(doc_id, seq, deleted=True))

    def bulk_write(self, index: str, docs: Iterable[StoredDocument]) -> BulkResult:
        batch = latest_per_id(docs)
        if not batch:
            return BulkResult()
        result = self._merge(index, batch)
        written = result.num_inserted_rows + result.num_updated_rows
        return BulkResult(written=written, stale=len(batch) - written)

    def begin_bulk_load(self, index: str) -> None:
        self._table(index)  # nothing to switch off: Lance has no refresh cycle

    def end_bulk_load(self, index: str) -> None:
        # Fold the many small versions a load makes into few files, and drop the old versions.
        self._optimize(index)

    def purge_tombstones(self, index: str) -> int:
        table = self._table(index)
        count = table.count_rows("deleted = true")
        table.delete("deleted = true")
        return count

    # -- reads ---------------------------------------------------------------------------------
    def search(self, index: str, vector: np.ndarray, k: int, filters: Filters) -> list[Hit]:
        query = (self._table(index).search(np.asarray(vector, np.float32), vector_column_name="vector")
                 .distance_type("cosine").where(filter_sql(filters), prefilter=True)
                 .select(["id", "title", "text", "category", "date", "_distance"]).limit(k))
        return [Hit(row["id"], 1.0 - float(row["_distance"]),
                    {f: row[f] for f in ("title", "text", "category", "date")})
                for row in query.to_list()]

    def get_many(self, index: str, ids: list[str]) -> dict[str, StoredDocument]:
        if not ids:
            return {}
        where = f"id IN ({', '.join(_quote(i) for i in ids)})"
        rows = self._table(index).search().where(where).select(_COLUMNS).limit(len(ids)).to_list()
        return {row["id"]: _document(row) for row in rows}

    def count(self, index: str) -> int:
        return self._table(index).count_rows("deleted = false")

    def scan(self, index: str, batch_size: int = 500, include_deleted: bool = False) -> Iterator[StoredDocument]:
        query = self._table(index).search().select(_COLUMNS).limit(None)
        if not include_deleted:
            query = query.where("deleted = false")
        for batch in query.to_batches(batch_size):  # a stream of record batches, not the whole table
            for row in batch.to_pylist():
                yield _document(row)

    def ready(self) -> None:
        try:
            self.db.list_tables()
        except Exception as exc:  # any failure to list means the store cannot serve
            raise StoreUnavailable(f"lance database at {self.uri} unavailable: {exc}") from exc


def _document(row: dict) -> StoredDocument:
    fields = {f: row[f] for f in ("title", "text", "category", "date") if row.get(f) is not None}
    return StoredDocument(row["id"], int(row["seq"]), fields, deleted=bool(row["deleted"]))

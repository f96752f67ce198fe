"""The embedded default: LanceDB tables on local disk, no server.

Newer-wins writes append the ids a table lacks (found with its id index) and update the ids it holds
with a conditional ``merge_insert`` (``target.seq < source.seq``): a merge hash-joins the whole
table, so a load's batch of new ids cost more with every row already loaded. Lance's own
conflict detection does not see two writers inserting the same new key (lance-format/lance#4585:
both commits add a fragment and touch nothing in common), so every write to a table goes through
one writer at a time: an exclusive ``flock`` per table, held by the app's streaming writes and a
backfill's bulk writes alike, around a write planned on the table's latest version. Every write
makes a table version; ``optimize`` compacts them after bulk loads.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import logging
import math
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import lancedb
from lancedb.index import Bitmap, BTree, HnswSq, IvfFlat, IvfPq, IvfSq
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .base import (BulkResult, Filters, Hit, IndexNotFound, StoredDocument, StoreUnavailable, latest_per_id)
from .lance_memory import COLUMNS as MEMORY_COLUMNS, MemoryTable

log = logging.getLogger(__name__)
_FIELDS = ("title", "text", "category", "date")
_COLUMNS = ["id", "seq", "deleted", *_FIELDS]


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


class TableWriteLocks:
    """One writer at a time per table, across this process's threads (a lock they queue on) and
    the other processes on the machine (the app, a backfill step, the CLI: an exclusive ``flock``
    on a file per table). Waiting is bounded; a writer that cannot get its turn in time gets
    :class:`StoreUnavailable` (the app's 503), not a hung request."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._threads: dict[str, threading.Lock] = {}
        self._registry = threading.Lock()

    def _thread_lock(self, index: str) -> threading.Lock:
        with self._registry:
            return self._threads.setdefault(index, threading.Lock())

    @contextmanager
    def hold(self, index: str, timeout: float) -> Iterator[None]:
        deadline = time.monotonic() + timeout
        local = self._thread_lock(index)
        if not local.acquire(timeout=timeout):
            raise self._no_turn(index, timeout)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.directory / f"{index}.lock", "a+") as handle:
                self._flock(handle, index, timeout, deadline)
                held = time.monotonic()
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    if time.monotonic() - held > 0.5:
                        log.warning("a write held lance table %s for %.2fs", index, time.monotonic() - held)
        finally:
            local.release()

    def _flock(self, handle, index: str, timeout: float, deadline: float) -> None:
        pause = 0.0005  # only other processes compete here, one writer each
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise self._no_turn(index, timeout) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.005)

    @staticmethod
    def _no_turn(index: str, timeout: float) -> StoreUnavailable:
        return StoreUnavailable(f"lance table {index}: no turn to write within {timeout:g}s "
                                "(other writers hold it)")


class LanceStore:
    # Streaming writes between background compactions of a table. Compaction holds the write lock,
    # so it must stay short next to ER_STORE_TIMEOUT: folding 100 one-row fragments of a 10k table
    # takes ~0.16 s, 500 took ~1.4 s on the 2-core machine.
    COMPACT_EVERY = 100
    SCAN_PAGE = 5_000  # rows per page of a scan, at least
    # Documents per bulk write of a load: each merge is a commit of its own, so small ones cost
    # more than their rows (into 200k rows: 256 -> 9k docs/s, 1,024 -> 25k, 4,096 -> 52k).
    BULK_BATCH = 4_096
    BULK_WAIT = 60.0  # a bulk batch waits this long for its turn; streaming writes wait ``timeout``
    # An approximate vector index once a bulk load leaves this many rows (exact search scans every
    # vector). Type and query parameters: bench/lance_search.py, docs/benchmarks.md.
    ANN_THRESHOLD = 100_000
    # IVF_FLAT: the build holds the write lock, and at 1 M rows (2 cores) it takes 8 s against 45 s
    # for IVF_HNSW_SQ, searches faster (10 against 15 ms p50) and scores exactly (recall 1.000
    # against 0.99): a probed partition of ~1,000 vectors is scanned faster than a graph is walked.
    # IVF_PQ's recall falls to the floor with the table's density (0.88 at 1 M).
    ANN_INDEX_TYPE = "IVF_FLAT"  # or "IVF_SQ", "IVF_HNSW_SQ", "IVF_PQ"
    ANN_MIN_RECALL = 0.95  # recall@10 against exact below this: the index is dropped again
    ANN_REBUILD_GROWTH = 2.0  # retrain once the table has this many times the rows it was trained on
    # Queries: partitions probed (40 of 316 at 100k cost no more than 20: fixed costs dominate);
    # candidates re-ranked on the full vectors (k x refine: exact scores; PQ's codes are too coarse
    # for fewer; a flat index needs none); HNSW's candidate list (Lance requires >= k x refine).
    ANN_NPROBES, ANN_EF = 40, 50
    ANN_REFINE = {"IVF_HNSW_SQ": 5, "IVF_PQ": 30, "IVF_SQ": 5, "IVF_FLAT": 0}
    # k-means on fewer samples and rounds than Lance's defaults (256 a partition, 50 rounds): a
    # third of IVF_PQ's build time, which holds the write lock, at the same recall.
    ANN_KMEANS = {"max_iterations": 10, "sample_rate": 64}
    ANN_FILTER_SHARE = 0.1  # a filter matching fewer of the rows is searched exactly
    # Scalar indices on the columns every lookup and prefilter reads: without them each search
    # scans ``deleted`` and ``category`` over the whole table. At 1 M rows (lance 0.40, 2 cores):
    # ANN 62 -> 26 ms, an exact search under a 15-document filter 294 -> 20 ms; none at 10 k.
    # Bitmaps for the few-valued columns, B-trees for ids and date ranges.
    COLUMN_INDICES = {"id": BTree, "deleted": Bitmap, "category": Bitmap, "date": BTree}

    def __init__(self, uri: str, consistency_seconds: float = 0.2, timeout: float = 2.0,
                 ann_threshold: int = ANN_THRESHOLD, cache_mib: int = 0, memory_search_mib: int = 64):
        # Reads re-check the table's latest version at most this often: other processes' writes
        # become visible to this one well within a second. Writes check out the latest version
        # under the write lock, where nothing newer can appear.
        self.uri = uri
        self.timeout = timeout
        # cache_mib bounds the caches of index pages and table metadata (0: Lance's defaults).
        self.session = lancedb.Session(cache_mib << 20, cache_mib << 20) if cache_mib else None
        self.db = lancedb.connect(uri, read_consistency_interval=dt.timedelta(seconds=consistency_seconds),
                                  session=self.session)
        self._locks = TableWriteLocks(Path(uri) / "_write_locks")
        self._tables: dict[str, object] = {}
        self._writes: dict[str, int] = {}
        self._compacting = threading.Lock()
        self.ann_threshold = ann_threshold
        self.last_ann_recall: dict[str, float] = {}  # per table: recall@10 of its last index build
        self._match_counts: dict[tuple[str, str], tuple[float, int]] = {}  # (index, filter): (until, rows)
        # A table this small (its live rows, payloads included) is searched from a copy in memory.
        self.memory_search_bytes = memory_search_mib << 20
        self._in_memory: dict[str, MemoryTable] = {}
        self._too_large: dict[str, int] = {}  # per table: the version found above the budget
        # Asking Lance for a table's version costs ~0.25 ms (a hop to its event loop), more than a
        # search of the copy (~0.1 ms): it is asked at most once per consistency interval, as Lance
        # itself re-checks, and after every write of this process.
        self._recheck_seconds = consistency_seconds
        self._version_seen: dict[str, tuple[float, int, int]] = {}  # per table: (until, writes, version)
        self._writes_done: dict[str, int] = {}  # per table: this process's writes, dropped included
        self._copying = threading.Lock()

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
        # A writer too: a compaction still running would write into the directory being removed.
        with self._locks.hold(index, max(self.timeout, self.BULK_WAIT)):
            self._tables.pop(index, None)
            self._in_memory.pop(index, None)  # a table made again under this name restarts its versions
            self._wrote(index)
            if index not in self.indices():
                return False
            self.db.drop_table(index)
        return True

    def _still_there(self, index: str) -> None:
        """Under the write lock: a write queued behind the drop of its table must not write into the
        removed directory through a cached handle (it would bring a half table back)."""
        if not (Path(self.uri) / f"{index}.lance").is_dir():
            self._tables.pop(index, None)
            raise IndexNotFound(f"index {index} does not exist")

    # -- writes --------------------------------------------------------------------------------
    def _rows(self, index: str, docs: list[StoredDocument]) -> pa.Table:
        """The batch as Arrow columns, built column by column: a batch of 4,096 rows built row by
        row (``from_pylist``) cost as much as a third of its merge."""
        schema = self._table(index).schema
        dims = schema.field("vector").type.list_size
        vectors = np.zeros((len(docs), dims), np.float32)
        for row, doc in enumerate(docs):
            if not doc.deleted:
                vector = np.asarray(doc.vector, np.float32)
                if vector.shape != (dims,):
                    raise ValueError(f"document {doc.id}: vector has shape {vector.shape}, index {index} needs ({dims},)")
                vectors[row] = vector
        columns = {"id": [d.id for d in docs], "seq": [int(d.seq) for d in docs],
                   "deleted": [d.deleted for d in docs],
                   "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dims)}
        for name in _FIELDS:
            columns[name] = [None if d.deleted else d.fields.get(name) for d in docs]
        return pa.Table.from_pydict(columns, schema=schema)

    def _merge(self, index: str, docs: list[StoredDocument], wait: float) -> int:
        """Write ``docs`` (one per id) where the table lacks their id or holds an older ``seq``;
        returns how many were written. Under the write lock, on the latest version, so nothing
        changes between the look-up of the ids and the commits."""
        with self._locks.hold(index, wait):
            self._still_there(index)
            rows = self._rows(index, docs)
            table = self._table(index)
            try:
                # Plan on the latest version, whoever wrote it: a merge planned on an older one
                # would not see another process's insert of the same id, and insert it again.
                table.checkout_latest()
                stored = self._stored_seqs(table, rows["id"])
                known = pc.is_in(rows["id"], value_set=stored["id"])
                new_rows = rows.filter(pc.invert(known))
                if new_rows.num_rows:  # an append: a merge joins the whole table, this reads no row
                    table.add(new_rows)
                updated = 0
                if new_rows.num_rows < rows.num_rows:
                    updated = (table.merge_insert("id")
                               .when_matched_update_all(where="target.seq < source.seq")
                               .execute(rows.filter(known))).num_updated_rows
            except (OSError, RuntimeError) as exc:  # I/O, or Lance giving up on a commit
                raise StoreUnavailable(f"lance write to {index} failed: {exc}") from exc
            finally:
                self._wrote(index)
        return new_rows.num_rows + updated

    IN_LIST_IDS = 256  # up to this many ids are looked up by name, more by their id range

    def _stored_seqs(self, table, ids: pa.ChunkedArray) -> pa.Table:
        """The (id, seq) rows the table holds of ``ids``, tombstones included: a look-up of the id
        index (a load's batch is an id range; a streaming write is one id)."""
        if len(ids) <= self.IN_LIST_IDS:
            where = f"id IN ({', '.join(_quote(i) for i in ids.to_pylist())})"
        else:
            where = f"id >= {_quote(pc.min(ids).as_py())} AND id <= {_quote(pc.max(ids).as_py())}"
        found = table.search().where(where).select(["id", "seq"]).limit(None).to_arrow()
        return found.filter(pc.is_in(found["id"], value_set=ids))

    def _wrote(self, index: str) -> None:
        """This process's searches after a write see it: a version seen before it is not used
        again (also one another thread asked for while the write committed)."""
        self._writes_done[index] = self._writes_done.get(index, 0) + 1

    def upsert(self, index: str, doc: StoredDocument) -> bool:
        written = self._merge(index, [doc], self.timeout)
        self._count_write(index)
        return written > 0

    def _count_write(self, index: str) -> None:
        """Every write adds a small fragment and a table version; fold them now and then, off the
        request path, so searches don't slow down as streaming updates pile up."""
        self._writes[index] = self._writes.get(index, 0) + 1
        if self._writes[index] % self.COMPACT_EVERY == 0 and self._compacting.acquire(blocking=False):
            threading.Thread(target=self._compact, args=(index,), daemon=True, name="lance-compact").start()

    def _compact(self, index: str) -> None:
        try:
            self._optimize(index, index_columns=True)
        finally:
            self._compacting.release()

    def _optimize(self, index: str, index_columns: bool = False) -> None:
        """Fold small fragments, bring the column indices up to date and drop old versions: a writer
        like the others, under the table's write lock, on the latest version (a compaction racing
        other writers' merges is where Lance left duplicate rows). Compaction is an optimisation:
        when it cannot get its turn or fails, it is logged, never raised."""
        try:
            with self._locks.hold(index, max(self.timeout, self.BULK_WAIT)):
                table = self._table(index)
                table.checkout_latest()
                if index_columns and table.count_rows():
                    indexed = {tuple(i.columns) for i in table.list_indices()}
                    for column, config in self.COLUMN_INDICES.items():
                        if (column,) not in indexed:
                            table.create_index(column, config=config())
                table.optimize(cleanup_older_than=dt.timedelta(minutes=1))
        except Exception as exc:
            log.warning("compacting %s failed: %s", index, exc)

    def delete(self, index: str, doc_id: str, seq: int) -> bool:
        return self.upsert(index, StoredDocument(doc_id, seq, deleted=True))

    def bulk_write(self, index: str, docs: Iterable[StoredDocument]) -> BulkResult:
        batch = latest_per_id(docs)
        if not batch:
            return BulkResult()
        written = self._merge(index, batch, max(self.timeout, self.BULK_WAIT))
        # A write's id look-up reads every fragment the id index does not cover: a load's many
        # small ones must be folded and indexed as it goes, or each batch costs more than the last.
        self._count_write(index)
        return BulkResult(written=written, stale=len(batch) - written)

    def begin_bulk_load(self, index: str) -> None:
        self._table(index)  # nothing to switch off: Lance has no refresh cycle

    def end_bulk_load(self, index: str) -> None:
        # Index the id and filter columns (so that merges, lookups and prefilters do not scan the
        # table), fold the many small versions a load makes into few files, and drop the old
        # versions (``optimize`` also adds new rows to the existing indices). A large table gets a
        # vector index.
        self._optimize(index, index_columns=True)
        self._ensure_vector_index(index)

    def _ensure_vector_index(self, index: str) -> float | None:
        """Build the approximate vector index of a table of ``ann_threshold`` rows or more, then
        check it: recall@10 against exact search for sample vectors of the table as queries; below
        ``ANN_MIN_RECALL`` the index is dropped again and searches stay exact. Returns the recall
        (also in ``last_ann_recall``), None when nothing was built. An optimisation: failures are
        logged, never raised."""
        try:
            name = self._build_vector_index(index)
            if name is None:
                return None
            recall = self._ann_recall(index)
        except Exception as exc:
            log.warning("vector index of %s: not built or not checked: %s", index, exc)
            return None
        if recall is None:  # nothing but tombstones to ask with
            log.info("vector index %s of %s built; recall not checked (no live rows)", name, index)
            return None
        self.last_ann_recall[index] = recall
        if recall >= self.ANN_MIN_RECALL:
            log.info("vector index %s of %s: recall@10 %.3f against exact search", name, index, recall)
            return recall
        log.warning("vector index %s of %s: recall@10 %.3f is below %.2f; dropped, searches stay exact",
                    name, index, recall, self.ANN_MIN_RECALL)
        try:
            with self._locks.hold(index, max(self.timeout, self.BULK_WAIT)):
                self._still_there(index)
                table = self._table(index)
                table.checkout_latest()
                table.drop_index(name)
        except Exception as exc:
            log.warning("dropping vector index %s of %s failed: %s", name, index, exc)
        return recall

    def _build_vector_index(self, index: str) -> str | None:
        """A writer like ``_optimize``: under the table's write lock, on its latest version. The new
        index's name, or None when the table is below the threshold or its index still fits it."""
        with self._locks.hold(index, max(self.timeout, self.BULK_WAIT)):
            self._still_there(index)
            table = self._table(index)
            table.checkout_latest()
            rows = table.count_rows()
            if rows < self.ann_threshold:
                return None
            old = [i.name for i in table.list_indices() if list(i.columns) == ["vector"]]
            # ``optimize`` adds new rows to an index under the partitions it was trained with;
            # retrain only once the table has outgrown them. The name records the rows trained on
            # (visible to every process, gone with the index).
            if old and rows < self.ANN_REBUILD_GROWTH * max(_trained_rows(name) for name in old):
                return None
            name, started = f"vector_ann_{rows}", time.monotonic()
            dims = table.schema.field("vector").type.list_size
            table.create_index("vector", config=self._ann_config(rows, dims), name=name, replace=True)
            for stale in old:  # a second index on the column, not replaced by a new name
                if stale != name:
                    table.drop_index(stale)
            log.info("vector index %s (%s) of %s built in %.1fs", name, self.ANN_INDEX_TYPE, index,
                     time.monotonic() - started)
            return name

    def _ann_config(self, rows: int, dims: int):
        partitions = max(1, round(math.sqrt(rows)))
        kmeans = {"distance_type": "cosine", "num_partitions": partitions, **self.ANN_KMEANS}
        if self.ANN_INDEX_TYPE == "IVF_PQ":
            width = next(w for w in (8, 4, 2, 1) if dims % w == 0)  # sub-vectors of 8 dimensions
            return IvfPq(num_sub_vectors=dims // width, **kmeans)
        if self.ANN_INDEX_TYPE == "IVF_FLAT":
            return IvfFlat(**kmeans)
        if self.ANN_INDEX_TYPE == "IVF_SQ":
            return IvfSq(**kmeans)
        # Smaller graphs than the defaults (m 20, ef_construction 300): half the build time under
        # the write lock, the same recall (1.000 against 1.000, 0.961 against 0.960 on weakly
        # clustered vectors, 100k rows).
        return HnswSq(m=12, ef_construction=100, **kmeans)

    def _ann_recall(self, index: str, queries: int = 50, k: int = 10) -> float | None:
        """Recall@k of the vector index against exact search, for live rows' vectors as queries."""
        table = self._table(index)
        table.checkout_latest()
        rows = table.count_rows()
        offsets = np.random.default_rng(0).choice(rows, size=min(rows, 2 * queries), replace=False)
        sample = table.take_offsets(sorted(offsets.tolist())).select(["vector", "deleted"]).to_arrow()
        dims = table.schema.field("vector").type.list_size
        vectors = sample["vector"].combine_chunks().flatten().to_numpy().reshape(-1, dims)
        vectors = vectors[~sample["deleted"].to_numpy(zero_copy_only=False)][:queries]
        found = expected = 0
        for vector in vectors:
            exact, approximate = ({r["id"] for r in self._vector_query(table, vector, "deleted = false", k, probes)
                                   .select(["id", "_distance"]).to_list()} for probes in (None, self.ANN_NPROBES))
            found, expected = found + len(exact & approximate), expected + len(exact)
        return found / expected if expected else None

    def purge_tombstones(self, index: str) -> int:
        with self._locks.hold(index, max(self.timeout, self.BULK_WAIT)):
            table = self._table(index)
            table.checkout_latest()
            count = table.count_rows("deleted = true")
            table.delete("deleted = true")
        return count

    # -- reads ---------------------------------------------------------------------------------
    def search(self, index: str, vector: np.ndarray, k: int, filters: Filters) -> list[Hit]:
        table = self._table(index)
        held = self._memory_copy(index, table)
        if held is not None:
            return held.search(vector, k, filters)
        where = filter_sql(filters)
        filtered = bool(filters.category or filters.date_from or filters.date_to)
        exact = filtered and self._too_selective(index, table, where)
        nprobes = None if exact else self.ANN_NPROBES
        columns = ["id", *_FIELDS, "_distance"]
        rows = self._vector_query(table, vector, where, k, nprobes).select(columns).to_list()
        if nprobes is not None and len(rows) < k and self._has_vector_index(table):
            # The probed partitions held fewer than k rows passing the prefilter: the exact search
            # finds them all. (Lance's own remedy, maximum_nprobes above nprobes, made every query
            # about 3x slower at 100k rows, even those it did not help.)
            rows = self._vector_query(table, vector, where, k, None).select(columns).to_list()
        return [Hit(row["id"], 1.0 - float(row["_distance"]),
                    {f: row[f] for f in _FIELDS})
                for row in rows]

    def _memory_copy(self, index: str, table) -> MemoryTable | None:
        """The table's copy in memory if it is of the table's version as this process sees it (the
        version Lance's own search would read). Otherwise this search goes to Lance, and a copy of
        the current version is made in the background: while a table changes faster than it can
        be copied (~10 ms at 10k rows), searches cost what they cost without the copy."""
        if not self.memory_search_bytes:
            return None
        seen, now, writes = self._version_seen.get(index), time.monotonic(), self._writes_done.get(index, 0)
        if seen is None or seen[0] < now or seen[1] != writes:
            seen = self._version_seen[index] = (now + self._recheck_seconds, writes, table.version)
        version = seen[2]
        held = self._in_memory.get(index)
        if held is not None and held.version == version:
            return held
        if self._too_large.get(index) != version and self._copying.acquire(blocking=False):
            threading.Thread(target=self._copy_to_memory, args=(index, table, version), daemon=True,
                             name="lance-memory-copy").start()
        return None

    def _copy_to_memory(self, index: str, table, version: int) -> None:
        # The read sees ``version`` or a later one: a copy newer than its label is only replaced
        # sooner, never served for a version it lacks.
        try:
            dims = table.schema.field("vector").type.list_size
            rows = None
            if table.count_rows() * dims * 4 <= self.memory_search_bytes:
                rows = (table.search().where("deleted = false").select(MEMORY_COLUMNS)
                        .limit(None).to_arrow())
            held = MemoryTable.from_arrow(version, rows) if rows is not None else None
            if held is None or held.nbytes > self.memory_search_bytes:
                self._too_large[index] = version
                self._in_memory.pop(index, None)
            elif self._tables.get(index) is table:  # not dropped meanwhile
                self._in_memory[index] = held
        except Exception as exc:  # an optimisation: searches go to Lance meanwhile
            log.warning("copying %s to memory failed: %s", index, exc)
        finally:
            self._copying.release()

    def _vector_query(self, table, vector, where: str, k: int, nprobes: int | None):
        """The search, prefiltered; exact when ``nprobes`` is None."""
        query = (table.search(np.asarray(vector, np.float32), vector_column_name="vector")
                 .distance_type("cosine").where(where, prefilter=True).limit(k))
        if nprobes is None:
            return query.bypass_vector_index()
        refine = self.ANN_REFINE.get(self.ANN_INDEX_TYPE, 5)
        # All ignored while the table has no vector index (the search is exact). Rows not yet in
        # the index (written since) are searched exactly alongside.
        query = query.nprobes(nprobes).ef(max(self.ANN_EF, k * max(refine, 1)))
        return query.refine_factor(refine) if refine else query  # a flat index's scores are exact

    @staticmethod
    def _has_vector_index(table) -> bool:
        return any(list(i.columns) == ["vector"] for i in table.list_indices())

    def _too_selective(self, index: str, table, where: str) -> bool:
        """Whether a filter matches too few rows to search through the vector index. Under a
        prefilter the index returns the nearest matches inside the probed partitions; the k
        nearest matches overall are about the k / share nearest rows, and for a small share many
        lie outside them. Measured at 100k rows (40 of 316 partitions), weakly clustered vectors:
        recall 0.74 for a 1% filter (0.99 on clustered ones), 0.90 at 5%, 0.95 at 10%, 0.97 at
        20%. Searched exactly instead, such a filter costs less than twice the ANN search."""
        if not self._has_vector_index(table):
            return False  # exact anyway
        return self._matches(index, table, where) < self.ANN_FILTER_SHARE * table.count_rows()

    def _matches(self, index: str, table, where: str) -> int:
        # A count scans the filter's columns (~3 ms at 100k rows); an estimate a little stale
        # only shifts the choice above, so counts are kept a while.
        key, now = (index, where), time.monotonic()
        cached = self._match_counts.get(key)
        if cached is None or cached[0] < now:
            if len(self._match_counts) > 1000:  # date ranges make many keys
                self._match_counts.clear()
            cached = self._match_counts[key] = (now + 30.0, table.count_rows(where))
        return cached[1]

    def get_many(self, index: str, ids: list[str]) -> dict[str, StoredDocument]:
        if not ids:
            return {}
        where = f"id IN ({', '.join(_quote(i) for i in ids)})"
        rows = self._table(index).search().where(where).select(_COLUMNS).limit(None).to_arrow()
        return {doc.id: doc for doc in _documents(rows)}

    def count(self, index: str) -> int:
        return self._table(index).count_rows("deleted = false")

    def scan(self, index: str, batch_size: int = 500, include_deleted: bool = False,
             after: str | None = None, upto: str | None = None) -> Iterator[StoredDocument]:
        # Pages are id ranges fixed up front from the id column, each a range query the id index
        # serves: "the next page above the cursor" was a top-k sort over every row above it, so a
        # whole scan grew with the square of the table (130 s to verify 1 M documents). The ranges
        # cover (after, upto] whole, so ids written after they were chosen are still read. One
        # query per page on the table's latest version, so no snapshot is held for the whole scan
        # (compaction's cleanup of old versions cannot break a long backfill).
        table = self._table(index)
        table.checkout_latest()  # see every write acknowledged before the scan began
        ends = self._page_ends(table, after, upto, max(batch_size, self.SCAN_PAGE))
        live = [] if include_deleted else ["deleted = false"]
        for low, high in zip([after, *ends], [*ends, upto]):
            query = table.search().select(_COLUMNS).limit(None)
            clauses = live + _id_range(low, high)
            rows = (query.where(" AND ".join(clauses)) if clauses else query).to_arrow()
            yield from _documents(rows.take(pc.sort_indices(rows["id"])))

    @staticmethod
    def _page_ends(table, after: str | None, upto: str | None, page: int) -> list[str]:
        """Every ``page``-th id of (after, upto] in order, tombstones included: where a scan's pages
        end. Only the id column is read (about 30 MB at 1 M rows) and only the ends are kept."""
        query = table.search().select(["id"]).limit(None)
        clauses = _id_range(after, upto)
        ids = (query.where(" AND ".join(clauses)) if clauses else query).to_arrow()["id"]
        return pc.take(ids, pc.sort_indices(ids))[page - 1::page].to_pylist()

    def sample_ids(self, index: str, size: int) -> list[str]:
        # The id column alone is small and columnar: read it whole, take evenly spaced ids.
        table = self._table(index)
        table.checkout_latest()
        ids = table.search().select(["id"]).limit(None).to_arrow()["id"]
        ordered = pc.take(ids, pc.sort_indices(ids))
        return ordered[::max(1, len(ordered) // max(size, 1))].to_pylist()

    def ready(self) -> None:
        try:
            self.db.list_tables()
        except Exception as exc:  # any failure to list means the store cannot serve
            raise StoreUnavailable(f"lance database at {self.uri} unavailable: {exc}") from exc


def _id_range(after: str | None, upto: str | None) -> list[str]:
    return ([f"id > {_quote(after)}"] if after is not None else []) + ([f"id <= {_quote(upto)}"] if upto is not None else [])


def _trained_rows(index_name: str) -> float:
    """The rows a ``vector_ann_<rows>`` index was trained on; a vector index named otherwise (made
    by hand) is never rebuilt."""
    rows = index_name.rsplit("_", 1)[-1]
    return int(rows) if index_name.startswith("vector_ann_") and rows.isdigit() else math.inf


def _documents(rows: pa.Table) -> Iterator[StoredDocument]:
    """The rows as documents, converted a column at a time (a dict per row cost twice as much)."""
    for doc_id, seq, deleted, *values in zip(*(rows[name].to_pylist() for name in _COLUMNS)):
        fields = {f: v for f, v in zip(_FIELDS, values) if v is not None}
        yield StoredDocument(doc_id, seq, fields, deleted=deleted)

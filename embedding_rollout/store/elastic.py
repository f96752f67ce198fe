"""Elasticsearch backend: one index per model version with a ``dense_vector`` field.

Writes use ``version_type=external`` with the document's ``seq`` (applied only when strictly
higher; a 409 means "already newer" and is not an error). Deletes are written as versioned
tombstone documents rather than real deletes: Elasticsearch forgets a real delete's version after
``index.gc_deletes`` (60 s), after which an older backfill write would resurrect the document.
kNN search puts the filter inside the ``knn`` clause, so it pre-filters and k hits come back
whenever k documents match.

Each version's index is an alias over one concrete index (``<name>-data``), and every write
says ``require_alias``: a late write to a removed version fails instead of auto-creating an index
with a dynamic mapping. Shards and replicas come from the settings; a bulk load turns replicas
and refresh off and restores the configured values when it ends.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
from elasticsearch import ApiError, ConflictError, Elasticsearch, NotFoundError, TransportError, helpers

from .base import (BulkResult, Filters, Hit, IndexNotFound, StoredDocument, StoreUnavailable, latest_per_id)

log = logging.getLogger(__name__)

SERVING_REFRESH = "500ms"  # streaming updates searchable well within the app's one-second promise
SCAN_KEEP_ALIVE = "2m"  # a scan's point in time lives this long after each page
MAX_CANDIDATES = 10_000  # Elasticsearch's upper bound for num_candidates
_SOURCE = ["title", "text", "category", "date"]
_LIVE = {"bool": {"must_not": [{"term": {"deleted": True}}]}}


# int8_hnsw: the server's default for dense_vector since 8.14; a quarter of float32's memory, so
# the graph of a large index stays in the page cache, with a recall loss the rescoring of
# num_candidates (10 x k) absorbs. m and ef_construction at the server's defaults.
VECTOR_INDEX = {"type": "int8_hnsw", "m": 16, "ef_construction": 100}
CONCRETE_SUFFIX = "-data"
# Shards are sized by document count: about 2 KB a document here (the int8 vector and its graph,
# the float vector and text in _source), so 10 M documents make a shard of ~20 GB, inside the 10-50 GB
# Elastic recommends. More shards than that only add per-shard overhead to every kNN search.
DOCS_PER_SHARD = 10_000_000
MAX_AUTO_SHARDS = 32
AUTO = "auto"


def shards_for(documents: int) -> int:
    """The primary shards of an index expected to hold ``documents``."""
    return max(1, min(MAX_AUTO_SHARDS, -(-documents // DOCS_PER_SHARD)))


def index_body(dims: int, meta: Mapping[str, str], replicas: int = 0, shards: int = 1) -> dict:
    return {
        "settings": {"number_of_shards": shards, "number_of_replicas": replicas,
                     "refresh_interval": SERVING_REFRESH},
        "mappings": {
            "_meta": {**meta, "dims": dims},
            "dynamic": "strict",
            "properties": {
                "id": {"type": "keyword"},  # _id cannot be sorted on: the keyset order of scans
                "seq": {"type": "long"},
                "deleted": {"type": "boolean"},
                "vector": {"type": "dense_vector", "dims": dims, "index": True, "similarity": "cosine",
                           "index_options": VECTOR_INDEX},
                "title": {"type": "text"},
                "text": {"type": "text"},
                "category": {"type": "keyword"},
                "date": {"type": "date", "format": "strict_date"},
            },
        },
    }


def filter_clauses(filters: Filters) -> list[dict]:
    clauses: list[dict] = [_LIVE]
    if filters.category:
        clauses.append({"terms": {"category": list(filters.category)}})
    if filters.date_from or filters.date_to:
        bounds = {k: v for k, v in (("gte", filters.date_from), ("lte", filters.date_to)) if v}
        clauses.append({"range": {"date": bounds}})
    return clauses


def _source(doc: StoredDocument) -> dict:
    if doc.deleted:
        return {"id": doc.id, "seq": doc.seq, "deleted": True}
    return {"id": doc.id, "seq": doc.seq, "deleted": False, "vector": np.asarray(doc.vector, np.float32).tolist(),
            **{f: doc.fields[f] for f in _SOURCE if doc.fields.get(f) is not None}}


class ElasticsearchStore:
    # Documents per bulk request of a load, measured into a fresh index (30k, 48 dims): 256 ->
    # 1,486 docs/s, 500 -> 1,991, 1,000 -> 2,028, 2,000 -> 1,887. 500 keeps a request of
    # 768-dim vectors at about 4 MB, below the 5-15 MB the Elasticsearch docs advise.
    BULK_BATCH = 500

    def __init__(self, url: str = "http://127.0.0.1:9200", timeout: float = 2.0, replicas: int = 0,
                 shards: int | str = AUTO):
        """``shards``: per index, or ``auto``: from the ``expected_documents`` its creator names."""
        self.client = Elasticsearch(url, request_timeout=timeout, max_retries=2, retry_on_timeout=True)
        # Bulk loads, refreshes and settings changes of a batch job: a refresh after a large load
        # takes seconds on a busy node, far beyond a request's timeout.
        self.bulk_client = self.client.options(request_timeout=max(timeout, 120.0))
        self.replicas, self.shards = replicas, shards

    def _call(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except NotFoundError as exc:
            if "index_not_found" in str(exc):
                raise IndexNotFound(f"index {kwargs.get('index')} does not exist") from exc
            raise
        except TransportError as exc:
            raise StoreUnavailable(f"elasticsearch unavailable: {exc}") from exc
        except ApiError as exc:
            if exc.meta.status >= 500:
                raise StoreUnavailable(f"elasticsearch error {exc.meta.status}: {exc}") from exc
            raise

    # -- indices -------------------------------------------------------------------------------
    def indices(self) -> list[str]:
        """The versions' indices by the name the state uses: their aliases."""
        found = self._call(self.client.indices.get_alias, index="*", expand_wildcards="open")
        return sorted({alias for entry in found.values() for alias in entry.get("aliases", {})})

    def create_index(self, index: str, dims: int, meta: Mapping[str, str]) -> bool:
        if self._call(self.client.indices.exists, index=index):
            existing = self.index_meta(index)
            if int(existing.get("dims", -1)) != dims:
                raise ValueError(f"index {index} exists with dims {existing.get('dims')}, not {dims}")
            return False
        shards = shards_for(int(meta.get("expected_documents", 0))) if self.shards == AUTO else int(self.shards)
        body = index_body(dims, meta, self.replicas, shards)
        try:
            self._call(self.client.indices.create, index=index + CONCRETE_SUFFIX,
                       aliases={index: {"is_write_index": True}}, **body)
        except ApiError as exc:
            if "resource_already_exists" in str(exc):  # created concurrently: same as existing
                return False
            raise
        return True

    def index_meta(self, index: str) -> dict:
        mapping = next(iter(self._call(self.client.indices.get_mapping, index=index).values()))
        return {k: str(v) for k, v in mapping["mappings"].get("_meta", {}).items()}

    def drop_index(self, index: str) -> bool:
        behind = self._call(self.client.options(ignore_status=404).indices.get_alias, name=index)
        concrete = [index] if behind.get("status") == 404 else list(behind)  # no alias: a bare index
        reply = self._call(self.client.options(ignore_status=404).indices.delete, index=",".join(concrete))
        return bool(reply.get("acknowledged"))

    # -- writes --------------------------------------------------------------------------------
    def upsert(self, index: str, doc: StoredDocument) -> bool:
        try:
            self._call(self.client.index, index=index, id=doc.id, document=_source(doc),
                       version=doc.seq, version_type="external", require_alias=True)
        except ConflictError:
            return False  # the index already holds this or a newer version
        return True

    def delete(self, index: str, doc_id: str, seq: int) -> bool:
        return self.upsert(index, StoredDocument(doc_id, seq, deleted=True))

    def bulk_write(self, index: str, docs: Iterable[StoredDocument]) -> BulkResult:
        actions = ({"_op_type": "index", "_index": index, "_id": d.id, "_version": d.seq,
                    "_version_type": "external", "_source": _source(d)} for d in latest_per_id(docs))
        result = BulkResult()
        try:
            for ok, item in helpers.streaming_bulk(self.bulk_client, actions, chunk_size=self.BULK_BATCH, max_retries=3,
                                                   raise_on_error=False, raise_on_exception=False,
                                                   require_alias=True):
                outcome = item["index"]
                if ok:
                    result.written += 1
                elif outcome.get("status") == 409:
                    result.stale += 1
                else:
                    result.failed.append((outcome.get("_id"), str(outcome.get("error"))))
        except TransportError as exc:
            raise StoreUnavailable(f"elasticsearch unavailable during bulk write: {exc}") from exc
        return result

    def begin_bulk_load(self, index: str) -> None:
        self._call(self.bulk_client.indices.put_settings, index=index,
                   settings={"refresh_interval": "-1", "number_of_replicas": 0})

    def end_bulk_load(self, index: str) -> None:
        self._call(self.bulk_client.indices.put_settings, index=index,
                   settings={"refresh_interval": SERVING_REFRESH, "number_of_replicas": self.replicas})
        self._call(self.bulk_client.indices.refresh, index=index)

    def purge_tombstones(self, index: str) -> int:
        # Scan + versioned bulk deletes rather than _delete_by_query (a module some distributions
        # leave out); external_gte at the tombstone's own version skips one rewritten meanwhile.
        tombstones = (d for d in self.scan(index, include_deleted=True) if d.deleted)
        actions = ({"_op_type": "delete", "_index": index, "_id": d.id, "_version": d.seq,
                    "_version_type": "external_gte"} for d in tombstones)
        purged = sum(ok for ok, _ in helpers.streaming_bulk(self.bulk_client, actions, raise_on_error=False))
        self._call(self.bulk_client.indices.refresh, index=index)
        return purged

    # -- reads ---------------------------------------------------------------------------------
    def search(self, index: str, vector: np.ndarray, k: int, filters: Filters) -> list[Hit]:
        knn = {"field": "vector", "query_vector": np.asarray(vector, np.float32).tolist(), "k": k,
               "num_candidates": min(max(10 * k, 100), MAX_CANDIDATES),
               "filter": {"bool": {"filter": filter_clauses(filters)}}}
        reply = self._call(self.client.search, index=index, knn=knn, size=k, source=_SOURCE)
        # Elasticsearch scores cosine as (1 + cos) / 2; report the cosine itself.
        return [Hit(h["_id"], 2.0 * h["_score"] - 1.0, h["_source"]) for h in reply["hits"]["hits"]]

    def get_many(self, index: str, ids: list[str]) -> dict[str, StoredDocument]:
        if not ids:
            return {}
        reply = self._call(self.client.mget, index=index, ids=ids, source_excludes=["vector"])
        found = {}
        for doc in reply["docs"]:
            if doc.get("error"):
                raise IndexNotFound(f"index {index} does not exist")
            if doc.get("found"):
                found[doc["_id"]] = _document(doc["_id"], doc["_source"])
        return found

    def count(self, index: str) -> int:
        return int(self._call(self.client.count, index=index, query=_LIVE)["count"])

    def scan(self, index: str, batch_size: int = 500, include_deleted: bool = False,
             after: str | None = None, upto: str | None = None) -> Iterator[StoredDocument]:
        # A point in time sorted on the ``id`` keyword with search_after: keyset pages over one
        # consistent view, resumable from any id in a later one (a scroll's position is not). A
        # slice is an id range, not a sliced PIT: a PIT's slices split by Lucene doc ids, which
        # differ in the next PIT, so a slice resumed there would not be the same documents.
        query = {"match_all": {}} if include_deleted else _LIVE
        if upto is not None:
            query = {"bool": {"filter": [query, {"range": {"id": {"lte": upto}}}]}}
        # A search sees what the last refresh made visible: refresh first, so that the scan
        # includes every write acknowledged before it began (backfill, repair, verify rely on it).
        self._call(self.bulk_client.indices.refresh, index=index)
        pit = self._call(self.client.open_point_in_time, index=index, keep_alive=SCAN_KEEP_ALIVE)["id"]
        try:
            search_after = [after] if after is not None else None
            while True:
                reply = self._call(self.client.search, pit={"id": pit, "keep_alive": SCAN_KEEP_ALIVE},
                                   query=query, size=batch_size, sort=[{"id": "asc"}],
                                   search_after=search_after, source_excludes=["vector"])
                pit = reply.get("pit_id", pit)
                hits = reply["hits"]["hits"]
                for hit in hits:
                    yield _document(hit["_id"], hit["_source"])
                if len(hits) < batch_size:
                    return
                search_after = hits[-1]["sort"]
        finally:
            self.client.options(ignore_status=404).close_point_in_time(id=pit)

    def sample_ids(self, index: str, size: int) -> list[str]:
        # A seeded random sample scored on the server: the split points of a plan without reading
        # every id (a result window holds at most 10,000).
        self._call(self.bulk_client.indices.refresh, index=index)
        query = {"function_score": {"query": {"match_all": {}},
                                    "random_score": {"seed": 20240101, "field": "_seq_no"}, "boost_mode": "replace"}}
        reply = self._call(self.client.search, index=index, query=query, size=min(size, 10_000), source=False)
        return sorted(hit["_id"] for hit in reply["hits"]["hits"])

    def ready(self) -> None:
        try:
            self.client.cluster.health(timeout="1s")
        except (TransportError, ApiError) as exc:
            raise StoreUnavailable(f"elasticsearch unavailable: {exc}") from exc


def _document(doc_id: str, source: dict) -> StoredDocument:
    fields = {f: source[f] for f in _SOURCE if source.get(f) is not None}
    return StoredDocument(doc_id, int(source["seq"]), fields, deleted=bool(source.get("deleted")))

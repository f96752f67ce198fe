"""The embedding server: one vector index per model version, behind :class:`VectorStore`."""
from .base import (BulkResult, Filters, Hit, IndexNotFound, InvalidFilter, StoredDocument, StoreUnavailable,
                   VectorStore)

__all__ = ["BulkResult", "Filters", "Hit", "IndexNotFound", "InvalidFilter", "StoredDocument",
           "StoreUnavailable", "VectorStore", "open_store"]


def open_store(settings) -> VectorStore:
    """The backend the settings name: ``lance`` (embedded default) or ``elasticsearch``."""
    if settings.store == "lance":
        from .lance import LanceStore
        return LanceStore(settings.lance_uri, timeout=settings.store_timeout,
                          ann_threshold=settings.lance_ann_threshold,
                          cache_mib=settings.lance_cache_mib,
                          memory_search_mib=settings.lance_memory_search_mib)
    if settings.store == "elasticsearch":
        from .elastic import ElasticsearchStore
        return ElasticsearchStore(settings.es_url, timeout=settings.store_timeout, replicas=settings.es_replicas,
                                  shards=settings.es_shards)
    raise ValueError(f"unknown store {settings.store!r}: use 'lance' or 'elasticsearch'")

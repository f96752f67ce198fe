"""Offline evaluation of a model version: recall@k on the query set over the whole corpus."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..corpus import Document, Query, recall_at_k

Embed = Callable[[list[str]], np.ndarray]


def embed_in_batches(embed: Embed, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
    return np.vstack([np.asarray(embed(list(texts[i:i + batch_size])), np.float32)
                      for i in range(0, len(texts), batch_size)])


def evaluate(embed: Embed, docs: Sequence[Document], queries: Sequence[Query], k: int = 10) -> dict:
    """Exact (brute-force) nearest neighbours, so the figure measures the model, not an index."""
    doc_vectors = embed_in_batches(embed, [d.embedding_text() for d in docs])
    query_vectors = embed_in_batches(embed, [q.query for q in queries])
    scores = query_vectors @ doc_vectors.T
    top = np.argsort(-scores, axis=1)[:, :k]
    ranked = {q.id: [docs[j].id for j in row] for q, row in zip(queries, top)}
    return {"metric": f"recall@{k}", f"recall@{k}": round(recall_at_k(ranked, queries, k), 4),
            "queries": len(queries), "documents": len(docs)}

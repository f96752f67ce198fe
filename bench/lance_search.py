"""LanceDB search, exact and approximate: latency and recall@10 through ``LanceStore.search``.

    python -m bench.lance_search [--documents 100000] [--queries 200] [--noise 0.7]
                                 [--index-types IVF_HNSW_SQ,IVF_PQ] [--memory-mib 64]

Builds one table of N documents through the store's bulk load (64-dim vectors: seeded random
cluster centres plus noise, normalised; 1% tombstones; categories: five common ones, ``rare`` on
1% of the documents, ``scarce`` on 0.1%, ``tiny`` on 15), then measures, for held-out queries
from the same distribution, k=10, without a category filter and with each kind of filter:

- a numpy brute-force scan of the same vectors (the reference: ground truth and its cost),
- the store's exact search (no vector index: a flat scan under the prefilter),
- the store's search on each vector index type, built the way ``end_bulk_load`` builds it,
- the store as the app runs it: a table within ``--memory-mib`` searched from its copy in memory.

Reports p50/p99 latency, recall@10 against the numpy truth, the fewest hits any query got (a
filter's k matches must still come back), the build time (the write lock is held for it) and
the recall the store's own check measured. Prints a markdown table; the figures go into
docs/benchmarks.md ("LanceDB search: exact and ANN") by hand. Timing goals live there, never in
tests.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import numpy as np

from embedding_rollout.store.base import Filters, StoredDocument
from embedding_rollout.store.lance import LanceStore

DIMS = 64
K = 10
now = time.perf_counter


def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, noise: float) -> np.ndarray:
    vectors = centres[rng.integers(0, len(centres), n)] + noise * rng.normal(size=(n, centres.shape[1])) / math.sqrt(
        centres.shape[1])
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def corpus(n: int, queries: int, clusters: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIMS))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = clustered(rng, n, centres, noise)  # noise 0.7: cosine to its centre ~0.8
    category = np.array([f"c{i % 5}" for i in range(n)], dtype=object)
    category[rng.choice(n, n // 100, replace=False)] = "rare"
    category[rng.choice(n, n // 1000, replace=False)] = "scarce"
    category[rng.choice(n, 15, replace=False)] = "tiny"
    deleted = rng.random(n) < 0.01
    return vectors, category.astype(str), deleted, clustered(rng, queries, centres, noise)


FILTERS = {"none": Filters(), "common (20%)": Filters(category=("c0",)), "rare (1%)": Filters(category=("rare",)),
           "scarce (0.1%)": Filters(category=("scarce",)), "tiny (15 docs)": Filters(category=("tiny",))}


def load(store: LanceStore, table: str, vectors, category, deleted) -> float:
    store.create_index(table, DIMS, {"model_version": "bench"})
    store.begin_bulk_load(table)
    started = now()
    for start in range(0, len(vectors), 5000):
        store.bulk_write(table, [
            StoredDocument(f"d{i:07d}", 1, deleted=True) if deleted[i] else
            StoredDocument(f"d{i:07d}", 1, {"title": f"t{i}", "text": f"text {i}", "category": category[i],
                                            "date": "2024-01-01"}, vectors[i])
            for i in range(start, min(start + 5000, len(vectors)))])
    store.end_bulk_load(table)  # below its threshold: the id index and compaction, no vector index
    return now() - started


def build(store: LanceStore, table: str, index_type: str) -> dict:
    """The vector index as ``end_bulk_load`` makes it, timed in its two parts."""
    store.ANN_INDEX_TYPE, store.ann_threshold = index_type, 0
    timed, inner = {}, store._build_vector_index

    def build_timed(index):
        started = now()
        try:
            return inner(index)
        finally:
            timed["build"] = now() - started
    store._build_vector_index = build_timed
    started = now()
    recall = store._ensure_vector_index(table)
    return {"build": timed["build"], "check": now() - started - timed["build"], "recall": recall}


def measure(vectors, category, deleted, queries, searches: dict) -> dict:
    """Per filter: every query through numpy and each store in turn (interleaved, so that the
    machine's load falls on all alike); latency, recall@10 against numpy, fewest hits."""
    results = {label: {} for label in ["numpy brute force", *searches]}
    for name, filters in FILTERS.items():
        rows = np.flatnonzero(~deleted & (np.isin(category, filters.category) if filters.category else True))
        subset = vectors[rows]  # numpy scans the matching rows only: the cheapest a filter can be
        for query in queries[:5]:  # warm-up: caches, the index's first reads
            for store, table in searches.values():
                store.search(table, query, K, filters)
        times = {label: [] for label in results}
        found = {label: 0 for label in searches}
        fewest = {label: K for label in searches}
        expected = 0
        for n, query in enumerate(queries):
            # Each search in turn, the order rotating: Lance's worker threads are still winding
            # down after its search, and would otherwise always slow the same next one.
            labels = list(results)
            answers = {}
            for label in labels[n % len(labels):] + labels[:n % len(labels)]:
                started = now()
                if label == "numpy brute force":
                    scores = subset @ query
                    answers[label] = rows[np.argpartition(-scores, K - 1)[:K]] if len(rows) > K else rows
                else:
                    store, table = searches[label]
                    answers[label] = store.search(table, query, K, filters)
                times[label].append(now() - started)
            truth = {f"d{i:07d}" for i in answers.pop("numpy brute force")}
            expected += len(truth)
            for label, hits in answers.items():
                assert not filters.category or all(h.fields["category"] in filters.category for h in hits)
                found[label] += len(truth & {h.id for h in hits})
                fewest[label] = min(fewest[label], len(hits))
        for label in results:
            results[label][name] = {"p50": 1000 * percentile(times[label], 0.5),
                                    "p99": 1000 * percentile(times[label], 0.99),
                                    "recall": found.get(label, expected) / expected,
                                    "fewest": fewest.get(label), "expected": min(K, len(rows))}
    return results


def with_copy(home: str, table: str, mib: int) -> tuple[str, LanceStore]:
    """The store with its copy in memory (``LanceStore.search`` as the app calls it), once the copy
    is made; a table above the budget is searched by Lance, and the label says so."""
    store, query = LanceStore(home, memory_search_mib=mib), np.zeros(DIMS, np.float32)
    deadline = now() + 600
    while now() < deadline:
        store.search(table, query, K, Filters())
        if table in store._in_memory:
            return f"store, copy in memory ({store._in_memory[table].nbytes / 2 ** 20:.0f} MiB)", store
        if table in store._too_large:
            return f"store, above the {mib} MiB budget: Lance exact", store
        time.sleep(0.1)
    raise RuntimeError(f"no copy of {table} in memory within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.7, help="noise norm around a cluster centre (1)")
    parser.add_argument("--index-types", default="IVF_HNSW_SQ,IVF_PQ")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--memory-mib", type=int, default=64,
                        help="the store's budget for a table searched from memory (ER_LANCE_MEMORY_SEARCH_MIB)")
    args = parser.parse_args()
    started = now()
    vectors, category, deleted, queries = corpus(args.documents, args.queries, args.clusters, args.noise,
                                                 args.seed)
    home = tempfile.mkdtemp(prefix="lance-search-")
    # One table per configuration, the same documents in each: exact search, then each index type.
    # These stores search through Lance alone (no copy in memory); the copy is measured beside them.
    searches = {"Lance exact (no vector index)": (LanceStore(home, ann_threshold=10 ** 12, memory_search_mib=0),
                                                  "exact")}
    searches.update({f"Lance {t}": (LanceStore(home, ann_threshold=10 ** 12, memory_search_mib=0),
                                    t.lower().replace("_", "-"))
                     for t in args.index_types.split(",") if t})
    builds, load_seconds = {}, []
    for label, (store, table) in searches.items():
        print(f"[bench] {label}: loading {args.documents:,} documents (load {os.getloadavg()[0]:.2f})", flush=True)
        load_seconds.append(load(store, table, vectors, category, deleted))
        if label.startswith("Lance IVF"):
            builds[label] = build(store, table, label.split()[-1])
    label, store = with_copy(home, "exact", args.memory_mib)
    searches[label] = (store, "exact")
    print(f"[bench] searching (load {os.getloadavg()[0]:.2f})", flush=True)
    results = measure(vectors, category, deleted, queries, searches)
    print()
    print(f"{args.documents:,} documents x {DIMS} dims ({args.clusters} clusters, noise {args.noise}, 1% tombstones), "
          f"{args.queries} held-out queries, k={K}; bulk load {statistics.median(load_seconds):.1f} s a table; "
          f"queries: nprobes {LanceStore.ANN_NPROBES}, refine_factor {LanceStore.ANN_REFINE}, "
          f"ef max({LanceStore.ANN_EF}, k x refine); a filter matching under {LanceStore.ANN_FILTER_SHARE:.0%} "
          f"of the rows, or leaving fewer than k hits, is searched exactly; whole run {now() - started:.0f} s, "
          f"load average {os.getloadavg()[0]:.2f} at the end.")
    print()
    for label, b in builds.items():
        print(f"- {label.split()[-1]}: built in {b['build']:.1f} s under the write lock "
              f"({round(math.sqrt(args.documents))} partitions); the store's recall check {b['check']:.1f} s: "
              f"recall@10 {b['recall']:.3f}")
    print()
    print("| search | filter | p50 ms | p99 ms | recall@10 | fewest hits |")
    print("|---|---|---|---|---|---|")
    for label, by_filter in results.items():
        for name, r in by_filter.items():
            fewest = "" if r["fewest"] is None else f"{r['fewest']} of {r['expected']}"
            print(f"| {label} | {name} | {r['p50']:.2f} | {r['p99']:.2f} | {r['recall']:.3f} | {fewest} |")


if __name__ == "__main__":
    main()

"""Concurrent writers on one LanceDB table: the cost of the one-writer discipline, and what it buys.

    python -m bench.lance_writers [--rounds 20] [--threads 4] [--output FILE]

Two processes' worth of writers (the app's streaming upserts and a backfill's bulk writes, each
with its own ``LanceStore``) insert the same new ids at the same moment, round after round, on a
table of 2,000 documents: once through ``LanceStore`` (the write lock, a merge planned on the
latest version), once with Lance's bare ``merge_insert`` as the store used it before. Reports the
rows per id left (duplicates), streaming upsert latency (p50, p99) and bulk throughput; the
table is compacted between rounds in both runs. Writes a
markdown section between the ``lance-writers:begin``/``lance-writers:end`` markers of
docs/benchmarks.md (or ``--output``).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from embedding_rollout.store.base import StoredDocument
from embedding_rollout.store.lance import LanceStore

REPO = Path(__file__).resolve().parent.parent
DIMS = 48
BASE = 2_000
NEW_PER_ROUND = 40


def document(doc_id: str, seq: int) -> StoredDocument:
    return StoredDocument(doc_id, seq, {"title": doc_id, "text": f"text {seq}", "category": "c", "date": "2024-01-01"},
                          np.ones(DIMS, np.float32) / np.sqrt(DIMS))


def bare_merge(store: LanceStore, index: str, docs: list[StoredDocument]) -> None:
    """The store's write before the discipline: a conditional merge, no lock, on the handle's version."""
    (store._table(index).merge_insert("id").when_matched_update_all(where="target.seq < source.seq")
     .when_not_matched_insert_all().execute(store._rows(index, docs)))


def run(locked: bool, rounds: int, threads: int) -> dict:
    home = tempfile.mkdtemp(prefix="lance-writers-")
    setup = LanceStore(home)
    setup.create_index("docs", DIMS, {"model_version": "v2"})
    setup.bulk_write("docs", [document(f"base-{i:05d}", 1) for i in range(BASE)])
    setup.end_bulk_load("docs")
    app, backfill = LanceStore(home), LanceStore(home)
    app.COMPACT_EVERY = backfill.COMPACT_EVERY = 10 ** 9  # compacted between rounds instead, alike
    latencies: list[float] = []
    bulk_seconds: list[float] = []
    for round_ in range(rounds):
        ids = [f"new-{round_}-{n}" for n in range(NEW_PER_ROUND)]
        start = threading.Barrier(threads + 1)

        def stream(offset: int):
            start.wait()
            for n, doc_id in enumerate(ids[offset::threads]):
                began = time.perf_counter()
                if locked:
                    app.upsert("docs", document(doc_id, 100 + n))
                else:
                    bare_merge(app, "docs", [document(doc_id, 100 + n)])
                latencies.append(time.perf_counter() - began)

        def bulk():
            start.wait()
            began = time.perf_counter()
            batch = [document(doc_id, 1) for doc_id in ids]
            if locked:
                backfill.bulk_write("docs", batch)
            else:
                bare_merge(backfill, "docs", batch)
            bulk_seconds.append(time.perf_counter() - began)

        workers = [threading.Thread(target=stream, args=(t,)) for t in range(threads)] + [threading.Thread(target=bulk)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        setup._optimize("docs")  # between rounds, for both: latency measures merges, not fragment pile-up
    rows = LanceStore(home)._table("docs").to_arrow().column("id").to_pylist()
    written = BASE + rounds * NEW_PER_ROUND
    latencies.sort()
    return {"rows": len(rows), "ids": len(set(rows)), "extra_rows": len(rows) - len(set(rows)),
            "expected_ids": written, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "bulk_docs_per_s": NEW_PER_ROUND / statistics.median(bulk_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks.md")
    args = parser.parse_args()
    results = {name: run(name == "write lock", args.rounds, args.threads) for name in ("bare merge_insert", "write lock")}
    lines = [f"{args.rounds} rounds: {args.threads} streaming writers and one bulk writer insert the same "
             f"{NEW_PER_ROUND} new ids at once into a {BASE:,}-document table (48 dims).", "",
             "| writes | rows per id > 1 (extra rows) | ids | upsert p50 ms | upsert p99 ms | bulk docs/s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['extra_rows']} | {r['ids']} of {r['expected_ids']} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['bulk_docs_per_s']:.0f} |")
    section = "\n".join(lines)
    print(section)
    text = args.output.read_text() if args.output.exists() else ""
    begin, end = "<!-- lance-writers:begin -->", "<!-- lance-writers:end -->"
    if begin in text and end in text:
        text = text[:text.index(begin) + len(begin)] + "\n" + section + "\n" + text[text.index(end):]
        args.output.write_text(text)


if __name__ == "__main__":
    main()

"""Bulk indexing: embed source documents with one version's generator and write them to its index.

Used for the initial load of a version from the corpus and for the backfill of a new version from
the stable version's index. Resumable: a checkpoint file records how far the source was consumed;
re-writing a document is harmless because writes are newer-wins by ``seq``. Memory is bounded by the
batch. The index's bulk-load settings are restored even when the load fails.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

from ..corpus import Document, load_documents
from ..store.base import BulkResult, StoredDocument, VectorStore

log = logging.getLogger(__name__)

CORPUS_SEQ = 1  # the version every corpus document starts at; streaming updates go higher


@dataclass
class Checkpoint:
    """How far a load got; ``done`` only once every source document was written."""

    index: str
    position: int = 0
    written: int = 0
    stale: int = 0
    done: bool = False

    @classmethod
    def load(cls, path: Path | None, index: str) -> "Checkpoint":
        if path and path.exists():
            data = json.loads(path.read_text())
            if data.get("index") == index:
                return cls(**data)
        return cls(index)

    def save(self, path: Path | None) -> None:
        if not path:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)


@dataclass
class Progress:
    """Count, rate and ETA, logged at most every ``every`` seconds (readable in an Airflow task log)."""

    total: int | None
    label: str
    every: float = 2.0
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._last >= self.every or (self.total is not None and self.done >= self.total):
            self._last = now
            log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            left = max(self.total - self.done, 0)
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            return (f"{self.label}: {self.done}/{self.total} docs ({100 * self.done / self.total:.1f} %), "
                    f"{rate:.0f} docs/s, ETA {eta}")
        return f"{self.label}: {self.done} docs, {rate:.0f} docs/s"


def batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


Embedder = Callable[[list[str]], "object"]


def embedding_text(fields) -> str:
    """What the model embeds for a stored document: the same text the model was trained on."""
    return Document("", fields.get("title", ""), fields.get("text", ""), "", "").embedding_text()


def corpus_source(path=None) -> Iterator[StoredDocument]:
    """The corpus as stored documents at their initial version."""
    for doc in load_documents(path):
        yield StoredDocument(doc.id, CORPUS_SEQ, {"title": doc.title, "text": doc.text,
                                                  "category": doc.category, "date": doc.date})


def embed_batch(docs: list[StoredDocument], embed: Embedder) -> list[StoredDocument]:
    live = [d for d in docs if not d.deleted]
    vectors = embed([embedding_text(d.fields) for d in live]) if live else []
    embedded = iter(vectors)
    return [d if d.deleted else StoredDocument(d.id, d.seq, d.fields, next(embedded)) for d in docs]


def load_index(source: Iterable[StoredDocument], store: VectorStore, index: str, embed: Embedder, *,
               total: int | None = None, batch_size: int = 256, checkpoint_path: Path | None = None,
               label: str = "backfill") -> Checkpoint:
    """Embed and bulk-write every source document into ``index``, resuming from the checkpoint."""
    checkpoint = Checkpoint.load(checkpoint_path, index)
    if checkpoint.done:
        log.info("%s: checkpoint says %s is complete (%d written); nothing to do", label, index, checkpoint.written)
        return checkpoint
    progress = Progress(total, label)
    progress.advance(checkpoint.position)
    store.begin_bulk_load(index)
    try:
        for batch in batched(islice(source, checkpoint.position, None), batch_size):
            result: BulkResult = store.bulk_write(index, embed_batch(batch, embed))
            if result.failed:
                raise RuntimeError(f"{label}: {len(result.failed)} writes failed, first: {result.failed[0]}")
            checkpoint.position += len(batch)
            checkpoint.written += result.written
            checkpoint.stale += result.stale
            checkpoint.save(checkpoint_path)
            progress.advance(len(batch))
        checkpoint.done = True
        checkpoint.save(checkpoint_path)
    finally:
        store.end_bulk_load(index)  # serving settings come back even when the load failed
    log.info("%s: %s complete: %d written, %d already newer, %.1fs", label, index, checkpoint.written,
             checkpoint.stale, time.monotonic() - progress.started)
    return checkpoint


@dataclass
class Verification:
    """Result of comparing a source with an index document by document."""

    checked: int = 0
    missing: int = 0   # in the source, absent from the index
    behind: int = 0    # present, but at an older version
    examples: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.behind == 0


def verify_index(source: Iterable[StoredDocument], store: VectorStore, index: str,
                 batch_size: int = 500, sample_limit: int = 20) -> Verification:
    """Every source document must be in ``index`` at its version or newer (a tombstone counts)."""
    report = Verification()
    for batch in batched(source, batch_size):
        stored = store.get_many(index, [d.id for d in batch])
        for doc in batch:
            found = stored.get(doc.id)
            if found is None or found.seq < doc.seq:
                report.missing += found is None
                report.behind += found is not None
                if len(report.examples) < sample_limit:
                    report.examples.append(doc.id)
        report.checked += len(batch)
    return report


@dataclass
class Repair:
    checked: int = 0
    repaired: int = 0
    examples: list[str] = field(default_factory=list)


def repair_index(source: Iterable[StoredDocument], store: VectorStore, index: str, embed: Embedder,
                 batch_size: int = 256, sample_limit: int = 20) -> Repair:
    """Write every source document (tombstones included) that ``index`` lacks or holds at an older
    version: the writes a candidate version missed while it was a write target. Versioned writes
    make it safe next to live traffic and safe to repeat."""
    report = Repair()
    for batch in batched(source, batch_size):
        stored = store.get_many(index, [d.id for d in batch])
        stale = [d for d in batch if d.id not in stored or stored[d.id].seq < d.seq]
        if stale:
            result = store.bulk_write(index, embed_batch(stale, embed))
            if result.failed:
                raise RuntimeError(f"repair of {index}: {len(result.failed)} writes failed, first: {result.failed[0]}")
            report.repaired += result.written
            report.examples.extend(d.id for d in stale[:max(sample_limit - len(report.examples), 0)])
        report.checked += len(batch)
    log.info("repair of %s: %d documents checked, %d brought up to date %s", index, report.checked,
             report.repaired, report.examples[:5])
    return report

"""Bulk indexing: embed source documents with one version's generator and write them to its index.

Used for the initial load of a version from the corpus and for the backfill of a new version from
the stable version's index. Sources are read in keyset order (ascending id, from any id on), so a
resume starts after the last id written whatever the writes meanwhile did to the source's physical
order; the checkpoint records that id after every batch, so a resume re-embeds at most one batch.
Re-writing a document is harmless because writes are newer-wins by ``seq``. The next batch is
read while one is embedded and the one before it written, so memory is bounded by three batches.
A load can cover one slice of the source (an id range, ``domain.slices``) with its own checkpoint.
The index's bulk-load settings are restored even when the load fails.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Protocol

from ..corpus import Document, load_documents
from ..domain.slices import IdRange
from ..store.base import BulkResult, StoredDocument, VectorStore

log = logging.getLogger(__name__)

CORPUS_SEQ = 1  # the version every corpus document starts at; streaming updates go higher


@dataclass
class Checkpoint:
    """How far a load got: every source document up to ``last_id`` (in id order) is written;
    ``done`` only once every source document was written and the serving settings restored."""

    index: str
    last_id: str | None = None
    loaded: int = 0  # source documents consumed, for progress
    written: int = 0
    stale: int = 0
    done: bool = False
    id_range: list | None = None  # a slice's (after, upto]; None: the whole source

    @classmethod
    def load(cls, slot: "Slot | Path | None", index: str, id_range: IdRange | None = None) -> "Checkpoint":
        """The slot's checkpoint of a load into ``index`` over ``id_range``; any other (an older
        format, another index, another slice's range) starts over."""
        wanted = [id_range.after, id_range.upto] if id_range else None
        text = as_slot(slot).read() if slot else None
        if text:
            data = json.loads(text)
            if data.get("index") == index and "last_id" in data and data.get("id_range") == wanted:
                return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        return cls(index, id_range=wanted)

    def save(self, slot: "Slot | Path | None") -> None:
        if slot:
            as_slot(slot).write(json.dumps(asdict(self)), final=self.done)


class Slot(Protocol):
    """Where a checkpoint is kept (``statestore.records``: a file, or a key of a ConfigMap)."""

    def read(self) -> str | None: ...

    def write(self, text: str, final: bool = False) -> None: ...


def as_slot(slot: "Slot | Path") -> Slot:
    from ..statestore.records import FileSlot
    return FileSlot(slot) if isinstance(slot, (str, Path)) else slot


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


def corpus_source(after: str | None = None, path=None, upto: str | None = None) -> Iterator[StoredDocument]:
    """The corpus as stored documents at their initial version, in id order, in (``after``, ``upto``]."""
    wanted = IdRange(after, upto)
    for doc in sorted(load_documents(path), key=lambda d: d.id):
        if doc.id in wanted:
            yield StoredDocument(doc.id, CORPUS_SEQ, {"title": doc.title, "text": doc.text,
                                                      "category": doc.category, "date": doc.date})


def embed_batch(docs: list[StoredDocument], embed: Embedder) -> list[StoredDocument]:
    live = [d for d in docs if not d.deleted]
    vectors = embed([embedding_text(d.fields) for d in live]) if live else []
    embedded = iter(vectors)
    return [d if d.deleted else StoredDocument(d.id, d.seq, d.fields, next(embedded)) for d in docs]


KeysetSource = Callable[[str | None], Iterable[StoredDocument]]
"""``after`` -> the source's documents with an id above ``after`` (all for None), in ascending id order."""


def load_index(source: KeysetSource, store: VectorStore, index: str, embed: Embedder, *,
               total: int | None = None, batch_size: int = 256, checkpoint_path: Slot | Path | None = None,
               label: str = "backfill", id_range: IdRange | None = None, end_load: bool = True) -> Checkpoint:
    """Embed and bulk-write every source document into ``index``, resuming after the checkpoint's
    last id. ``id_range``: the slice of the source this load covers (``source`` yields only it);
    ``end_load=False``: leave the index at bulk-load settings (other slices are still loading)."""
    checkpoint_path = as_slot(checkpoint_path) if checkpoint_path else None  # one slot: its writes are paced
    checkpoint = Checkpoint.load(checkpoint_path, index, id_range)
    end = store.end_bulk_load if end_load else (lambda _index: None)
    if checkpoint.done:
        end(index)  # the process may have died between saving "done" and this
        log.info("%s: checkpoint says %s is complete (%d written); nothing to do", label, index, checkpoint.written)
        return checkpoint
    progress = Progress(total, label)
    progress.advance(checkpoint.loaded)

    def written(batch: list[StoredDocument], result: BulkResult) -> None:
        if result.failed:
            raise RuntimeError(f"{label}: {len(result.failed)} writes failed, first: {result.failed[0]}")
        checkpoint.last_id = batch[-1].id
        checkpoint.loaded += len(batch)
        checkpoint.written += result.written
        checkpoint.stale += result.stale
        checkpoint.save(checkpoint_path)
        progress.advance(len(batch))

    store.begin_bulk_load(index)
    try:
        pipelined_writes(batched(in_id_order(source(checkpoint.last_id), checkpoint.last_id), batch_size),
                         lambda batch: embed_batch(batch, embed), lambda docs: store.bulk_write(index, docs), written)
    finally:
        end(index)  # serving settings come back even when the load failed
    checkpoint.done = True
    checkpoint.save(checkpoint_path)
    log.info("%s: %s complete: %d written, %d already newer, %.1fs", label, index, checkpoint.written,
             checkpoint.stale, time.monotonic() - progress.started)
    return checkpoint


def pipelined_writes(batches: Iterable[list[StoredDocument]], embed: Callable, write: Callable,
                     written: Callable) -> None:
    """Read batch k+2 while batch k+1 is embedded and batch k is written: a read ahead and one
    write in flight, each on its own thread, so the source, the generator and the store work at
    once and memory holds at most three batches. ``written(batch, result)`` runs in batch order
    once its write returned (the checkpoint never passes a batch still in flight); a failed write
    stops the load at that batch."""
    in_flight = None

    def settle() -> None:
        nonlocal in_flight
        batch, write_done = in_flight
        in_flight = None
        written(batch, write_done.result())

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bulk-write") as writer:
        try:
            with closing(read_ahead(batches)) as reads:  # a failure stops the reads at once
                for batch in reads:
                    embedded = embed(batch)
                    if in_flight:
                        settle()
                    in_flight = (batch, writer.submit(write, embedded))
        finally:  # the last write, or the one in flight when reading or embedding failed: recorded
            if in_flight:
                settle()


def read_ahead(batches: Iterable[list]) -> Iterator[list]:
    """``batches``, each read on a thread of its own while the caller works on the one before: the
    source's query and row conversion overlap the generator's call, which releases the GIL. One
    batch ahead, no more; an error of the source is raised where its batch would have been."""
    iterator = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="source-read") as reader:
        upcoming = reader.submit(next, iterator, None)
        while (batch := upcoming.result()) is not None:
            upcoming = reader.submit(next, iterator, None)
            yield batch


def in_id_order(documents: Iterable[StoredDocument], after: str | None = None) -> Iterator[StoredDocument]:
    """Pass ``documents`` through, refusing any that breaks ascending id order: a resume after the
    last id written is only correct if the source really is in that order."""
    previous = after
    for doc in documents:
        if previous is not None and doc.id <= previous:
            raise RuntimeError(f"source out of keyset order: {doc.id!r} after {previous!r}")
        previous = doc.id
        yield doc


@dataclass
class Verification:
    """Two id-ordered scans, source and target, compared document by document (tombstones too)."""

    checked: int = 0         # source documents and tombstones
    target_checked: int = 0  # target rows
    missing: int = 0         # in the source (live or deleted), absent from the target
    behind: int = 0          # in both, the target at an older version
    extra: int = 0           # live in the target, absent from the source
    duplicated: int = 0      # ids with more than one row in the target
    examples: list[str] = field(default_factory=list)
    to_repair: list[str] = field(default_factory=list, repr=False)  # missing and behind, up to a bound

    REPAIR_BY_ID_LIMIT = 50_000  # beyond it, a repair pass over the whole source is cheaper

    @property
    def complete(self) -> bool:
        return self.missing == self.behind == self.extra == self.duplicated == 0

    @property
    def figures(self) -> dict:
        return {k: getattr(self, k) for k in ("checked", "target_checked", "missing", "behind", "extra", "duplicated")}

    def repair_ids(self) -> list[str] | None:
        """The ids a repair must write to make this pass complete, or None when there were too
        many to keep (repair them all)."""
        return self.to_repair if len(self.to_repair) == self.missing + self.behind else None

    def note(self, kind: str, doc_id: str, sample_limit: int = 20) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < sample_limit:
            self.examples.append(doc_id)
        if kind in ("missing", "behind") and len(self.to_repair) < self.REPAIR_BY_ID_LIMIT:
            self.to_repair.append(doc_id)


def verify_index(source: Iterable[StoredDocument], target: Iterable[StoredDocument],
                 both_ways: bool = True) -> Verification:
    """Every source document and tombstone is in the target at its version or newer, and (with
    ``both_ways``) nothing live in the target is absent from the source: a merge of two scans in
    ascending id order (``include_deleted``), linear in N, memory bounded by the scans' batches."""
    report = Verification()
    sources, targets = in_id_order(source), _rows_by_id(target, report)
    src, tgt = next(sources, None), next(targets, None)
    while src is not None or tgt is not None:
        if tgt is None or (src is not None and src.id < tgt.id):
            report.checked += 1
            report.note("missing", src.id)
            src = next(sources, None)
        elif src is None or tgt.id < src.id:
            if both_ways and not tgt.deleted:
                report.note("extra", tgt.id)
            tgt = next(targets, None)
        else:
            report.checked += 1
            if tgt.seq < src.seq:
                report.note("behind", src.id)
            src, tgt = next(sources, None), next(targets, None)
    return report


def _rows_by_id(rows: Iterable[StoredDocument], report: Verification) -> Iterator[StoredDocument]:
    """The target's rows in id order, one per id: a second row of one id is counted, not compared."""
    previous = None
    for row in rows:
        report.target_checked += 1
        if previous is not None and row.id == previous.id:
            report.note("duplicated", row.id)
            continue
        if previous is not None and row.id < previous.id:
            raise RuntimeError(f"target out of keyset order: {row.id!r} after {previous.id!r}")
        previous = row
        yield row


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

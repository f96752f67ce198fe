"""A backfill stopped part way and resumed loads every source document, on both real backends,
while documents change under it (updates move rows in Lance's scan order; merges reorder
Elasticsearch's); and its verification checks both directions, tombstones included."""
from __future__ import annotations

import numpy as np
import pytest

from embedding_rollout.pipeline.indexing import Checkpoint, load_index, verify_index
from embedding_rollout.store.base import StoredDocument

DIMS = 8
DOCUMENTS = 300


class Stopped(RuntimeError):
    """Stands for the backfill process dying part way."""


def embedder(fail_after_calls: int | None = None):
    calls = {"n": 0}

    def embed(texts):
        calls["n"] += 1
        if fail_after_calls is not None and calls["n"] > fail_after_calls:
            raise Stopped("the backfill stopped here")
        return np.ones((len(texts), DIMS), np.float32) / np.sqrt(DIMS)
    return embed


def document(i: int, seq: int = 1) -> StoredDocument:
    return StoredDocument(f"doc-{i:04d}", seq, {"title": f"t{i}", "text": f"x{i} {seq}", "category": "c",
                                                "date": "2020-01-01"}, np.ones(DIMS, np.float32))


def refreshed(store, index):
    if hasattr(store, "client"):
        store.client.indices.refresh(index=index)


@pytest.fixture
def indices(store):
    source, target = store.test_index("source"), store.test_index("target")
    for name in (source, target):
        store.create_index(name, DIMS, {"model_version": name})
    store.bulk_write(source, [document(i) for i in range(DOCUMENTS)])
    refreshed(store, source)
    return source, target


def source_of(store, index):
    return lambda after: store.scan(index, batch_size=50, include_deleted=True, after=after)


def test_a_resumed_backfill_loads_every_document_although_updates_reorder_the_source(store, indices, tmp_path):
    source, target = indices
    checkpoint = tmp_path / "checkpoint.json"
    with pytest.raises(Stopped):
        load_index(source_of(store, source), store, target, embedder(fail_after_calls=3), batch_size=40,
                   checkpoint_path=checkpoint)
    stopped = Checkpoint.load(checkpoint, target)
    assert not stopped.done and stopped.last_id == "doc-0119"  # three batches of 40 were written
    # Live updates meanwhile, dual-written to both (as the app does once dual-write started): in
    # Lance each updated row moves to the end of the scan, so a count of rows to skip is wrong.
    for i in range(0, 100, 2):
        for name in (source, target):
            store.upsert(name, document(i, seq=5))
    refreshed(store, source)

    loaded = load_index(source_of(store, source), store, target, embedder(), batch_size=40,
                        checkpoint_path=checkpoint)
    assert loaded.done and loaded.loaded == DOCUMENTS
    refreshed(store, target)
    report = verify_index(source_of(store, source)(None), source_of(store, target)(None))
    assert report.complete, report
    assert report.checked == DOCUMENTS and report.target_checked == DOCUMENTS


def test_a_backfill_killed_after_it_finished_still_restores_the_serving_settings(store, indices, tmp_path):
    source, target = indices
    checkpoint = tmp_path / "checkpoint.json"
    store.begin_bulk_load(target)  # the load began, then the process died after saving "done"
    Checkpoint(target, last_id="doc-0299", loaded=DOCUMENTS, done=True).save(checkpoint)
    load_index(source_of(store, source), store, target, embedder(), checkpoint_path=checkpoint)
    if hasattr(store, "client"):
        settings = next(iter(store.client.indices.get_settings(index=target).values()))["settings"]["index"]
        assert settings["refresh_interval"] != "-1"


def test_verification_sees_a_missing_tombstone_and_a_live_document_the_source_lacks(store, indices):
    source, target = indices
    store.bulk_write(target, [document(i) for i in range(DOCUMENTS)])
    store.delete(source, "doc-0007", 9)         # deleted in the source, still live in the target
    store.upsert(target, document(DOCUMENTS + 1))  # live in the target, never in the source
    store.delete(source, "doc-9999", 4)         # a tombstone of a document the target never had
    for name in (source, target):
        refreshed(store, name)
    report = verify_index(source_of(store, source)(None), source_of(store, target)(None))
    assert not report.complete
    assert report.behind == 1 and report.missing == 1 and report.extra == 1, report
    assert set(report.examples) == {"doc-0007", "doc-9999", f"doc-{DOCUMENTS + 1:04d}"}

"""The load's pipeline (``pipeline.indexing.pipelined_writes``): the source is read, the generator
embeds and the store writes at once, each stage at most one batch ahead of the next, and a failure
anywhere records exactly the batches whose writes returned."""
from __future__ import annotations

import threading

import pytest

from embedding_rollout.pipeline.indexing import pipelined_writes
from embedding_rollout.store.base import BulkResult

BATCHES = 4
WAIT = 10  # seconds: a bound for a wait that fails the test, never a timing goal


class SourceFailed(RuntimeError):
    pass


def source(asked: list[threading.Event], fail_at: int | None = None):
    """Batches [0], [1], ...; ``asked[k]`` is set when batch k is asked for."""
    for k in range(BATCHES):
        asked[k].set()
        if k == fail_at:
            raise SourceFailed(f"the source failed at batch {k}")
        yield [k]


def write(batch):
    return BulkResult(written=len(batch))


def test_the_next_batch_is_read_while_one_is_embedded_and_no_further():
    asked = [threading.Event() for _ in range(BATCHES + 2)]
    written = []

    def embed(batch):
        k = batch[0]
        if k + 1 < BATCHES:
            assert asked[k + 1].wait(WAIT), f"batch {k + 1} was not read while batch {k} was embedded"
        assert not asked[k + 2].is_set(), f"batch {k + 2} was read while batch {k} was embedded"
        return batch

    pipelined_writes(source(asked), embed, write, lambda batch, result: written.append(batch))
    assert written == [[k] for k in range(BATCHES)]


def test_a_source_failure_records_every_batch_read_before_it_and_stops():
    asked = [threading.Event() for _ in range(BATCHES)]
    written, embedded = [], []

    def embed(batch):
        embedded.append(batch)
        return batch

    with pytest.raises(SourceFailed):
        pipelined_writes(source(asked, fail_at=2), embed, write, lambda batch, result: written.append(batch))
    assert written == embedded == [[0], [1]]
    assert not asked[3].is_set()


def test_an_embedding_failure_stops_the_reads_and_records_the_writes_before_it():
    asked = [threading.Event() for _ in range(BATCHES + 1)]
    written = []

    def embed(batch):
        if batch == [1]:
            raise SourceFailed("the generator failed at batch 1")
        return batch

    with pytest.raises(SourceFailed):
        pipelined_writes(source(asked), embed, write, lambda batch, result: written.append(batch))
    assert written == [[0]]
    assert not asked[3].is_set()  # batch 2 may have been read ahead, nothing after it

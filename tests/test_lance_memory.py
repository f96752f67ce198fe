"""A small LanceDB table is searched from a copy in memory: the same answers as Lance's own search,
and never a version behind what this process wrote or, after the consistency interval, what
another process committed."""
from __future__ import annotations

import time

import numpy as np
import pytest

from embedding_rollout.config import Settings
from embedding_rollout.store import open_store
from embedding_rollout.store.base import Filters, StoredDocument
from embedding_rollout.store.lance import LanceStore

DIMS, ROWS, K = 16, 1_200, 10
INDEX = "docs-v1"
VECTORS = np.random.default_rng(3).normal(size=(ROWS, DIMS)).astype(np.float32)
QUERIES = np.random.default_rng(4).normal(size=(15, DIMS)).astype(np.float32)
CATEGORIES = ["news", "sport", "science", None]
DATES = ["2024-01-05", "2024-02-10", "2024-03-15", None]


def document(i: int, seq: int = 1, vector=None) -> StoredDocument:
    return StoredDocument(f"d{i:05d}", seq, {"title": f"t{i}", "text": f"text {i}", "category": CATEGORIES[i % 4],
                                             "date": DATES[(i // 4) % 4]}, VECTORS[i] if vector is None else vector)


def loaded(path, **options) -> LanceStore:
    store = LanceStore(str(path), **options)
    store.create_index(INDEX, DIMS, {"model_version": "v1"})
    store.bulk_write(INDEX, [StoredDocument(f"d{i:05d}", 1, deleted=True) if i % 9 == 0 else document(i)
                             for i in range(ROWS)])
    store.bulk_write(INDEX, [document(5, vector=np.zeros(DIMS, np.float32))])  # a vector with no cosine
    return store


def copied(store: LanceStore, index: str = INDEX, timeout: float = 30.0):
    """Search until the store holds a copy of the table's current version (it copies in the
    background); the copy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        store.search(index, VECTORS[0], K, Filters())
        held = store._in_memory.get(index)
        if held is not None and held.version == store._table(index).version:
            return held
        time.sleep(0.05)
    raise AssertionError(f"no copy of {index} in memory after {timeout}s")


FILTERS = [Filters(), Filters(category=("news",)), Filters(category=("sport", "science")),
           Filters(category=("nobody",)), Filters(date_from="2024-02-10"), Filters(date_to="2024-02-10"),
           Filters(date_from="2024-02-01", date_to="2024-03-01"), Filters(category=("news",), date_to="2024-01-31")]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: repr(f))
def test_the_copy_answers_as_lances_own_search(tmp_path, filters):
    store = loaded(tmp_path)
    own = LanceStore(str(tmp_path), memory_search_mib=0)  # Lance's own search only
    copied(store)
    for query in QUERIES:
        for k in (K, 400):  # 400: more than some filters admit
            expected, got = own.search(INDEX, query, k, filters), store.search(INDEX, query, k, filters)
            assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)
            lance_scores = {h.id: h.score for h in expected}
            for place, (hit, lances) in enumerate(zip(got, expected)):
                if hit.id != lances.id:  # only two scores equal in float32 may change places
                    assert abs(lance_scores.get(hit.id, expected[-1].score) - lances.score) <= 1e-5, place
                else:
                    assert hit.fields == lances.fields
    assert store._in_memory[INDEX].version == store._table(INDEX).version  # every answer above from the copy


def test_this_process_sees_its_own_write_at_once_and_the_copy_follows(tmp_path):
    store = loaded(tmp_path)
    first = copied(store)
    query = QUERIES[0]
    assert store.upsert(INDEX, document(1, seq=2, vector=query))  # now the nearest to the query
    assert store.search(INDEX, query, K, Filters())[0].id == "d00001"
    assert copied(store).version > first.version
    assert store.search(INDEX, query, K, Filters())[0].id == "d00001"  # from the new copy
    assert store.delete(INDEX, "d00001", 3)
    assert "d00001" not in {h.id for h in store.search(INDEX, query, K, Filters())}


def test_another_processs_write_is_seen_within_the_consistency_interval(tmp_path):
    app = loaded(tmp_path)
    copied(app)
    writer = LanceStore(str(tmp_path))  # its own connection: another process as far as Lance knows
    query = QUERIES[1]
    assert writer.upsert(INDEX, document(2, seq=2, vector=query))
    written = time.monotonic()
    while app.search(INDEX, query, K, Filters())[0].id != "d00002":
        assert time.monotonic() - written < 2.0, "another process's write not seen within 2 s"
        time.sleep(0.02)
    copied(app)
    assert app.search(INDEX, query, K, Filters())[0].id == "d00002"


def test_a_table_above_the_budget_is_searched_by_lance_and_never_copied(tmp_path):
    store = loaded(tmp_path, memory_search_mib=0)
    limited = LanceStore(str(tmp_path), memory_search_mib=1)
    big = "docs-big"  # 1,100 x 256 float32: above 1 MiB
    limited.create_index(big, 256, {"model_version": "v1"})
    vectors = np.random.default_rng(5).normal(size=(1_100, 256)).astype(np.float32)
    limited.bulk_write(big, [StoredDocument(f"b{i:05d}", 1, {"title": "t"}, vectors[i]) for i in range(1_100)])
    deadline = time.monotonic() + 30
    while limited._too_large.get(big) != limited._table(big).version:
        assert time.monotonic() < deadline, "the copy of a table above the budget was never refused"
        assert limited.search(big, vectors[7], K, Filters())[0].id == "b00007"
        time.sleep(0.05)
    assert big not in limited._in_memory
    assert limited.search(big, vectors[7], K, Filters())[0].id == "b00007"
    assert copied(limited).version == limited._table(INDEX).version  # the small table still is copied
    assert store.search(INDEX, VECTORS[3], K, Filters())[0].id == "d00003" and INDEX not in store._in_memory


def test_the_budget_is_a_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("ER_LANCE_MEMORY_SEARCH_MIB", "0")
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    assert open_store(Settings()).memory_search_bytes == 0
    monkeypatch.setenv("ER_LANCE_MEMORY_SEARCH_MIB", "8")
    assert open_store(Settings()).memory_search_bytes == 8 << 20

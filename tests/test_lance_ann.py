"""The LanceDB store's approximate vector index: built by a bulk load that leaves a large table,
checked against exact search, and searched with the same answers as the exact search."""
from __future__ import annotations

import numpy as np
import pytest

from embedding_rollout.config import Settings
from embedding_rollout.store import open_store
from embedding_rollout.store.base import Filters, StoredDocument
from embedding_rollout.store.lance import LanceStore

DIMS, ROWS, THRESHOLD, K = 32, 2_000, 1_500, 10
INDEX = "docs-v1"
CENTRES = np.random.default_rng(0).normal(size=(16, DIMS))


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = CENTRES[rng.integers(0, len(CENTRES), n)] + 0.7 * rng.normal(size=(n, DIMS))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


VECTORS = clustered(ROWS, 1)
QUERIES = clustered(40, 2)  # held out: not rows of the table
# Most documents in two big categories; "some" on 177 documents, "few" on 30, "five" on 5.
CATEGORY = np.array(["big" if i % 2 else "other" for i in range(ROWS)], dtype=object)
CATEGORY[np.arange(180) * 11] = "some"
CATEGORY[np.arange(30) * 61 + 7] = "few"
CATEGORY[np.arange(5) * 397 + 11] = "five"


def document(i: int, seq: int = 1, vector=None) -> StoredDocument:
    return StoredDocument(f"d{i:05d}", seq, {"title": f"t{i}", "text": f"text {i}", "category": str(CATEGORY[i]),
                                             "date": "2024-01-01"}, VECTORS[i] if vector is None else vector)


def loaded(tmp_path, rows: int = ROWS, threshold: int = THRESHOLD, tombstones=()) -> LanceStore:
    # Without the copy in memory: these searches must go through the index.
    store = LanceStore(str(tmp_path / "lance"), ann_threshold=threshold, memory_search_mib=0)
    store.create_index(INDEX, DIMS, {"model_version": "v1"})
    store.begin_bulk_load(INDEX)
    for start in range(0, rows, 500):
        store.bulk_write(INDEX, [StoredDocument(f"d{i:05d}", 2, deleted=True) if i in tombstones else document(i)
                                 for i in range(start, min(start + 500, rows))])
    store.end_bulk_load(INDEX)
    return store


def vector_indices(store: LanceStore) -> list:
    return [i for i in store._table(INDEX).list_indices() if list(i.columns) == ["vector"]]


def exact_top(query: np.ndarray, rows: np.ndarray) -> list[str]:
    scores = VECTORS[rows] @ query
    return [f"d{i:05d}" for i in rows[np.argsort(-scores)[:K]]]


def recall(store: LanceStore, rows: np.ndarray, filters: Filters = Filters()) -> float:
    found = sum(len({h.id for h in store.search(INDEX, q, K, filters)} & set(exact_top(q, rows))) for q in QUERIES)
    return found / (len(QUERIES) * min(K, len(rows)))


def assert_exact_scores(store: LanceStore, query: np.ndarray) -> None:
    """The hits' scores are the exact cosines of their vectors to the query."""
    hits = store.search(INDEX, query, K, Filters())
    assert [h.score for h in hits] == pytest.approx([float(VECTORS[int(h.id[1:])] @ query) for h in hits], abs=1e-4)


def test_a_large_bulk_load_gets_a_vector_index_checked_against_exact_search(tmp_path):
    store = loaded(tmp_path)
    [index] = vector_indices(store)
    assert index.index_type == "IvfFlat"
    assert store.last_ann_recall[INDEX] >= 0.95  # the store's own check, on the table's vectors
    assert recall(store, np.arange(ROWS)) >= 0.95  # held-out queries against numpy's exact answer
    assert_exact_scores(store, QUERIES[0])  # a flat index scores on the full vectors


@pytest.mark.parametrize("index_type, built", [("IVF_SQ", "IvfSq"), ("IVF_HNSW_SQ", "IvfHnswSq")])
def test_the_other_index_types_are_built_checked_and_score_exactly(tmp_path, monkeypatch, index_type, built):
    monkeypatch.setattr(LanceStore, "ANN_INDEX_TYPE", index_type)
    store = loaded(tmp_path)
    [index] = vector_indices(store)
    assert index.index_type == built and store.last_ann_recall[INDEX] >= 0.95
    assert recall(store, np.arange(ROWS)) >= 0.95
    assert_exact_scores(store, QUERIES[1])  # quantized codes re-ranked on the full vectors


def test_a_filtered_search_returns_only_matches_and_as_many_as_there_are(tmp_path):
    store = loaded(tmp_path)
    assert vector_indices(store)
    store.ANN_NPROBES = 5  # of 45 partitions: the share 40 of 316 is at 100k rows
    for category, matches in (("big", 894), ("some", 177), ("few", 30), ("five", 5)):
        rows = np.flatnonzero(CATEGORY == category)
        assert len(rows) == matches
        for query in QUERIES[:10]:
            hits = store.search(INDEX, query, K, Filters(category=(category,)))
            assert {h.fields["category"] for h in hits} == {category}
            assert len(hits) == min(K, matches)
        # "big" through the index; the others match under 10% of the rows, too few for the
        # probed partitions to hold their nearest (through them "some" had recall 0.96-0.98).
        assert recall(store, rows, Filters(category=(category,))) >= (0.95 if category == "big" else 1.0)
    both = store.search(INDEX, QUERIES[0], K, Filters(category=("few", "five")))
    assert len(both) == K and {h.fields["category"] for h in both} <= {"few", "five"}


def test_a_filter_the_probed_partitions_cannot_fill_falls_back_to_exact_search(tmp_path):
    store = loaded(tmp_path)
    store.ANN_FILTER_SHARE, store.ANN_NPROBES = 0, 1  # every filter through the index, one partition
    for category, matches in (("few", 30), ("five", 5)):
        rows = np.flatnonzero(CATEGORY == category)
        for query in QUERIES[:10]:
            hits = store.search(INDEX, query, K, Filters(category=(category,)))
            assert [h.id for h in hits] == exact_top(query, rows)


def test_tombstones_never_come_back(tmp_path):
    store = loaded(tmp_path, tombstones=set(range(0, ROWS, 10)))  # in the load, then in the index
    assert vector_indices(store)
    later = list(range(5, 400, 10))
    for i in later:  # deleted after the index was built: tombstones not yet in it
        assert store.delete(INDEX, f"d{i:05d}", 5)
    gone = {f"d{i:05d}" for i in [*range(0, ROWS, 10), *later]}
    for i in [0, 10, 20, *later[:10]]:
        hits = store.search(INDEX, VECTORS[i], K, Filters())
        assert len(hits) == K and not gone & {h.id for h in hits}
    for category in ("few", "five", "big"):
        hits = store.search(INDEX, VECTORS[7], K, Filters(category=(category,)))
        assert hits and not gone & {h.id for h in hits}


def test_a_table_below_the_threshold_gets_no_vector_index(tmp_path):
    store = loaded(tmp_path, threshold=ROWS + 1)
    assert vector_indices(store) == [] and INDEX not in store.last_ann_recall
    assert any(list(i.columns) == ["id"] for i in store._table(INDEX).list_indices())
    assert recall(store, np.arange(ROWS)) == 1.0  # exact
    assert len(store.search(INDEX, QUERIES[0], K, Filters(category=("five",)))) == 5


def test_another_bulk_load_keeps_the_index_until_the_table_outgrows_it(tmp_path):
    store = loaded(tmp_path, rows=1_000, threshold=800)
    [first] = vector_indices(store)
    store.end_bulk_load(INDEX)  # nothing new: nothing rebuilt
    store.begin_bulk_load(INDEX)
    store.bulk_write(INDEX, [document(i) for i in range(1_000, 1_500)])  # 1.5x: optimize folds them in
    store.end_bulk_load(INDEX)
    [same] = vector_indices(store)
    assert same.name == first.name
    stats = store._table(INDEX).index_stats(same.name)
    assert (stats.num_indexed_rows, stats.num_unindexed_rows) == (1_500, 0)
    store.begin_bulk_load(INDEX)
    store.bulk_write(INDEX, [document(i) for i in range(1_500, ROWS)])  # 2x what it was trained on
    store.end_bulk_load(INDEX)
    [rebuilt] = vector_indices(store)  # the new one replaces the old
    assert rebuilt.name != first.name and store.last_ann_recall[INDEX] >= 0.95


def test_rows_written_after_the_index_are_searched(tmp_path):
    store = loaded(tmp_path)
    [index] = vector_indices(store)
    new = clustered(3, 3)
    for n, vector in enumerate(new):
        store.upsert(INDEX, StoredDocument(f"new-{n}", 1, {"title": "new", "category": "fresh"}, vector))
    moved = StoredDocument("d00003", 9, {"title": "moved", "category": "big"}, new[0] * -1)  # a new vector
    assert store.upsert(INDEX, moved)
    assert store._table(INDEX).index_stats(index.name).num_unindexed_rows >= 4
    for n, vector in enumerate(new):
        assert store.search(INDEX, vector, K, Filters())[0].id == f"new-{n}"
    fresh = [h.id for h in store.search(INDEX, new[2], K, Filters(category=("fresh",)))]
    assert fresh[0] == "new-2" and sorted(fresh) == ["new-0", "new-1", "new-2"]
    top = store.search(INDEX, -new[0], K, Filters())[0]
    assert (top.id, top.fields["title"]) == ("d00003", "moved")
    assert all(h.fields["title"] != "t3" for h in store.search(INDEX, VECTORS[3], K, Filters()))  # old version gone


def test_an_index_below_the_recall_floor_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(LanceStore, "ANN_MIN_RECALL", 1.01)  # no index can pass
    store = loaded(tmp_path)
    assert vector_indices(store) == []
    assert 0.95 <= store.last_ann_recall[INDEX] <= 1.0  # measured, kept for inspection
    assert recall(store, np.arange(ROWS)) == 1.0


def test_a_failed_build_is_logged_not_raised(tmp_path, monkeypatch):
    def broken(self, rows, dims):
        raise RuntimeError("no index today")
    monkeypatch.setattr(LanceStore, "_ann_config", broken)
    store = loaded(tmp_path)
    assert vector_indices(store) == [] and INDEX not in store.last_ann_recall
    assert len(store.search(INDEX, QUERIES[0], K, Filters())) == K


def test_the_threshold_is_a_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    monkeypatch.setenv("ER_STORE", "lance")
    monkeypatch.setenv("ER_LANCE_ANN_THRESHOLD", "1234")
    assert open_store(Settings()).ann_threshold == 1234
    monkeypatch.delenv("ER_LANCE_ANN_THRESHOLD")
    assert Settings().lance_ann_threshold == LanceStore.ANN_THRESHOLD == 100_000


def test_the_cache_size_is_a_setting_and_the_store_searches_within_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ER_HOME", str(tmp_path))
    monkeypatch.setenv("ER_STORE", "lance")
    assert open_store(Settings()).session is None  # Lance's own defaults
    monkeypatch.setenv("ER_LANCE_CACHE_MIB", "1")
    store = open_store(Settings())
    store.create_index(INDEX, DIMS, {"model_version": "v1"})
    store.bulk_write(INDEX, [document(i) for i in range(100)])
    assert [h.id for h in store.search(INDEX, VECTORS[7], 1, Filters())] == ["d00007"]
    # Both caches (index and metadata) of this store's own session, 1 MiB each.
    assert 0 < store.session.size_bytes <= 2 << 20


def test_a_bulk_load_indexes_the_filter_columns_and_filters_see_rows_written_since(tmp_path):
    store = loaded(tmp_path, threshold=ROWS + 1)  # exact search: the filter alone picks the rows
    indexed = {tuple(i.columns): i.index_type for i in store._table(INDEX).list_indices()}
    assert indexed == {("id",): "BTree", ("deleted",): "Bitmap", ("category",): "Bitmap", ("date",): "BTree"}
    few = np.flatnonzero(CATEGORY == "few")
    for i in few[:10]:  # out of "few" after the indices were built
        assert store.delete(INDEX, f"d{i:05d}", 5)
    moved = [3, 5, 9]  # into "few", and dated later
    for i in moved:
        assert store.upsert(INDEX, StoredDocument(f"d{i:05d}", 5, {"title": f"t{i}", "category": "few",
                                                                   "date": "2025-06-01"}, VECTORS[i]))
    expected = np.array(sorted([*few[10:], *moved]))
    for query in QUERIES[:10]:
        hits = store.search(INDEX, query, K, Filters(category=("few",)))
        assert [h.id for h in hits] == exact_top(query, expected)
        later = store.search(INDEX, query, K, Filters(category=("few", "big"), date_from="2025-01-01"))
        assert sorted(h.id for h in later) == [f"d{i:05d}" for i in moved]
    assert store.count(INDEX) == ROWS - 10

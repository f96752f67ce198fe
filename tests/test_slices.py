"""The backfill's slices: id ranges that hold every id exactly once, split points from the ids, and
the scan of one range on both real backends."""
from __future__ import annotations

import random

import numpy as np
import pytest

from embedding_rollout.domain.slices import (MAX_SLICES, BackfillPlan, InvalidSlices, check_slices,
                                             default_slices, ranges, split_points)
from embedding_rollout.store.base import StoredDocument


def owners(doc_id: str, slices: list) -> list[int]:
    return [k for k, id_range in enumerate(slices) if doc_id in id_range]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("slices", [1, 2, 3, 7, MAX_SLICES])
def test_the_ranges_hold_every_id_once_also_ids_added_after_the_split(seed, slices):
    rng = random.Random(seed)
    ids = sorted({f"{rng.choice('abc')}{rng.randrange(10 ** rng.randrange(1, 5))}" for _ in range(rng.randrange(0, 60))})
    plan = ranges(split_points(ids, slices), slices)
    assert len(plan) == slices
    later = [f"{rng.choice('0az~')}{rng.randrange(1000)}" for _ in range(50)] + ["\U0010ffff", " ", "a", "a0"]
    for doc_id in ids + later:
        assert len(owners(doc_id, plan)) == 1, (doc_id, plan)


def test_split_points_balance_the_ids():
    ids = [f"doc-{i:05d}" for i in range(1000)]
    plan = ranges(split_points(ids, 4), 4)
    assert [sum(doc_id in r for doc_id in ids) for r in plan] == [250, 250, 250, 250]


def test_fewer_ids_than_slices_leave_empty_ranges_never_overlapping_ones():
    plan = ranges(split_points(["a", "a", "b"], 5), 5)
    assert [r.describe() for r in plan][:2] == ["(-inf, a]", "(a, +inf]"]
    assert all(not any(doc_id in r for doc_id in ["a", "b", "c", ""]) for r in plan[2:])
    assert ranges(split_points([], 3), 3)[0].describe() == "(-inf, +inf]"


@pytest.mark.parametrize("bad", [0, -1, MAX_SLICES + 1, 2.5, "3", True, None])
def test_a_slice_count_out_of_bounds_is_refused(bad):
    with pytest.raises(InvalidSlices, match="from 1 to"):
        check_slices(bad)


def test_inconsistent_split_points_are_refused():
    for points, slices in ((["b", "a"], 3), (["a", "a"], 3), (["a", "b", "c"], 3)):
        with pytest.raises(InvalidSlices):
            BackfillPlan("v2", "v1", slices, tuple(points))


def test_the_default_grows_with_the_source_and_stays_bounded():
    assert default_slices(0) == default_slices(10_000) == 1
    assert default_slices(1_000_000) == 5
    assert default_slices(10 ** 9) == MAX_SLICES


def test_a_plan_round_trips_and_names_its_slices_from_one():
    plan = BackfillPlan("v2", "v1", 3, ("f", "m"), 30)
    assert BackfillPlan.from_json(plan.to_json()) == plan
    assert [plan.range(k).describe() for k in (1, 2, 3)] == ["(-inf, f]", "(f, m]", "(m, +inf]"]
    with pytest.raises(InvalidSlices, match="not one of"):
        plan.range(0)


def test_a_range_scan_and_the_id_sample_on_both_backends(store):
    index = store.test_index("slices")
    store.create_index(index, 4, {"model_version": "t"})
    docs = [StoredDocument(f"id-{i:03d}", 1, {"title": "t", "text": "x", "category": "c", "date": "2020-01-01"},
                           np.ones(4, np.float32)) for i in range(120)]
    store.bulk_write(index, docs)
    store.delete(index, "id-050", 2)
    sample = store.sample_ids(index, 1000)
    assert sample == sorted(sample) and set(sample) <= {d.id for d in docs} and "id-050" in sample
    points = split_points(sample, 3)
    seen = [d.id for r in ranges(points, 3)
            for d in store.scan(index, batch_size=7, include_deleted=True, after=r.after, upto=r.upto)]
    assert seen == [d.id for d in docs]  # in order, every id once, the tombstone too
    assert [d.id for d in store.scan(index, after="id-010", upto="id-013")] == ["id-011", "id-012", "id-013"]

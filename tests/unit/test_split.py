"""The split plan (no Ray): random with the seed, stratified to within one row per
class, groups kept whole, and the same split however rows are spread over files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from forgeml.data.columns import category
from forgeml.data.split import SplitKeys, SplitPlan, draws, hash_values, quotas


def _keys(units=None, strata=None, files=None, rows=None, usable=None) -> SplitKeys:
    n = len(units if units is not None else rows)
    return SplitKeys(
        units=None if units is None else np.asarray(units, np.uint64),
        files=np.zeros(n, np.int64) if files is None else np.asarray(files, np.int64),
        rows=np.arange(n) if rows is None else np.asarray(rows, np.int64),
        strata=np.zeros(n, np.uint64) if strata is None else np.asarray(strata, np.uint64),
        usable=np.ones(n, bool) if usable is None else np.asarray(usable),
    )


def _split(keys: SplitKeys, seed: int = 1, val: float = 0.15, test: float = 0.15):
    plan = SplitPlan.fit(keys, seed, val, test)
    return plan.assign(keys.units, keys.files, keys.rows, keys.strata)


def test_draws_are_a_pure_function_of_unit_and_seed():
    units = np.arange(20000, dtype=np.uint64)
    u = draws(units, seed=1)
    shuffled = np.random.default_rng(0).permutation(20000)
    np.testing.assert_array_equal(draws(units[shuffled], 1), u[shuffled])
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert np.mean(draws(units, 2) != u) > 0.99


@pytest.mark.parametrize(
    "counts", [(500, 37, 4), (1000, 1000), (7, 3, 2, 1), (4,) * 150, (3,) * 100, (10,) * 40]
)
def test_every_class_gets_its_shares_to_within_one_row_and_the_totals_are_right(counts):
    strata = np.repeat(np.arange(1, len(counts) + 1), counts)
    split = _split(_keys(units=np.arange(len(strata)) * 7919, strata=strata))
    for k, n in enumerate(counts, start=1):
        mine = split[strata == k]
        for name, share in (("test", 0.15), ("val", 0.15), ("train", 0.70)):
            assert abs((mine == name).sum() - n * share) < 1, (k, name)
        assert (mine == "train").sum() >= 1  # every class is trained on
    # the totals are the fractions of all rows (to the row), so no split is left empty
    for name, share in (("test", 0.15), ("val", 0.15)):
        assert abs((split == name).sum() - len(strata) * share) <= 1, name


def test_a_class_of_one_row_is_a_training_row_whatever_the_fractions():
    split = _split(_keys(units=np.arange(60), strata=np.repeat([1, 2, 3], [1, 2, 57])), 1, 0.3, 0.4)
    assert split[0] == "train" and "train" in split[1:3]


def test_quotas_round_each_share_down_or_up_and_sum_to_each_class():
    sizes = np.array([10, 10, 10, 1])
    counts = quotas(sizes, (0.25, 0.15, 0.6), np.arange(4))
    assert counts.sum(1).tolist() == [10, 10, 10, 1] and counts[3].tolist() == [0, 0, 1]
    ideal = sizes[:, None] * np.array([0.25, 0.15, 0.6])
    assert (np.abs(counts - ideal) < 1).all()
    assert counts[:3, 0].sum() == 8 and counts[:3, 1].sum() in (4, 5)


def test_ids_that_hold_rows_of_several_classes_are_not_parted_by_stratifying():
    units = np.concatenate([np.arange(200), np.arange(100), np.arange(300, 400)])
    strata = np.repeat([1, 2], [200, 200])
    keys = _keys(units=units, strata=strata)
    plan = SplitPlan.fit(keys, 1, 0.15, 0.15)
    split = plan.assign(keys.units, keys.files, keys.rows, keys.strata)
    assert not plan.stratified and plan.ids_span_classes
    for unit in range(100):
        assert len(set(split[units == unit])) == 1


def test_the_split_is_random_with_the_seed_and_not_by_order():
    split = _split(_keys(rows=np.arange(10000)), seed=3)
    # no block of consecutive rows is held out: each tenth holds about its share of test
    shares = [np.mean(part == "test") for part in np.array_split(split, 10)]
    assert max(abs(s - 0.15) for s in shares) < 0.04
    assert np.mean(_split(_keys(rows=np.arange(10000)), seed=4) != split) > 0.3


def test_the_same_rows_split_alike_from_one_file_or_many():
    one = _split(_keys(files=np.zeros(900), rows=np.arange(900)))
    files = np.repeat([0, 1, 2], [100, 500, 300])
    rows = np.concatenate([np.arange(100), np.arange(500), np.arange(300)])
    order = np.random.default_rng(0).permutation(900)  # blocks arrive in any order
    many = _split(_keys(files=files[order], rows=rows[order]))
    np.testing.assert_array_equal(many, one[order])


def test_unparsed_and_rejected_rows_take_no_share():
    usable = np.ones(1000, bool)
    usable[::10] = False
    rows = np.arange(1000)
    rows[::50] = -1  # lines that could not be parsed have no place
    split = _split(_keys(rows=rows, usable=usable & (rows >= 0)))
    kept = split[usable & (rows >= 0)]
    assert abs((kept == "test").sum() - len(kept) * 0.15) <= 1


def test_groups_never_straddle_and_rows_keep_their_shares():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, 6000)
    batch = {"patient": groups.astype(object)}
    split = _split(_keys(units=hash_values(batch, ["patient"])))
    for g in np.unique(groups):
        assert len(set(split[groups == g])) == 1
    largest = np.bincount(groups).max()
    assert abs((split == "test").sum() - 6000 * 0.15) <= largest


def test_values_hash_alike_however_a_reader_spells_them():
    batch = {"a": np.array([3, 3.0, "3", None, math.nan, ""], dtype=object)}
    hashed = hash_values(batch, ["a"])
    assert len(set(hashed[:3])) == 1 and len(set(hashed[3:])) == 1 and hashed[0] != hashed[3]


def test_ids_and_labels_read_alike_whatever_their_type():
    assert category(np.float32(3.0)) == category(np.int64(3)) == category("3") == "3"
    assert category(np.float32("nan")) is None and category(None) is None
    hashed = hash_values({"id": np.array([7, 7.0, "7", "b"], dtype=object)}, ["id"])
    assert hashed[0] == hashed[1] == hashed[2] != hashed[3]

"""collate returns exactly what collate_rowwise (the per-token reference) returns, on batches shaped like the training loop's.

distill/train.py collates ``shard.iter_batches(batch_format="numpy")``: Ray turns each Arrow column
into ``combine_chunks().to_numpy(zero_copy_only=False)``, i.e. object arrays of int32 arrays for
``input_ids`` and object arrays of object arrays of arrays for ``topk_ids`` / ``topk_logprobs``.
``numpy_batch`` mirrors that (checked against Ray's own conversion where Ray is installed); the
Arrow table itself is what ``batch_format="pyarrow"`` would give.
"""

import numpy as np
import pyarrow as pa
import pytest

from raydistill.data.collate import collate, collate_rowwise
from raydistill.data.signals import SIGNAL_SCHEMA

COLUMNS = ["input_ids", "target_start", "topk_ids", "topk_logprobs"]
SCHEMA = pa.schema([SIGNAL_SCHEMA.field(c) for c in COLUMNS])


def make_rows(rng, lengths, starts, k):
    """Signal rows: one top-k entry per position t >= target_start, as the teacher writes them."""
    return {
        "input_ids": [rng.integers(0, 50_000, n, dtype=np.int32) for n in lengths],
        "target_start": list(starts),
        "topk_ids": [rng.integers(0, 50_000, (n - s, k), dtype=np.int32).tolist() for n, s in zip(lengths, starts)],
        "topk_logprobs": [(-rng.exponential(2.0, (n - s, k))).astype(np.float32).tolist() for n, s in zip(lengths, starts)],
    }


def signal_table(rows) -> pa.Table:
    return pa.table({c: rows[c] for c in COLUMNS}, schema=SCHEMA)


def numpy_batch(table: pa.Table) -> dict:
    """What ``iter_batches(batch_format="numpy")`` yields (Ray's ArrowBlockAccessor.to_numpy)."""
    return {c: table[c].combine_chunks().to_numpy(zero_copy_only=False) for c in table.column_names}


def assert_same(old: dict, new: dict):
    assert list(new) == list(old)
    for key in old:
        assert new[key].dtype == old[key].dtype, key
        assert new[key].shape == old[key].shape, (key, new[key].shape, old[key].shape)
        assert np.array_equal(new[key], old[key]), key


def check(rows, max_seq_len, pad_id=0):
    """Both collations agree on the numpy batch, and the new one also on the Arrow batch (whole and sliced)."""
    table = signal_table(rows)
    old = collate_rowwise(numpy_batch(table), max_seq_len, pad_id)
    assert_same(old, collate(numpy_batch(table), max_seq_len, pad_id))
    assert_same(old, collate(table, max_seq_len, pad_id))
    # Ray's batches are often slices of a bigger block: Arrow offsets then do not start at 0.
    block = pa.concat_tables([signal_table(make_rows(np.random.default_rng(9), [7], [3], 2)), table]).combine_chunks()
    assert_same(old, collate(block.slice(1), max_seq_len, pad_id))
    assert_same(old, collate(numpy_batch(block.slice(1)), max_seq_len, pad_id))
    return old


def test_numpy_batch_mirrors_ray():
    ray_block = pytest.importorskip("ray.data._internal.arrow_block")
    table = signal_table(make_rows(np.random.default_rng(0), [5, 3], [2, 1], 4)).slice(1)
    ours, rays = numpy_batch(table), ray_block.ArrowBlockAccessor(table).to_numpy()
    assert rays["topk_ids"].dtype == object and rays["topk_ids"][0][0].dtype == np.int32
    for c in COLUMNS:
        assert len(ours[c]) == len(rays[c]) and all(np.array_equal(np.stack(a) if a.dtype == object else a, np.stack(b) if b.dtype == object else b) for a, b in zip(ours[c], rays[c]))


def test_ragged_batch():
    rng = np.random.default_rng(1)
    out = check(make_rows(rng, [12, 5, 30, 9], [4, 2, 17, 8], 8), max_seq_len=64)
    assert out["targets"].shape == (8 + 3 + 13 + 1,)


@pytest.mark.parametrize("max_seq_len", [8, 10, 12, 17, 18])
def test_truncation_drops_last_targets(max_seq_len):
    # Row 1's targets start at 12: some or all of them fall past max_seq_len.
    check(make_rows(np.random.default_rng(2), [20, 16, 6], [5, 12, 1], 4), max_seq_len=max_seq_len)


@pytest.mark.parametrize("start", [0, 1])
def test_target_start_0_and_1(start):
    # With target_start 0 the BOS position's entry exists but is never a target.
    out = check(make_rows(np.random.default_rng(3), [9, 4, 1], [start] * 3, 5), max_seq_len=32)
    assert out["targets"].shape == (8 + 3,)


@pytest.mark.parametrize("k", [1, 128])
def test_k_1_and_128(k):
    out = check(make_rows(np.random.default_rng(4), [11, 23], [3, 10], k), max_seq_len=20)
    assert out["topk_ids"].shape[1] == k


def test_rows_without_targets():
    rng = np.random.default_rng(5)
    # An empty response (target_start == len), a prompt longer than max_seq_len, a normal row.
    check(make_rows(rng, [6, 30, 10], [6, 25, 4], 3), max_seq_len=16)
    # No targets at all in the batch: collate returns [0, 1] top-k arrays whatever K is.
    out = check(make_rows(rng, [6, 3], [6, 3], 3), max_seq_len=16)
    assert out["topk_ids"].shape == (0, 1) and out["pred_pos"].shape == (0, 2)


def test_batch_of_one_row():
    check(make_rows(np.random.default_rng(6), [13], [7], 6), max_seq_len=32)
    check(make_rows(np.random.default_rng(6), [1], [1], 6), max_seq_len=32)


def test_pad_id_and_python_list_rows():
    rows = {
        "input_ids": [np.array([1, 10, 11, 20, 2]), np.array([1, 12, 30])],
        "target_start": np.array([3, 2]),
        "topk_ids": [[[20, 21], [2, 5]], [[30, 31]]],
        "topk_logprobs": [[[-0.1, -3.0], [-0.2, -2.5]], [[-0.3, -1.0]]],
    }
    for max_seq_len in (16, 4, 2):
        assert_same(collate_rowwise(rows, max_seq_len, 7), collate(rows, max_seq_len, 7))
    # Each row's top-k as one [L, K] array.
    rows2d = {**rows, "topk_ids": [np.array(r, np.int32) for r in rows["topk_ids"]], "topk_logprobs": [np.array(r, np.float32) for r in rows["topk_logprobs"]]}
    assert_same(collate_rowwise(rows2d, 16, 7), collate(rows2d, 16, 7))


def test_random_batches_match():
    rng = np.random.default_rng(1234)
    for _ in range(60):
        b = int(rng.integers(1, 9))
        lengths = rng.integers(1, 80, b)
        starts = [int(rng.integers(0, n + 1)) for n in lengths]
        k = int(rng.choice([1, 2, 8, 33]))
        check(make_rows(rng, lengths, starts, k), max_seq_len=int(rng.integers(8, 90)), pad_id=int(rng.integers(0, 3)))


def test_optional_per_position_column():
    rng = np.random.default_rng(7)
    rows = make_rows(rng, [14, 6, 25], [5, 6, 2], 4)
    rows["target_logprob"] = [(-rng.exponential(1.0, n - s)).astype(np.float32) for n, s in zip([14, 6, 25], [5, 6, 2])]
    table = pa.table({**{c: rows[c] for c in COLUMNS}, "target_logprob": rows["target_logprob"]}, schema=SCHEMA.append(pa.field("target_logprob", pa.list_(pa.float32()))))
    # Reference: collate the column as if it were a k = 1 top-k.
    as_topk = {**numpy_batch(table), "topk_logprobs": [[[x] for x in r] for r in rows["target_logprob"]]}
    want = collate_rowwise(as_topk, 20, 0)["topk_logprobs"][:, 0]
    for batch in (numpy_batch(table), table):
        got = collate(batch, 20, 0)["target_logprob"]
        assert got.dtype == np.float32 and np.array_equal(got, want)
    assert "target_logprob" not in collate(signal_table(rows), 20, 0)


def test_missing_positions_raise_like_collate():
    rows = make_rows(np.random.default_rng(8), [10, 8], [2, 3], 2)
    rows["topk_ids"][1] = rows["topk_ids"][1][:-1]
    rows["topk_logprobs"][1] = rows["topk_logprobs"][1][:-1]
    batch = numpy_batch(signal_table(rows))
    with pytest.raises(IndexError):
        collate_rowwise(batch, 32, 0)
    with pytest.raises(IndexError):
        collate(batch, 32, 0)
    # Cut before the missing position, both are fine.
    assert_same(collate_rowwise(batch, 7, 0), collate(batch, 7, 0))


def test_unread_positions_may_differ_in_width():
    # collate never reads the BOS position's entry (target_start 0) nor those cut by max_seq_len.
    rows = make_rows(np.random.default_rng(10), [6, 9], [0, 2], 3)
    rows["topk_ids"][0][0], rows["topk_logprobs"][0][0] = [], []
    rows["topk_ids"][1][-1], rows["topk_logprobs"][1][-1] = [1, 2], [-0.5, -1.5]
    check(rows, max_seq_len=8)
    for fn in (collate, collate):
        with pytest.raises(ValueError):
            fn(numpy_batch(signal_table(rows)), 9, 0)

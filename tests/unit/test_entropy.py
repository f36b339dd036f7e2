"""The coded layout of teacher signals (schema v7): entropy-coded ids, steps, tail and target, and its readers."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.data.entropy import TAIL_LOGIT_SCALE, decode_rows, encode_rows, learn_codec, tail_from_symbols, tail_symbols
from raydistill.data.signals import (CODED_COLUMN, CODED_STORED_SCHEMA, FULL_SIGNAL_SCHEMA, LOGPROB_SCALE, PARQUET_WRITE_ARGS, SIGNAL_SCHEMA,
                                     SignalMismatchError, decode_signals, encode_signals, learn_signal_codec, load_signals, signal_codec,
                                     write_signal_meta)


def _table(n_rows=12, k=8, vocab=300_000, seed=0, masked=False):
    """A FULL_SIGNAL_SCHEMA table over a large vocabulary with a skewed use of ids, and rows of 0..9 positions."""
    rng = np.random.default_rng(seed)
    common = rng.choice(vocab, 64, replace=False)
    rows = []
    for i in range(n_rows):
        n_pos = int(rng.integers(0, 10))
        ids, lps, target, actual = [], [], [], []
        for _ in range(n_pos):
            pool = np.concatenate([common, rng.choice(vocab, 16)])  # mostly common ids, some rare (and unseen) ones
            row_ids = rng.choice(np.unique(pool), k, replace=False)
            lp = np.sort(np.log(rng.dirichlet(np.ones(k + 30) * 0.3))[:k])[::-1]
            if masked:
                real = int(rng.integers(1, k + 1))
                row_ids[real:], lp[real:] = -1, -np.inf
            ids.append(row_ids.tolist())
            lps.append(lp.tolist())
            t = int(rng.integers(0, k + 1))  # k: the actual token is outside the top k
            actual.append(int(row_ids[t]) if t < k and row_ids[t] >= 0 else int(rng.integers(vocab)))
            target.append(float(lp[t]) if t < k and np.isfinite(lp[t]) else float(lp[0] - rng.uniform(0, 30)))
        rows.append({"id": f"r{i}", "split": "train", "input_ids": [1, 2] + actual, "target_start": 2, "topk_ids": ids,
                     "topk_logprobs": lps, "prompt": "p", "response": "r", "target_logprob": target})
    return pa.Table.from_pylist(rows).select(FULL_SIGNAL_SCHEMA.names).cast(FULL_SIGNAL_SCHEMA)


def _ragged(values, positions):
    ends = np.cumsum(positions)
    return [values[e - p:e].tolist() for p, e in zip(positions, ends)]


@pytest.mark.parametrize("k", [1, 2, 8, 128])
def test_rows_round_trip_exactly_with_unseen_ids_escaped_steps_and_missing_targets(k):
    rng = np.random.default_rng(k)
    positions = np.array([0, 5, 1, 9, 0, 3])
    n = int(positions.sum())
    ids = rng.integers(0, 1000, (n, k))
    ids[0, 0] = 262_143  # an id the models never saw, at the top of Gemma's vocabulary
    ids[1, -1] = 2**30 + 5  # larger than any vocabulary: still round-trips
    ids[2, -1] = -1  # a masked entry
    steps = rng.integers(0, 40, (n, k - 1)).astype(np.uint16)
    if k > 2:
        steps[0, 0], steps[1, 1], steps[2, -1] = 255, 65535, 254  # the escape value itself, a masked step, the last plain value
    log_tail = np.log(rng.uniform(1e-9, 0.9, n))
    target = rng.integers(0, 2000, n).astype(np.uint16)
    target[3] = 65535  # missing
    learned = learn_codec(ids[:6], steps[:6], log_tail[:6], target[:6])  # from part of the rows: the rest is partly unseen
    for with_target in (target, None):
        rows = decode_rows(encode_rows(ids, steps, log_tail, with_target, positions, learned), learned)
        assert rows.k == k and rows.positions.tolist() == positions.tolist()
        assert (rows.ids == ids).all() and (rows.steps == steps).all()
        assert rows.target_steps is None if with_target is None else (rows.target_steps == target).all()
        np.testing.assert_allclose(rows.log_tail, tail_from_symbols(tail_symbols(log_tail)))


def test_the_tail_keeps_both_masses_to_within_a_128th_of_themselves():
    log_tail = np.log(np.array([1e-30, 1e-7, 0.01, 0.5, 0.99, 1 - 1e-6]))
    back = tail_from_symbols(tail_symbols(log_tail))
    with np.errstate(divide="ignore"):
        for got, want in ((back, log_tail), (np.log(-np.expm1(back)), np.log(-np.expm1(log_tail)))):
            close = np.abs(got - want) <= 0.5 / TAIL_LOGIT_SCALE + 1e-9
            assert close[1:].all()  # below e^-64 the tail is stored as e^-64: nothing a loss can tell apart
    assert tail_from_symbols(tail_symbols(np.array([-np.inf])))[0] == pytest.approx(-64, abs=1e-6)


def test_the_coded_layout_decodes_like_the_parquet_layout():
    table = _table(seed=1)
    codec = learn_signal_codec(table.slice(0, 6))
    coded = encode_signals(table, codec=codec)
    assert coded.schema == CODED_STORED_SCHEMA and CODED_COLUMN in coded.column_names
    back, plain = decode_signals(coded, codec=codec), decode_signals(encode_signals(table))
    assert back.schema == FULL_SIGNAL_SCHEMA
    for col in ("id", "input_ids", "target_start", "topk_ids", "prompt", "response"):
        assert back[col].to_pylist() == table[col].to_pylist() == plain[col].to_pylist()
    for col in ("topk_logprobs", "target_logprob"):
        got, ref, exact = (np.concatenate([np.ravel(x) for x in t[col].to_pylist() if len(x)]) for t in (back, plain, table))
        # The same steps; the tail differs by its rounding (1/128 of a nat at most in the top-k mass), not by more.
        assert np.abs(got - ref).max() < 0.5 / TAIL_LOGIT_SCALE + 1e-3
        assert np.abs(got - exact).max() < 1 / LOGPROB_SCALE + 0.5 / TAIL_LOGIT_SCALE + 1e-3
    # A batch of sliced rows decodes to the same rows (Ray Data hands the readers slices).
    assert decode_signals(coded.slice(3, 5), codec=codec)["topk_ids"].to_pylist() == table.slice(3, 5)["topk_ids"].to_pylist()


def test_a_mixture_with_masked_entries_round_trips_in_the_coded_layout():
    table = _table(seed=2, masked=True)
    codec = learn_signal_codec(table)
    back = decode_signals(encode_signals(table, codec=codec), codec=codec)
    assert back["topk_ids"].to_pylist() == table["topk_ids"].to_pylist()
    got = np.concatenate([np.ravel(x) for x in back["topk_logprobs"].to_pylist() if len(x)])
    ids = np.concatenate([np.ravel(x) for x in table["topk_ids"].to_pylist() if len(x)])
    assert (np.exp(got[ids < 0]) == 0).all()


def test_a_table_without_targets_codes_and_reads_back_without_them():
    table = _table(seed=3).drop_columns(["target_logprob"]).cast(SIGNAL_SCHEMA)
    codec = learn_signal_codec(table)
    back = decode_signals(encode_signals(table, codec=codec), codec=codec)
    assert back.schema == SIGNAL_SCHEMA and back["topk_ids"].to_pylist() == table["topk_ids"].to_pylist()


def test_readers_decode_a_coded_directory_by_its_metadata(tmp_path):
    table = _table(n_rows=20, seed=4)
    codec = learn_signal_codec(table.slice(0, 8))
    write_signal_meta(tmp_path, {"logprob_scale": LOGPROB_SCALE, "signal_codec": codec.to_json()})
    for i in (0, 10):
        pq.write_table(encode_signals(table.slice(i, 10), codec=codec), tmp_path / f"part-{i}.parquet", **PARQUET_WRITE_ARGS)
    from raydistill.data.signals import read_signal_meta

    assert signal_codec(read_signal_meta(tmp_path)).digest == codec.digest
    assert load_signals(tmp_path).schema == SIGNAL_SCHEMA
    assert load_signals(tmp_path, ["topk_ids"])["topk_ids"].to_pylist() == table["topk_ids"].to_pylist()
    got = load_signals(tmp_path, ["id", "target_logprob"])
    assert got.column_names == ["id", "target_logprob"]
    for row, want in zip(got["target_logprob"].to_pylist(), table["target_logprob"].to_pylist()):
        np.testing.assert_allclose(row, want, atol=1 / LOGPROB_SCALE + 0.5 / TAIL_LOGIT_SCALE + 1e-3)
    assert load_signals(tmp_path, ids=["r3", "r15"])["id"].to_pylist() == ["r3", "r15"]
    # Coded shards with metadata that lost its models: a clear refusal, not garbage.
    write_signal_meta(tmp_path, {"logprob_scale": LOGPROB_SCALE})
    with pytest.raises(SignalMismatchError, match="signal_codec"):
        load_signals(tmp_path, ["topk_ids"])


def test_the_coded_layout_is_smaller_than_the_parquet_layout_on_a_skewed_vocabulary():
    """What the layout is for (the figures on Gemma 3 are in BENCHMARKS.md): fewer bytes for the same rows."""
    import io

    table = _table(n_rows=60, k=32, seed=5)
    codec = learn_signal_codec(table.slice(0, 30))

    def size(stored):
        buf = io.BytesIO()
        pq.write_table(stored, buf, **PARQUET_WRITE_ARGS)
        return buf.tell()

    assert size(encode_signals(table, codec=codec)) < 0.9 * size(encode_signals(table))

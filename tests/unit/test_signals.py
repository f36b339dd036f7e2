"""The signal schema helpers: flattening vLLM log-prob dicts, collation, the split, fingerprints."""

import numpy as np
import pyarrow as pa
import pytest

from raydistill.data.collate import collate
from raydistill.data.signals import SIGNAL_SCHEMA, SignalMismatchError, check_tokenizer_matches, stable_split, tokenizer_fingerprint, write_signal_meta
from raydistill.data.signals import LOGPROB_SCALE, decode_signals, encode_signals
from raydistill.spec import SamplingSpec, TeacherPassSpec
from raydistill.teacher.stage import needs_response_text, response_texts, sampling_params, to_signal_row, topk_from_logprob_dict


def _entry(pairs):
    return {tid: {"logprob": lp, "rank": rank, "decoded_token": "x"} for tid, lp, rank in pairs}


def test_topk_drops_the_extra_sampled_token():
    # vLLM adds the sampled token (id 9, rank 7) beyond the top 3.
    entry = _entry([(4, -0.5, 1), (9, -4.0, 7), (2, -1.5, 3), (7, -1.0, 2)])
    ids, lps = topk_from_logprob_dict(entry, 3)
    assert ids == [4, 7, 2] and lps == [-0.5, -1.0, -1.5]


def _vllm_row():
    return {
        "id": "a", "split": "train", "prompt": "hi", "generated_text": "yo", "source": "c.jsonl:1",
        "prompt_token_ids": [1, 10, 11],
        "generated_tokens": [20, 2],
        "logprobs": [_entry([(20, -0.1, 1), (21, -3.0, 2)]), _entry([(2, -0.2, 1), (5, -2.5, 2)])],
    }


def test_to_signal_row_and_schema():
    row = to_signal_row(_vllm_row(), 2, "generate")
    assert row["input_ids"] == [1, 10, 11, 20, 2] and row["target_start"] == 3
    assert len(row["topk_ids"]) == len(row["input_ids"]) - row["target_start"]
    table = pa.Table.from_pylist([row]).select(SIGNAL_SCHEMA.names).cast(SIGNAL_SCHEMA)
    assert table.schema == SIGNAL_SCHEMA


def test_engine_detokenizes_only_when_stop_strings_need_text():
    plain = sampling_params(TeacherPassSpec())
    assert plain["detokenize"] is False and needs_response_text(plain, "generate")
    stopped = sampling_params(TeacherPassSpec(sampling=SamplingSpec(stop=["\n\n"])))
    assert stopped["detokenize"] is True and not needs_response_text(stopped, "generate")
    scored = sampling_params(TeacherPassSpec(mode="score"))
    assert scored["detokenize"] is False and not needs_response_text(scored, "score")


def test_response_texts_decode_the_generated_ids_only():
    class Tok:
        def batch_decode(self, seqs, skip_special_tokens):
            assert skip_special_tokens
            return ["|".join(map(str, s)) for s in seqs]

    table = pa.table({"input_ids": [[1, 10, 11, 20, 2], [1, 5]], "target_start": [3, 2]})
    assert response_texts(table, Tok()) == ["20|2", ""]


def test_collate_aligns_logits_with_targets():
    rows = {
        "input_ids": [np.array([1, 10, 11, 20, 2]), np.array([1, 12, 30])],
        "target_start": np.array([3, 2]),
        "topk_ids": [[[20, 21], [2, 5]], [[30, 31]]],
        "topk_logprobs": [[[-0.1, -3.0], [-0.2, -2.5]], [[-0.3, -1.0]]],
    }
    b = collate(rows, max_seq_len=16, pad_id=0)
    assert b["input_ids"].shape == (2, 5) and b["attention_mask"].sum() == 8
    # Targets are the tokens at t >= target_start, predicted from position t - 1.
    assert b["targets"].tolist() == [20, 2, 30]
    assert b["pred_pos"].tolist() == [[0, 2], [0, 3], [1, 1]]
    assert b["topk_ids"][:, 0].tolist() == [20, 2, 30]
    # Truncation drops targets past max_seq_len.
    cut = collate(rows, max_seq_len=4, pad_id=0)
    assert cut["targets"].tolist() == [20, 30]


def test_stable_split_is_deterministic_and_proportional():
    ids = [f"row-{i}" for i in range(4000)]
    splits = [stable_split(i, 0.2) for i in ids]
    assert splits == [stable_split(i, 0.2) for i in ids]
    assert 0.17 < splits.count("eval") / len(ids) < 0.23
    assert all(stable_split(i, 0.0) == "train" for i in ids[:50])


class _Tok:
    def __init__(self, vocab, bos=1):
        self._vocab, self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id = vocab, bos, 2, 0, 3

    def get_vocab(self):
        return dict(self._vocab)


def test_fingerprint_and_mismatch_refused(tmp_path):
    a, b = _Tok({"a": 0, "b": 1}), _Tok({"a": 0, "c": 1})
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(_Tok({"b": 1, "a": 0}))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(_Tok({"a": 0, "b": 1}, bos=5))
    write_signal_meta(tmp_path, {"tokenizer_fingerprint": tokenizer_fingerprint(a)})
    assert check_tokenizer_matches(tmp_path, a)["tokenizer_fingerprint"] == tokenizer_fingerprint(a)
    with pytest.raises(SignalMismatchError, match="must use the teacher's tokenizer"):
        check_tokenizer_matches(tmp_path, b)


def _random_signal_table(n_rows=7, k=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        n_pos = int(rng.integers(0, 5))
        lps = [sorted(np.log(rng.dirichlet(np.ones(40) * 0.3))[:k].tolist(), reverse=True) for _ in range(n_pos)]
        rows.append({"id": f"r{i}", "split": "train", "input_ids": list(range(3 + n_pos)), "target_start": 3,
                     "topk_ids": [rng.choice(500, k, replace=False).tolist() for _ in range(n_pos)], "topk_logprobs": lps,
                     "prompt": "p", "response": "r"})
    return pa.Table.from_pylist(rows).cast(SIGNAL_SCHEMA)


def _folded(lps: list[list[float]]) -> np.ndarray:
    p = np.exp(np.asarray(lps, dtype=np.float64))
    return np.concatenate([p, 1.0 - p.sum(axis=1, keepdims=True)], axis=1)


@pytest.mark.parametrize("scale", [16, 64])
def test_encoding_round_trips_within_a_step_and_keeps_the_tail(scale):
    from raydistill.data.signals import STORED_SCHEMA

    table = _random_signal_table()
    stored = encode_signals(table, scale=scale)
    assert stored.schema == STORED_SCHEMA
    back = decode_signals(stored, scale=scale)
    assert back.schema == SIGNAL_SCHEMA
    for col in SIGNAL_SCHEMA.names:
        if col != "topk_logprobs":
            assert back[col].to_pylist() == table[col].to_pylist()
    for a, b in zip(back["topk_logprobs"].to_pylist(), table["topk_logprobs"].to_pylist()):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            # Offsets from the top-1 within half a step, plus one shared shift of at most half a step.
            np.testing.assert_allclose(x, y, atol=1.0 / scale + 1e-6)
        if a:
            # The tail (1 - top-k mass) survives to the half-float log's 0.6 % of itself.
            np.testing.assert_allclose(_folded(a)[:, -1], _folded(b)[:, -1], rtol=6e-3, atol=1e-6)


def test_encoding_keeps_a_tiny_tail_where_top_k_holds_nearly_everything():
    """A confident teacher: rounding alone would push the top-k sum past 1 and erase the tail."""
    lps = [[np.log(0.9), np.log(0.0999999)], [np.log(0.5), np.log(0.3)]]
    row = {"id": "a", "split": "train", "input_ids": [1, 2, 3], "target_start": 1, "topk_ids": [[5, 6], [7, 8]],
           "topk_logprobs": lps, "prompt": "p", "response": "r"}
    table = pa.Table.from_pylist([row]).cast(SIGNAL_SCHEMA)
    back = decode_signals(encode_signals(table, scale=16), scale=16)["topk_logprobs"].to_pylist()[0]
    P, Q = _folded(table["topk_logprobs"].to_pylist()[0]), _folded(back)  # both from float32 log-probs
    assert P[0, -1] == pytest.approx(1e-7, rel=0.1)
    # Decoded log-probs are float32 (~1e-8 absolute in probability), which bounds how exactly a 1e-7 tail
    # returns; a large tail returns to the half-float log's 0.6 %.
    assert Q[0, -1] == pytest.approx(P[0, -1], abs=3e-8) and Q[1, -1] == pytest.approx(0.2, rel=6e-3)
    kl = (P * np.log(P / Q)).sum(axis=1)
    assert (kl >= -1e-9).all() and kl.max() < 1e-3


def test_schema_v2_signals_still_decode():
    """Signals written before the tail was stored (exact top-1 + steps at scale 64) read back the same."""
    table = _random_signal_table(seed=5)
    outer_lists = table["topk_logprobs"].to_pylist()
    top1 = [[pos[0] for pos in row] for row in outer_lists]
    v3 = encode_signals(table, scale=64)
    v2 = v3.drop_columns(["tail_logprob"]).append_column("top1_logprob", pa.array(top1, pa.list_(pa.float32())))
    back = decode_signals(v2, scale=64)["topk_logprobs"].to_pylist()
    for a, b in zip(back, outer_lists):
        for x, y in zip(a, b):
            assert x[0] == pytest.approx(y[0], abs=1e-6)
            np.testing.assert_allclose(x, y, atol=0.5 / 64 + 1e-6)


def test_encoding_of_sliced_batches():
    """Ray hands stages slices of larger arrays; offsets must be rebased."""
    table = _random_signal_table(n_rows=12, seed=3)
    part = table.slice(5, 4)
    back = decode_signals(encode_signals(part))
    stored_slice = decode_signals(encode_signals(table).slice(5, 4))
    assert stored_slice["topk_logprobs"].to_pylist() == back["topk_logprobs"].to_pylist()
    assert back["topk_ids"].to_pylist() == part["topk_ids"].to_pylist()
    assert [len(x) for x in back["topk_logprobs"].to_pylist()] == [len(x) for x in part["topk_logprobs"].to_pylist()]


def test_id_codes_are_a_permutation_that_round_trips_unseen_ids():
    from raydistill.data.signals import codes_to_ids, ids_to_codes, learn_id_order

    rng = np.random.default_rng(0)
    seen = rng.integers(0, 5000, size=(40, 8))
    order = learn_id_order(seen)
    counts = {i: int((seen == i).sum()) for i in order}
    assert [counts[i] for i in order] == sorted(counts.values(), reverse=True)
    assert len(order) == len(set(order)) == len(np.unique(seen))
    ids = np.arange(6000)
    codes = ids_to_codes(ids, order)
    assert sorted(codes.tolist()) == ids.tolist()  # a bijection on [0, 6000): every id listed is below it
    assert codes[order].tolist() == list(range(len(order)))  # listed ids get the small codes, in order
    big = np.array([262143, 10**6, 0, 4999])
    assert codes_to_ids(ids_to_codes(big, order), order).tolist() == big.tolist()
    assert codes_to_ids(codes, order).tolist() == ids.tolist()
    assert ids_to_codes(ids, []).tolist() == ids.tolist()
    assert learn_id_order(seen, max_ids=3) == order[:3]


def test_encoding_with_an_id_order_stores_codes_and_decodes_the_ids(tmp_path):
    import pyarrow.parquet as pq

    from raydistill.data.signals import PARQUET_WRITE_ARGS, learn_id_order, load_signals, read_signal_meta

    table = _random_signal_table(n_rows=10, seed=7)
    order = learn_id_order(table.slice(0, 2)["topk_ids"])
    stored = encode_signals(table, id_order=order)
    assert stored["topk_ids"].to_pylist() != table["topk_ids"].to_pylist()
    pq.write_table(stored, tmp_path / "part-0.parquet", **PARQUET_WRITE_ARGS)
    meta = pq.ParquetFile(tmp_path / "part-0.parquet").metadata
    encodings = {meta.row_group(0).column(c).path_in_schema: meta.row_group(0).column(c).encodings for c in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["topk_ids.list.element.list.element"]
    write_signal_meta(tmp_path, {"logprob_scale": LOGPROB_SCALE, "topk_id_order": order})
    assert read_signal_meta(tmp_path)["topk_id_order"] == order
    back = load_signals(tmp_path)
    assert back["topk_ids"].to_pylist() == table["topk_ids"].to_pylist()
    assert load_signals(tmp_path, columns=["id", "topk_ids"])["topk_ids"].to_pylist() == table["topk_ids"].to_pylist()


def _v5_table(n_rows=8, k=6, seed=1):
    """A FULL_SIGNAL_SCHEMA table: target_logprob at every position, the actual token in the top k at some positions."""
    from raydistill.data.signals import FULL_SIGNAL_SCHEMA

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        n_pos = int(rng.integers(0, 6))
        lp = np.log(rng.dirichlet(np.ones(60) * 0.3))
        top = np.argsort(-lp)[:k]
        actual = rng.integers(0, 60, n_pos)
        rows.append({"id": f"r{i}", "split": "train", "input_ids": [1, 2] + actual.tolist(), "target_start": 2,
                     "topk_ids": [top.tolist()] * n_pos, "topk_logprobs": [lp[top].tolist()] * n_pos, "prompt": "p", "response": "r",
                     "target_logprob": lp[actual].tolist()})
    return pa.Table.from_pylist(rows).select(FULL_SIGNAL_SCHEMA.names).cast(FULL_SIGNAL_SCHEMA)


@pytest.mark.parametrize("scale", [16, 64])
def test_v5_target_logprob_round_trips_and_agrees_with_the_top_k(scale):
    from raydistill.data.signals import FULL_SIGNAL_SCHEMA, FULL_STORED_SCHEMA

    table = _v5_table()
    stored = encode_signals(table, scale=scale)
    assert stored.schema == FULL_STORED_SCHEMA
    back = decode_signals(stored, scale=scale)
    assert back.schema == FULL_SIGNAL_SCHEMA
    for row, orig in zip(back.to_pylist(), table.to_pylist()):
        assert len(row["target_logprob"]) == len(row["topk_ids"])
        for t, (ids_t, lps_t, lp) in enumerate(zip(row["topk_ids"], row["topk_logprobs"], row["target_logprob"])):
            # Within a step of the engine's value, as the top k are (half a step plus the shared shift).
            assert lp == pytest.approx(orig["target_logprob"][t], abs=1.0 / scale + 1e-5)
            actual = row["input_ids"][row["target_start"] + t]
            if actual in ids_t:  # the same value as the stored top-k entry, exactly
                assert lp == lps_t[ids_t.index(actual)]
    # Sliced batches (Ray's) decode the same.
    assert decode_signals(encode_signals(table.slice(2, 4), scale=scale), scale=scale)["target_logprob"].to_pylist() == back.slice(2, 4)["target_logprob"].to_pylist()


def test_v5_missing_and_minus_inf_target_logprobs():
    from raydistill.data.signals import FULL_SIGNAL_SCHEMA

    row = {"id": "a", "split": "train", "input_ids": [1, 5, 6, 7], "target_start": 1, "topk_ids": [[5, 6], [6, 5], [7, 5]],
           "topk_logprobs": [[-0.1, -3.0], [-0.2, -2.0], [-0.3, -1.5]], "prompt": "p", "response": "r", "target_logprob": [-0.1, float("nan"), float("-inf")]}
    table = pa.Table.from_pylist([row]).select(FULL_SIGNAL_SCHEMA.names).cast(FULL_SIGNAL_SCHEMA)
    back = decode_signals(encode_signals(table))["target_logprob"].to_pylist()[0]
    assert back[0] == pytest.approx(-0.1, abs=1 / LOGPROB_SCALE) and np.isnan(back[1]) and back[2] < -4000
    # A table built without the column's values (null lists) stores NaN, not garbage.
    nulls = pa.Table.from_pylist([{k: v for k, v in row.items() if k != "target_logprob"}], schema=FULL_SIGNAL_SCHEMA)
    assert all(np.isnan(decode_signals(encode_signals(nulls))["target_logprob"].to_pylist()[0]))


def test_readers_return_the_v4_columns_unless_target_logprob_is_asked_for_and_fill_it_for_old_versions(tmp_path):
    import json

    import pyarrow.parquet as pq

    from raydistill.data.signals import PARQUET_WRITE_ARGS, load_signals

    table = _v5_table(n_rows=10, seed=4)
    v5, v4 = tmp_path / "v5", tmp_path / "v4"
    for d, t, version in ((v5, table, 5), (v4, table.drop_columns(["target_logprob"]), 4)):
        d.mkdir()
        pq.write_table(encode_signals(t, target_bias=0), d / "part-0.parquet", **PARQUET_WRITE_ARGS)  # as v5 wrote them
        write_signal_meta(d, {"logprob_scale": LOGPROB_SCALE})
        meta = json.loads((d / "_signals.json").read_text())
        (d / "_signals.json").write_text(json.dumps({**meta, "schema_version": version}))
    for d in (v5, v4):
        assert load_signals(d).schema == SIGNAL_SCHEMA
    got5 = load_signals(v5, columns=["id", "target_logprob"])
    assert got5.column_names == ["id", "target_logprob"]
    got4 = load_signals(v4, columns=["target_logprob", "input_ids"]).to_pylist()
    full4 = load_signals(v4).to_pylist()
    for row, full, want in zip(got4, full4, got5["target_logprob"].to_pylist()):
        for t, lp in enumerate(row["target_logprob"]):
            ids_t, lps_t = full["topk_ids"][t], full["topk_logprobs"][t]
            actual = full["input_ids"][full["target_start"] + t]
            if actual in ids_t:  # v4 lacks the column; it is filled where the top k hold the actual token...
                assert lp == lps_t[ids_t.index(actual)] == want[t]
            else:  # ...and is NaN where they do not
                assert np.isnan(lp)
    assert any(np.isnan(x) for r in got4 for x in r["target_logprob"]) and any(not np.isnan(x) for r in got4 for x in r["target_logprob"])
    # The v5 shards read with no bias: the same values as the engine's, within a step.
    for row, orig in zip(got5["target_logprob"].to_pylist(), table["target_logprob"].to_pylist()):
        np.testing.assert_allclose(row, orig, atol=1 / LOGPROB_SCALE + 1e-5)


def test_a_target_above_the_stored_top1_keeps_its_value(tmp_path):
    """A mixture's exact target log-prob can exceed its top-k's top-1 (a teacher's mass on a token outside its
    own top k is left out of the top-k, not of the target). v5 clipped it to the top-1; v6 keeps it."""
    import pyarrow.parquet as pq

    from raydistill.data.signals import FULL_SIGNAL_SCHEMA, PARQUET_WRITE_ARGS, SCHEMA_VERSION, load_signals

    row = {"id": "a", "split": "train", "input_ids": [1, 5, 6, 7], "target_start": 1, "topk_ids": [[5, 6], [6, 5], [7, 5]],
           "topk_logprobs": [[-1.0, -3.0], [-0.2, -2.0], [-0.3, -1.5]], "prompt": "p", "response": "r",
           "target_logprob": [-0.84, -0.2, -9.0]}  # the first 0.16 nats above the top-1, as in a two-teacher run
    table = pa.Table.from_pylist([row]).select(FULL_SIGNAL_SCHEMA.names).cast(FULL_SIGNAL_SCHEMA)
    back = decode_signals(encode_signals(table))["target_logprob"].to_pylist()[0]
    np.testing.assert_allclose(back, row["target_logprob"], atol=1 / LOGPROB_SCALE)
    assert SCHEMA_VERSION >= 6
    pq.write_table(encode_signals(table), tmp_path / "part-0.parquet", **PARQUET_WRITE_ARGS)
    write_signal_meta(tmp_path, {"logprob_scale": LOGPROB_SCALE})  # the current version, as every writer stamps it
    np.testing.assert_allclose(load_signals(tmp_path, ["target_logprob"])["target_logprob"].to_pylist()[0], row["target_logprob"], atol=1 / LOGPROB_SCALE)


def test_masked_entries_of_a_mixture_round_trip_as_no_token():
    """Padding entries (id -1, log-prob -inf, after the real ones) keep their id, decode to probability 0, and leave
    the real entries, the tail and the learned id order as they would be without them."""
    from raydistill.data.signals import learn_id_order

    rng = np.random.default_rng(7)
    k, n_pos = 6, 40
    lp = np.log(rng.dirichlet(np.ones(200) * 0.2, n_pos))
    top = np.argsort(-lp, axis=1)[:, :k]
    top_lp = np.take_along_axis(lp, top, axis=1)
    real = rng.integers(2, k + 1, n_pos)  # 2..k real entries per position, the rest masked
    ids = np.where(np.arange(k) < real[:, None], top, -1)
    lps = np.where(np.arange(k) < real[:, None], top_lp, -np.inf)
    rows = [{"id": "r", "split": "train", "input_ids": [1] * (n_pos + 1), "target_start": 1, "topk_ids": ids.tolist(),
             "topk_logprobs": lps.tolist(), "prompt": "p", "response": "r"}]
    table = pa.Table.from_pylist(rows).select(SIGNAL_SCHEMA.names).cast(SIGNAL_SCHEMA)
    order = learn_id_order(table["topk_ids"])
    assert -1 not in order
    back = decode_signals(encode_signals(table, id_order=order), id_order=order)
    got_ids = np.array(back["topk_ids"].to_pylist()[0])
    got_lp = np.array(back["topk_logprobs"].to_pylist()[0], dtype=np.float64)
    assert (got_ids == ids).all()
    mask = ids < 0
    assert (np.exp(got_lp[mask]) == 0).all() and (got_lp[mask] <= -4000).all()
    # The real entries: within the quantization of the unmasked encoding, and the same top-k mass.
    unmasked = decode_signals(encode_signals(table.set_column(table.schema.get_field_index("topk_logprobs"), "topk_logprobs",
                                                                pa.array([np.where(mask, -50.0, lps).tolist()], SIGNAL_SCHEMA.field("topk_logprobs").type))))
    ref = np.array(unmasked["topk_logprobs"].to_pylist()[0], dtype=np.float64)
    assert np.abs(got_lp[~mask] - ref[~mask]).max() < 1e-3
    np.testing.assert_allclose(np.exp(got_lp).sum(axis=1), np.exp(np.where(mask, -np.inf, top_lp)).sum(axis=1), rtol=1e-2)

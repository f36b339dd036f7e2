"""On-policy distillation (GKD) inside training: which micro-batches are the student's own samples,
the rollouts and their scoring, the shards that record them, and the weight sync.

The driver (``start_pool``) starts one rollout engine (the student, ``RolloutEngine``) and a
fixed pool of teacher scorers (``TeacherScorer``, ``teacher.replicas.max`` of them) as Ray
actors that live for the whole training run. Every Ray Train worker holds their handles in an
``OnPolicySource``. Per optimizer step the phases run one after another, so that on a small CPU
machine they never fight over the cores: roll out, score, train, and every ``sync_every`` steps
sync the trained weights into the rollout engine. Each phase's seconds go into the step's
metrics.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raydistill.spec import OnPolicySpec, TeacherSpec

ROLLOUTS_META = "_rollouts.json"
PHASES = ("rollout_s", "score_s", "sync_s")


def on_policy_plan(seed: int, lmbda: float, step: int, n_micro: int) -> list[bool]:
    """Which of a step's ``n_micro`` micro-batches are built from rollouts: each with probability ``lmbda``.

    A function of (seed, step) only, so every rank draws the same plan (all ranks run the same
    kind of micro-batch together) and a resumed run draws the plan it would have drawn.
    """
    draws = np.random.default_rng([seed, step]).random(n_micro)
    return [bool(d < lmbda) for d in draws]


@dataclass
class OnPolicyPool:
    """Handles of the long-lived actors, and where rollouts are recorded. Travels to every worker."""

    spec: OnPolicySpec
    rollout: Any  # ray ActorHandle of RolloutEngine
    scorers: list  # ray ActorHandles of TeacherScorer
    shard_dir: str
    max_seq_len: int
    actors: list = field(default_factory=list)


def start_pool(on_policy: OnPolicySpec, teacher: TeacherSpec, teacher_engine_kwargs: dict, top_k: int, teacher_path: str,
               student_path: str, shard_dir: Path, max_seq_len: int, use_gpu: bool) -> OnPolicyPool:
    """Start the rollout engine (from ``student_path``, policy version 0) and the teacher scorers."""
    import ray

    from raydistill.onpolicy.rollout import RolloutEngine
    from raydistill.onpolicy.scorer import TeacherScorer

    shard_dir.mkdir(parents=True, exist_ok=True)
    env = {"env_vars": teacher.cpu_engine_env()}
    rollout = ray.remote(RolloutEngine).options(num_cpus=1, num_gpus=1 if use_gpu else 0, runtime_env=env).remote(
        student_path, dict(on_policy.engine_args), on_policy.seed)
    tp = int(teacher.engine_args.get("tensor_parallel_size", 1))
    scorers = [
        ray.remote(TeacherScorer).options(num_cpus=1, num_gpus=tp if teacher.use_gpu else 0, resources=dict(teacher.resources),
                                          runtime_env=env).remote(teacher_path, teacher_engine_kwargs, top_k)
        for _ in range(teacher.replicas.max)
    ]
    # Fail here, with the engine's own error, rather than inside the first training step.
    ray.get([rollout.__ray_ready__.remote()] + [s.__ray_ready__.remote() for s in scorers])
    return OnPolicyPool(on_policy, rollout, scorers, str(shard_dir), max_seq_len, actors=[rollout, *scorers])


def stop_pool(pool: OnPolicyPool | None) -> None:
    import ray

    for actor in (pool.actors if pool else []):
        ray.kill(actor)


def rollout_rows(prompts: dict[str, np.ndarray], rollouts: list[dict], scores: list[dict], step: int, micro: int, rank: int) -> dict[str, list]:
    """Signal rows (input_ids = prompt + response, targets from the response) of scored rollouts."""
    rows: dict[str, list] = {k: [] for k in ("id", "source_id", "split", "input_ids", "target_start", "topk_ids", "topk_logprobs",
                                             "target_logprob", "policy_version", "step")}
    for j, (pid, r, s) in enumerate(zip(prompts["id"], rollouts, scores)):
        rows["id"].append(f"s{step}-m{micro}-r{rank}-{j}")
        rows["source_id"].append(str(pid))
        rows["split"].append("on_policy")
        rows["input_ids"].append(np.asarray(list(r["prompt_ids"]) + list(r["response_ids"]), dtype=np.int64))
        rows["target_start"].append(len(r["prompt_ids"]))
        rows["topk_ids"].append(s["topk_ids"])
        rows["topk_logprobs"].append(s["topk_logprobs"])
        rows["target_logprob"].append(s["target_logprob"])
        rows["policy_version"].append(int(r["policy_version"]))
        rows["step"].append(step)
    return rows


def write_shard(shard_dir: str, rows: dict[str, list], name: str, tokenizer=None) -> None:
    """One Parquet shard of rollouts: the signals' columns (decoded) plus target_logprob, policy_version, step."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydistill.fileio import write_atomic

    prompts = [tokenizer.decode(ids[:start]) if tokenizer else "" for ids, start in zip(rows["input_ids"], rows["target_start"])]
    responses = [tokenizer.decode(ids[start:]) if tokenizer else "" for ids, start in zip(rows["input_ids"], rows["target_start"])]
    table = pa.table({
        "id": pa.array(rows["id"], pa.string()),
        "source_id": pa.array(rows["source_id"], pa.string()),
        "split": pa.array(rows["split"], pa.string()),
        "input_ids": pa.array([list(map(int, x)) for x in rows["input_ids"]], pa.list_(pa.int32())),
        "target_start": pa.array(rows["target_start"], pa.int32()),
        "topk_ids": pa.array(rows["topk_ids"], pa.list_(pa.list_(pa.int32()))),
        "topk_logprobs": pa.array(rows["topk_logprobs"], pa.list_(pa.list_(pa.float32()))),
        "target_logprob": pa.array(rows["target_logprob"], pa.list_(pa.float32())),
        "prompt": pa.array(prompts, pa.string()),
        "response": pa.array(responses, pa.string()),
        "policy_version": pa.array(rows["policy_version"], pa.int32()),
        "step": pa.array(rows["step"], pa.int32()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_atomic(Path(shard_dir) / f"{name}.parquet", buf.getvalue())


def load_rollouts(shard_dir: str | Path):
    """Every recorded rollout of a run (``RUN/signals/on_policy``) as one Arrow table."""
    import pyarrow.dataset as pads

    files = sorted(str(f) for f in Path(shard_dir).glob("*.parquet"))
    return pads.dataset(files, format="parquet").to_table() if files else None


class OnPolicySource:
    """A worker's side of on-policy training: builds rollout micro-batches and syncs weights."""

    def __init__(self, pool: OnPolicyPool, prompt_shard, micro_batch_size: int, rank: int, pad_id: int, tokenizer=None):
        self.pool, self.rank, self.pad_id, self.tokenizer = pool, rank, pad_id, tokenizer
        self.prompts = _cycle(prompt_shard, micro_batch_size)
        self.version = 0
        self.phase = dict.fromkeys(PHASES, 0.0)

    def take_phase_times(self) -> dict[str, float]:
        out, self.phase = self.phase, dict.fromkeys(PHASES, 0.0)
        return out

    def micro_batch(self, step: int, micro: int) -> tuple[dict[str, np.ndarray], dict]:
        """A collated micro-batch of fresh rollouts on the next prompts, scored by the teacher; and its summary."""
        import ray

        from raydistill.data.collate import collate

        spec = self.pool.spec
        prompts = next(self.prompts)
        keep = max(1, self.pool.max_seq_len - spec.max_tokens)
        prompt_ids = [list(map(int, ids[: max(int(start), 1)]))[:keep] for ids, start in zip(prompts["input_ids"], prompts["target_start"])]
        t0 = time.perf_counter()
        seed = int(np.random.default_rng([spec.seed, step, micro, self.rank]).integers(2**31))
        rollouts = ray.get(self.pool.rollout.generate.remote(prompt_ids, spec.max_tokens, spec.temperature, seed))
        t1 = time.perf_counter()
        scorers = self.pool.scorers
        parts = [rollouts[i::len(scorers)] for i in range(len(scorers))]
        scored_parts = ray.get([s.score.remote(p) for s, p in zip(scorers, parts) if p])
        scores: list = [None] * len(rollouts)
        for i, part in enumerate(scored_parts):
            scores[i::len(scorers)] = part
        t2 = time.perf_counter()
        self.phase["rollout_s"] += t1 - t0
        self.phase["score_s"] += t2 - t1
        rows = rollout_rows(prompts, rollouts, scores, step, micro, self.rank)
        write_shard(self.pool.shard_dir, rows, f"step{step:06d}-m{micro}-r{self.rank}", self.tokenizer)
        batch = collate({k: rows[k] for k in ("input_ids", "target_start", "topk_ids", "topk_logprobs", "target_logprob")},
                        self.pool.max_seq_len, self.pad_id)
        versions = rows["policy_version"]
        return batch, {"rollouts": len(versions), "policy_version": min(versions), "response_tokens": sum(len(r["response_ids"]) for r in rollouts)}

    def sync(self, engine, version: int) -> None:
        """Put the trainer's current weights into the rollout engine as ``version`` (a collective under ZeRO-3)."""
        import ray
        import torch.distributed as dist

        t0 = time.perf_counter()
        state = full_state_dict(engine, self.rank)
        if self.rank == 0:
            # The tensors travel through Ray's object store: no shared path between the nodes is assumed.
            ray.get(self.pool.rollout.load_weights.remote(state, version))
        dist.barrier()  # no rank may roll out before the engine holds this version
        self.version = version
        self.phase["sync_s"] += time.perf_counter() - t0


def full_state_dict(engine, rank: int) -> dict | None:
    """Rank 0 gets the student's trainable weights, full and float32 on CPU; other ranks None. Under ZeRO-3 all ranks gather.

    Only parameters that train are sent: a frozen one (``student.freeze_embeddings``) still holds the
    value the rollout engine started from (``student_path``, which the trainer loaded too). On the
    Gemma 3 270M student that leaves the 262k-row embedding (671 MB in float32, of 1.07 GB) out of
    every sync, and the engine keeps its packed LM head instead of rebuilding it. A tied LM head is
    one parameter with the embedding (``named_parameters`` lists it once, under the embedding's
    name), so the largest tensor of a big-vocabulary student travels at most once.
    """
    import torch

    model = engine.module
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def copy() -> dict:
        return {name: p.detach().to("cpu", torch.float32).clone() for name, p in params.items()}

    if engine.zero_optimization_stage() == 3:
        import deepspeed

        # Gathers the partitioned parameters for the duration of the block (a collective).
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return copy() if rank == 0 else None
    return copy() if rank == 0 else None


def _list_lengths(column) -> list[int]:
    import pyarrow.compute as pc

    return pc.list_value_length(column).to_pylist()


def _cycle(shard, batch_size: int):
    while True:
        for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            yield rows


def summarize(history: list[dict], shard_dir: Path, sync_every: int) -> dict:
    """The train stage's on-policy outputs, for the manifest: rollouts, policy versions, staleness, phase times."""
    from raydistill.fileio import write_atomic

    on = [h for h in history if h.get("rollouts")]
    phases = {p: round(sum(h.get(p, 0.0) for h in history), 3) for p in PHASES + ("train_s",)}
    # Counted from the shards, which hold every rank's rollouts (the history is rank 0's).
    table = load_rollouts(shard_dir)
    versions = table["policy_version"].to_pylist() if table is not None else []
    steps = table["step"].to_pylist() if table is not None else []
    tokens = 0
    if table is not None:
        lengths = np.asarray(_list_lengths(table["input_ids"]))
        tokens = int((lengths - np.asarray(table["target_start"].to_pylist())).sum())
    syncs = max(0, (len(history) - 1) // sync_every)  # after every sync_every-th step but the last
    out = {
        "rollout_dir": str(shard_dir),
        "rollouts": len(versions),
        "on_policy_steps": len(on),
        "policy_versions": sorted(set(versions)),
        "max_staleness": max((s - 1 - v for s, v in zip(steps, versions)), default=0),
        "sync_every": sync_every,
        "phase_seconds": phases,
        "response_tokens": tokens,
        # Phase seconds are rank 0's wall time; every rank rolls out and scores in the same phase.
        "rollout_tokens_per_s": tokens / phases["rollout_s"] if phases["rollout_s"] else None,
        "score_tokens_per_s": tokens / phases["score_s"] if phases["score_s"] else None,
        "sync_s_per_sync": phases["sync_s"] / syncs if syncs else None,
    }
    shard_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(shard_dir / ROLLOUTS_META, json.dumps(out, indent=2))
    return out

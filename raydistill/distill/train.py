"""Train stage: Ray Train ``TorchTrainer`` workers running a DeepSpeed engine on teacher signals.

The driver side (``run_train_stage``) prepares the student, writes the DeepSpeed config and
builds the trainer; ``train_loop_per_worker`` is what each worker runs. Workers receive only
the typed sub-specs they need (``TrainSpec``, ``DistillSpec``).

Checkpoints: every ``train.checkpoint_every`` steps each rank saves its part of a DeepSpeed
checkpoint into a local temp dir and reports it; Ray Train merges the ranks' directories into
one ``RUN/checkpoints/train/checkpoint_*`` (the multi-worker pattern of its distributed
checkpointing guide). After a worker dies, Ray Train restarts the group (``max_failures``) and
``ray.train.get_checkpoint()`` hands back the latest one; a re-run of an interrupted job finds
the same storage and resumes from it too. The last checkpoint also holds the HF export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydistill.distill.dsconfig import deepspeed_config, uses_client_optimizer
from raydistill.distill.export import EXPORT_DIR, EXPORT_METRICS_FILE, REFERENCE_LOGITS_FILE, export_hf, export_student, reference_logits
from raydistill.spec import DistillSpec, StudentSpec, TeacherPassSpec, TeacherSpec, TrainSpec
from raydistill.fileio import write_atomic
from raydistill.jobs.rundir import RunDir

DS_TAG = "ds"


@dataclass(frozen=True)
class TrainInputs:
    """Everything a worker needs besides its dataset shard."""

    train: TrainSpec
    distill: DistillSpec
    student_path: str
    total_steps: int
    ds_config: dict
    freeze_embeddings: bool = False
    # Local directory for the live progress log and TensorBoard, or None.
    log_dir: str | None = None
    # The rollout engine and teacher scorers of distill.mode 'on_policy' (raydistill.onpolicy.loop).
    on_policy: Any = None
    # The MLflow run rank 0 logs each step to (raydistill.jobs.tracking.TrackedRun), or None, and the metrics' name prefix.
    tracking: Any = None
    tracking_prefix: str = "train/"


def total_steps(train: TrainSpec, n_train_rows: int) -> int:
    """Optimizer steps for the run: ``max_steps``, or enough for ``epochs`` passes over each shard."""
    if train.max_steps is not None:
        return train.max_steps
    rows_per_worker = n_train_rows // train.workers
    micro_per_epoch = -(-rows_per_worker // train.micro_batch_size)
    return max(1, train.epochs * micro_per_epoch // train.grad_accum)


def _micro_batches(shard, train: TrainSpec, pad_id: int, skip: int = 0):
    """Collated micro-batches, cycling over the shard for as many epochs as the step count needs.

    Every rank draws exactly ``total_steps * grad_accum`` micro-batches, so all ranks agree on the
    number of collective steps even when shards end at different batch boundaries. The first
    ``skip`` micro-batches (consumed before a resume) are drawn and dropped uncollated.
    """
    from raydistill.data.collate import collate

    while True:
        # Arrow batches: collate reads their offsets and flat buffers directly; the numpy format
        # would first build one array per position (benchmarks/collate.py).
        for rows in shard.iter_batches(batch_size=train.micro_batch_size, batch_format="pyarrow"):
            if skip:
                skip -= 1
                continue
            yield collate(rows, train.max_seq_len, pad_id)


def offline_micro_batches_before(step: int, distill: DistillSpec, grad_accum: int) -> int:
    """How many offline micro-batches steps 1..``step`` drew (all of them, unless on-policy ones replaced some)."""
    if distill.mode != "on_policy":
        return step * grad_accum
    from raydistill.onpolicy.loop import on_policy_plan

    op = distill.on_policy
    return sum(not on for s in range(1, step + 1) for on in on_policy_plan(op.seed, op.lmbda, s, grad_accum))


def _to_tensors(batch: dict, device):
    import torch

    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}


def build_model(inputs: TrainInputs):
    import torch
    from transformers import AutoModelForCausalLM

    from raydistill.distill.init import freeze_embeddings

    model = AutoModelForCausalLM.from_pretrained(inputs.student_path, dtype=torch.float32)
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        # The chunked loss applies the LM head itself and would silently skip the softcap.
        raise NotImplementedError(f"{inputs.student_path}: final_logit_softcapping is not supported by the chunked loss")
    model.config.use_cache = False
    if inputs.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if inputs.freeze_embeddings:
        freeze_embeddings(model)
    return model


def build_engine(model, inputs: TrainInputs):
    import deepspeed
    import torch

    optimizer = None
    if uses_client_optimizer(inputs.ds_config):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=inputs.train.lr, weight_decay=inputs.train.weight_decay)
    # Every rank loads the full model before DeepSpeed partitions it; for students too large for
    # one host's memory, deepspeed.zero.Init would be needed at load time.
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None if optimizer else [p for p in model.parameters() if p.requires_grad],
        config=inputs.ds_config,
        dist_init_required=False,
    )
    engine.train()
    if engine.lr_scheduler is not None:
        # DeepSpeed's warmup schedulers set the minimum lr at construction and return it again
        # on their first step(), so two optimizer steps would run at lr 0; advance once so step
        # n runs at iteration n-1. A resumed run overwrites this with the checkpoint's state.
        engine.lr_scheduler.step()
    return engine


# Train settings that change how training runs, not what it computes: a checkpoint made with
# other values of these is still this run's.
_RUNTIME_TRAIN_KEYS = ("checkpoint_every", "checkpoints_to_keep", "max_failures", "tensorboard")
CHECKPOINT_META = "raydistill_checkpoint.json"


def checkpoint_identity(inputs: "TrainInputs") -> dict:
    """What a checkpoint must have been made with to be resumed from: the student, the losses, the schedule."""
    train = {k: v for k, v in inputs.train.model_dump(mode="json").items() if k not in _RUNTIME_TRAIN_KEYS}
    return {"student_init": inputs.student_path, "total_steps": inputs.total_steps, "train": train,
            "distill": inputs.distill.model_dump(mode="json"), "freeze_embeddings": inputs.freeze_embeddings}


def check_checkpoint(meta: dict | None, inputs: "TrainInputs", where: str) -> None:
    """Refuse a checkpoint of another student or spec (Ray Train hands back whatever its storage holds)."""
    mine = checkpoint_identity(inputs)
    theirs = (meta or {}).get("identity")
    if theirs == mine:
        return
    if theirs is None:
        why = "it records no identity (made by an older raydistill)"
    else:
        keys = sorted(k for k in mine if theirs.get(k) != mine[k])
        sub = [f"{k}.{s}" for k in ("train", "distill") if k in keys for s in sorted(set(mine[k]) | set(theirs.get(k) or {}))
               if (theirs.get(k) or {}).get(s) != mine[k].get(s)]
        why = "it was made with other " + ", ".join(sub + [k for k in keys if k not in ("train", "distill")])
    raise RuntimeError(f"the checkpoint in {where} is not this run's: {why}. Delete that checkpoints directory to train from the start.")


def restore(engine, inputs: "TrainInputs") -> tuple[int, list[dict]]:
    """Load the latest reported checkpoint, if any, after checking it is this run's. Returns (completed steps, metric history)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        meta_file = Path(d) / CHECKPOINT_META
        check_checkpoint(json.loads(meta_file.read_text()) if meta_file.exists() else None, inputs, checkpoint.path)
        path, client = engine.load_checkpoint(d, tag=DS_TAG)
    if path is None:
        raise RuntimeError(f"checkpoint {checkpoint.path} holds no DeepSpeed state")
    return int(client["step"]), list(client["history"])


def _zero3_extra_chunks(micro: list[dict], chunk_tokens: int, device) -> list[int]:
    """Per micro-batch, how many loss chunks this rank holds fewer than the rank with the most (one all_reduce).

    Must run before the first LM-head call of the step: under ZeRO-3 every LM-head call is
    itself a collective (see ``_zero3_balance_chunks``), so a rank that asks for this count only
    after its own chunks meets the other rank's next LM-head all-gather with an all_reduce, and
    both wait forever. That was the ZeRO-3 hang: whenever the ranks' target counts fell into
    different numbers of chunks (in the integration test first at step 3, after the step-2
    checkpoint, which was a coincidence), the rank with fewer chunks entered this all_reduce
    while the other was still gathering the LM head for its last chunk.
    """
    import torch
    import torch.distributed as dist

    mine = torch.tensor([-(-m["targets"].shape[0] // chunk_tokens) for m in micro], device=device)
    most = mine.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return [int(c) for c in (most - mine).tolist()]


def _zero3_balance_chunks(lm_head, n_extra: int, like: dict, distill: DistillSpec, device):
    """A zero-valued loss term that runs the LM head ``n_extra`` more times, each exactly like a real chunk.

    Under ZeRO-3 every call of a module can gather its parameters, and its backward reduces and
    releases them: collectives. Training never calls the root module (whose forward would
    complete DeepSpeed's parameter trace), so the trace stays invalid and DeepSpeed releases
    even persistent parameters after each call: every LM-head call is an all-gather, in the
    forward, in the checkpoint recompute and in the backward. Ranks hold different numbers of
    target tokens, hence different numbers of loss chunks, so the rank with fewer must call the
    head as often as the one with the most, or the collectives mismatch and gloo/NCCL hang or
    abort.

    The extra calls must also gather exactly as a real chunk does, so they run through the very
    same checkpointed chunk function (``chunked_distill_loss_sums``, one padding row per chunk)
    on an input that requires grad. A simpler dummy (``lm_head(h).sum()`` on a constant input)
    gathers once fewer in backward: its sum needs no saved tensor, so DeepSpeed's pre-backward
    hook gathers the head before the recompute instead of after the recompute released it, and
    the ranks fall out of step; with an input that needs no grad the post-backward release
    never runs at all.
    """
    import torch

    from raydistill.distill.losses import chunked_distill_loss_sums, loss_params

    if n_extra <= 0:
        return torch.zeros((), device=device)
    k = like["topk_ids"].shape[-1]
    hidden = torch.zeros(n_extra, lm_head.in_features, device=device, dtype=lm_head.weight.dtype, requires_grad=True)
    total, _, _ = chunked_distill_loss_sums(
        hidden,
        lm_head,
        torch.zeros(n_extra, dtype=torch.int64, device=device),
        torch.arange(k, device=device).expand(n_extra, k),
        torch.full((n_extra, k), -float(torch.log(torch.tensor(k + 1.0))), device=device),
        loss=distill.loss,
        ce_weight=distill.ce_weight,
        temperature=distill.temperature,
        chunk_tokens=1,
        loss_params=loss_params(distill),
        always_recompute=True,
    )
    # The padding rows' losses are finite, so times 0 they add exactly 0 to the loss and the grads.
    return 0.0 * total


def _zero3_frozen_head(lm_head) -> bool:
    """Whether the ZeRO-3 loss gathers the LM head itself: a plain ``nn.Linear`` head without trainable
    parameters, i.e. one tied to frozen embeddings (``student.freeze_embeddings``).

    The checkpointed per-chunk loss cannot use such a head: its backward failed with a
    CheckpointError (the head weight recomputed with shape [0]). DeepSpeed keeps a frozen
    parameter gathered through a checkpoint recompute only by charging it to the module whose
    backward is running (``in_checkpoint_recompute`` in ``PartitionedParameterCoordinator
    ._fetch_sub_module_impl``). Our recompute is started by the loss's own saved tensors, before
    the head's pre-backward hook, so there is none, and the head's post-forward hook partitions the
    weight at once (persistent or not: our trace never completes). A trainable weight survives
    that only because ``torch.utils.checkpoint`` keeps a detached alias of a recomputed tensor that
    requires grad, but keeps a frozen one as itself: the parameter that was just emptied.

    Such a head is instead gathered once per micro-batch around the fused loss, which takes the
    gradient with respect to the hidden states in the forward pass and needs nothing of the head
    in backward. Every rank then gathers the head exactly once per micro-batch whatever its token
    count, so no chunk balancing is needed either, and the arithmetic is ZeRO-0's fused path.
    """
    import torch

    return type(lm_head) is torch.nn.Linear and not any(p.requires_grad for p in lm_head.parameters())


def train_step(engine, micro: list[dict], distill: DistillSpec, chunk_tokens: int, world: int):
    """One optimizer step over ``grad_accum`` micro-batches.

    Returns (loss, kd, ce, global target tokens, grad norm before clipping or None).
    """
    import deepspeed
    import torch
    import torch.distributed as dist

    from raydistill.distill.losses import chunked_distill_loss_sums, loss_params

    device = micro[0]["targets"].device
    # The one normalization: the mean over every target token of the global batch (all ranks,
    # all accumulated micro-batches). DeepSpeed divides gradients by world * grad_accum, so
    # each micro-batch's token sum is scaled back by that factor over the global count.
    count = torch.tensor(float(sum(m["targets"].numel() for m in micro)), device=device)
    dist.all_reduce(count)
    scale = world * len(micro) / count.clamp_min(1.0)
    sums = torch.zeros(3, device=device)
    model = engine.module
    grad_norm = None
    zero3 = engine.zero_optimization_stage() == 3
    head = model.get_output_embeddings()
    # A frozen head is gathered around the loss, once per micro-batch (see _zero3_frozen_head);
    # every other ZeRO-3 head is a collective per chunk.
    gather_head = zero3 and _zero3_frozen_head(head)
    per_chunk = zero3 and not gather_head
    # Under ZeRO-3 the chunk counts are agreed before any LM-head call (see _zero3_extra_chunks).
    extra_chunks = _zero3_extra_chunks(micro, chunk_tokens, device) if per_chunk else None
    for i, m in enumerate(micro):
        hidden = model.base_model(input_ids=m["input_ids"], attention_mask=m["attention_mask"]).last_hidden_state
        pos = m["pred_pos"]
        with deepspeed.zero.GatheredParameters(list(head.parameters()), enabled=gather_head):
            total, kd, ce = chunked_distill_loss_sums(
                hidden[pos[:, 0], pos[:, 1]],
                head,
                m["targets"],
                m["topk_ids"],
                m["topk_logprobs"],
                loss=distill.loss,
                ce_weight=distill.ce_weight,
                temperature=distill.temperature,
                chunk_tokens=chunk_tokens,
                loss_params=loss_params(distill),
                always_recompute=per_chunk,
                target_logprob=m.get("target_logprob"),
                always_fuse=gather_head,
            )
        if per_chunk:
            total = total + _zero3_balance_chunks(head, extra_chunks[i], m, distill, device)
        if zero3:
            # A micro-batch without target tokens leaves the loss with no path back through the
            # base model, whose ZeRO-3 backward hooks are collectives too; a zero term keeps one.
            total = total + 0.0 * hidden.sum()
        engine.backward(total * scale)
        if i == len(micro) - 1 and engine.zero_optimization_stage() == 0:
            # Without ZeRO, DeepSpeed clips with torch and keeps no norm; the gradients are
            # already all-reduced after the boundary backward, so every rank sees the global norm.
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        engine.step()
        sums += torch.stack([total.detach(), kd.detach(), ce.detach()])
    dist.all_reduce(sums)
    loss, kd, ce = (sums / count.clamp_min(1.0)).tolist()
    if grad_norm is None and engine.get_global_grad_norm() is not None:
        grad_norm = float(engine.get_global_grad_norm())
    return loss, kd, ce, int(count.item()), grad_norm


class MetricsLog:
    """Rank 0's per-step output: console, the live ``progress.jsonl``, optional TensorBoard and optional MLflow.

    ``progress.jsonl`` is append-only across restarts (a resumed attempt repeats the steps after
    its checkpoint, marked by a ``resumed_from`` event). ``metrics.jsonl`` holds the final
    history, one record per optimizer step, and is written by the driver at the end.
    """

    def __init__(self, rank: int, log_dir: str | None, tensorboard: bool, total: int, tracking=None, tracking_prefix: str = "train/"):
        self.active = rank == 0
        self.total = total
        self.progress = None
        self.tb = None
        self.mlflow = None
        if self.active and tracking is not None:
            from raydistill.jobs.tracking import StepLogger

            self.mlflow = StepLogger(tracking, tracking_prefix)
        if self.active and log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self.progress = open(Path(log_dir) / "progress.jsonl", "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(log_dir) / "tensorboard"))

    def event(self, record: dict) -> None:
        if self.progress:
            self.progress.write(json.dumps(record) + "\n")
            self.progress.flush()

    def step(self, record: dict) -> None:
        if not self.active:
            return
        self.event(record)
        if self.tb:
            for key in ("loss", "kd", "ce", "tokens_per_s", "lr", "grad_norm"):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}", record[key], record["step"])
            self.tb.flush()
        if self.mlflow:
            self.mlflow.step(record)
        gn = record["grad_norm"]
        phases = ""
        if "train_s" in record:  # on-policy: the seconds of each phase of this step
            phases = (f" | {record['rollouts']} rollouts (policy v{record['policy_version']})" if record["rollouts"] else " | offline") + \
                "".join(f" {p[:-2]} {record[p]:.1f}s" for p in ("rollout_s", "score_s", "train_s", "sync_s"))
        # Written, not print()ed: Ray Train patches print() in its workers to log each line as well as
        # print it, and with log_to_driver the step then reached the console twice (once from stdout, once
        # from the root logger's stderr handler). The driver's progress line reads progress.jsonl instead.
        sys.stdout.write(
            f"[train] step {record['step']}/{self.total} loss {record['loss']:.4f} (kd {record['kd']:.4f}, ce {record['ce']:.4f}) "
            f"lr {record['lr']:.2e} grad_norm {'-' if gn is None else f'{gn:.3f}'} {record['tokens_per_s']:.0f} tok/s{phases}\n"
        )
        sys.stdout.flush()

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        if self.tb:
            self.tb.close()


def save_checkpoint(engine, step: int, history: list[dict], inputs: TrainInputs, rank: int, final: bool, tokenizer) -> None:
    """Every rank saves its part of the DeepSpeed state (plus, when ``final``, the HF export) and reports it."""
    import ray.train
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step, "history": history})
        if final:
            ids, logits = reference_logits(engine, inputs.train.seed)
            export_hf(engine, tokenizer, inputs.train.zero_stage, rank, os.path.join(tmp, EXPORT_DIR))
        if rank == 0:
            # The checkpoint explains itself: which settings produced it.
            meta = {"step": step, "total_steps": inputs.total_steps, "train": inputs.train.model_dump(mode="json"),
                    "distill": inputs.distill.model_dump(mode="json"), "student_init": inputs.student_path,
                    "identity": checkpoint_identity(inputs)}
            Path(tmp, CHECKPOINT_META).write_text(json.dumps(meta, indent=2))
            if final:
                torch.save({"input_ids": ids, "logits": logits}, os.path.join(tmp, REFERENCE_LOGITS_FILE))
                Path(tmp, EXPORT_METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
        ray.train.report(history[-1] if history else {"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _step_micro_batches(step: int, batches, source, distill: DistillSpec, grad_accum: int) -> tuple[list[dict], dict | None]:
    """A step's micro-batches: offline ones from the signals, on-policy ones (per the seeded plan) from rollouts."""
    if source is None:
        return [next(batches) for _ in range(grad_accum)], None
    from raydistill.onpolicy.loop import on_policy_plan

    op = distill.on_policy
    micro, info = [], {"rollouts": 0, "policy_version": None, "response_tokens": 0}
    for i, on in enumerate(on_policy_plan(op.seed, op.lmbda, step, grad_accum)):
        if not on:
            micro.append(next(batches))
            continue
        batch, got = source.micro_batch(step, i)
        micro.append(batch)
        info["rollouts"] += got["rollouts"]
        info["response_tokens"] += got["response_tokens"]
        info["policy_version"] = got["policy_version"]
    info["on_policy_micro"] = sum(on_policy_plan(op.seed, op.lmbda, step, grad_accum))
    return micro, info


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch
    from transformers import AutoTokenizer

    inputs: TrainInputs = config["inputs"]
    train, distill = inputs.train, inputs.distill
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(train.seed)
    if not train.use_gpu:
        # Each worker owns its share of the cores; oversubscribed threads thrash on small hosts.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()

    tokenizer = AutoTokenizer.from_pretrained(inputs.student_path)
    engine = build_engine(build_model(inputs), inputs)
    start, history = restore(engine, inputs)
    log = MetricsLog(rank, inputs.log_dir, train.tensorboard, inputs.total_steps, inputs.tracking, inputs.tracking_prefix)
    if inputs.log_dir:
        # Which process is which rank, for py-spy, kill tests and post-mortems.
        workers = Path(inputs.log_dir) / "workers"
        workers.mkdir(parents=True, exist_ok=True)
        write_atomic(workers / f"rank{rank}.json", json.dumps({"pid": os.getpid(), "node_ip": ray.util.get_node_ip_address(), "start_step": start}))
    if start:
        log.event({"event": "resumed_from", "step": start})
        if rank == 0:
            print(f"[train] resumed from the checkpoint at step {start}", flush=True)

    batches = _micro_batches(ray.train.get_dataset_shard("train"), train, tokenizer.pad_token_id,
                             skip=offline_micro_batches_before(start, distill, train.grad_accum))
    source = None
    if inputs.on_policy is not None:
        from raydistill.onpolicy.loop import OnPolicySource

        source = OnPolicySource(inputs.on_policy, ray.train.get_dataset_shard("prompts"), train.micro_batch_size, rank, tokenizer.pad_token_id, tokenizer)
        if start:
            source.sync(engine, start)  # the engine restarted from the initial weights
    for step in range(start + 1, inputs.total_steps + 1):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step applies; the scheduler advances after it
        micro, on_policy = _step_micro_batches(step, batches, source, distill, train.grad_accum)
        t_train = time.perf_counter()
        micro = [_to_tensors(m, device) for m in micro]
        loss, kd, ce, tokens, grad_norm = train_step(engine, micro, distill, train.loss_chunk_tokens, world)
        seconds = time.perf_counter() - t0
        if source is not None:
            on_policy["train_s"] = time.perf_counter() - t_train
            if step % distill.on_policy.sync_every == 0 and step < inputs.total_steps:
                source.sync(engine, step)
            on_policy.update(source.take_phase_times())
        record = {
            "step": step,
            "loss": loss,
            "kd": kd,
            "ce": ce,
            "kd_weighted": (1.0 - distill.ce_weight) * kd,
            "ce_weighted": distill.ce_weight * ce,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "step_s": seconds,
            "lr": lr,
            "grad_norm": grad_norm,
            **(on_policy or {}),
        }
        history.append(record)
        log.step(record)
        if step % train.checkpoint_every == 0 and step < inputs.total_steps:
            save_checkpoint(engine, step, history, inputs, rank, final=False, tokenizer=tokenizer)
    save_checkpoint(engine, inputs.total_steps, history, inputs, rank, final=True, tokenizer=tokenizer)
    log.close()


def calibration_sequences(signals_dir, rows: int) -> list[list[int]]:
    """The token ids (prompt + teacher text) of the first ``rows`` training rows of the signals, by id: what
    ``student.layers: auto`` measures the teacher's layers on."""
    from raydistill.data.signals import load_signals

    table = load_signals(signals_dir, columns=["id", "split"])
    chosen = sorted(i for i, s in zip(table["id"].to_pylist(), table["split"].to_pylist()) if s == "train")[:rows]
    # The token ids of the chosen rows only: a filtered read, not every row's sequence.
    picked = load_signals(signals_dir, columns=["id", "input_ids"], ids=chosen)
    by_id = dict(zip(picked["id"].to_pylist(), picked["input_ids"].to_pylist()))
    return [by_id[i] for i in chosen]


def run_train_stage(
    train: TrainSpec,
    distill: DistillSpec,
    student_path: str | None,
    signals_dir: str | Path,
    run: RunDir,
    *,
    student: StudentSpec | None = None,
    teacher_path: str | None = None,
    teacher: TeacherSpec | None = None,
    teacher_pass: TeacherPassSpec | None = None,
    tracking=None,
    tracking_prefix: str = "train/",
) -> dict:
    """Train the student on ``split == train`` signals; export it to ``run.student``. Returns the stage outputs.

    Everything it writes goes under ``run``: ``student_init``, ``train`` (logs), ``checkpoints``,
    ``student``, and with ``distill.mode`` 'on_policy' the scored rollouts in ``on_policy``.

    ``student`` (with ``teacher_path``) selects the initialization; without it ``student_path``
    is used as a pretrained start. On-policy training also scores with the teacher
    (``teacher_path``, ``teacher``'s engines, ``teacher_pass.top_k``). ``tracking``: the MLflow run
    (``raydistill.jobs.tracking.TrackedRun``) that rank 0 logs each step to, as ``tracking_prefix``+name.
    """
    from transformers import AutoTokenizer

    from raydistill.data.signals import check_tokenizer_matches, load_signals, read_signals
    from raydistill.distill.init import prepare_student

    if student is not None and student.init == "prune_from_teacher":
        if teacher_path is None:
            raise ValueError("student.init 'prune_from_teacher' needs the teacher's path")
        student_path = prepare_student(student, teacher_path, student_path, run, lambda n: calibration_sequences(signals_dir, n))
    if student_path is None:
        raise ValueError("student.model: required when student.init is 'pretrained'")
    check_tokenizer_matches(signals_dir, AutoTokenizer.from_pretrained(student_path))
    train_ds = read_signals(signals_dir, split="train")
    # Counted from the split column with pyarrow: Dataset.count() would run the whole read and
    # filter through Ray Data once more before training starts.
    n_rows = load_signals(signals_dir, columns=["split"])["split"].to_pylist().count("train")
    if n_rows < train.workers:
        raise ValueError(f"only {n_rows} training rows in {signals_dir}; train.workers={train.workers} needs at least one each")
    steps = total_steps(train, n_rows)
    train_dir = run.train
    train_dir.mkdir(parents=True, exist_ok=True)
    ds_config = deepspeed_config(train, steps)
    write_atomic(train_dir / "deepspeed.json", json.dumps(ds_config, indent=2))
    print(f"[train] {n_rows} training sequences, {train.workers} workers, ZeRO-{train.zero_stage}, {steps} steps", flush=True)

    inputs = TrainInputs(
        train=train,
        distill=distill,
        student_path=student_path,
        total_steps=steps,
        ds_config=ds_config,
        freeze_embeddings=bool(student and student.freeze_embeddings),
        log_dir=str(train_dir),
        tracking=tracking,
        tracking_prefix=tracking_prefix,
    )
    datasets, pool = {"train": train_ds}, None
    if distill.mode == "on_policy":
        pool, datasets["prompts"] = _start_on_policy(distill, train, teacher, teacher_pass, teacher_path, student_path, signals_dir, run)
        inputs = dataclasses.replace(inputs, on_policy=pool)
    try:
        result = build_trainer(inputs, datasets, run).fit()
    finally:
        if pool is not None:
            from raydistill.onpolicy.loop import stop_pool

            stop_pool(pool)
    student_dir, export_diff = export_student(result.checkpoint, run.student, train_dir)
    print(f"[train] exported {student_dir}; max |logit diff| vs the in-training model: {export_diff:.2e}", flush=True)
    on_policy = {}
    if pool is not None:
        from raydistill.onpolicy.loop import summarize

        history = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
        on_policy = {"on_policy": summarize(history, run.on_policy, distill.on_policy.sync_every)}
    return {
        "student_dir": str(student_dir),
        "student_init": student_path,
        "metrics": str(train_dir / "metrics.jsonl"),
        "checkpoint": result.checkpoint.path,
        "steps": steps,
        "train_rows": n_rows,
        "final_loss": result.metrics["loss"] if result.metrics else None,
        "export_max_logit_diff": export_diff,
        **on_policy,
    }


def _start_on_policy(distill: DistillSpec, train: TrainSpec, teacher: TeacherSpec | None, teacher_pass: TeacherPassSpec | None,
                     teacher_path: str | None, student_path: str, signals_dir, run: RunDir):
    """The rollout engine and teacher scorers (raydistill.onpolicy.loop), and the prompts the student samples from."""
    from raydistill.data.signals import read_signals
    from raydistill.onpolicy.loop import start_pool
    from raydistill.teacher.stage import engine_kwargs

    if teacher is None or teacher_pass is None or teacher_path is None:
        raise ValueError("distill.mode 'on_policy' needs the teacher (teacher, teacher_pass and the teacher's path) to score rollouts")
    op = distill.on_policy
    if run.on_policy.exists() and not any(run.checkpoints.glob("*/checkpoint_*")):
        shutil.rmtree(run.on_policy)  # an earlier attempt's rollouts that no checkpoint continues
    prompts = read_signals(signals_dir, split=None if op.prompts == "all" else op.prompts).select_columns(["id", "input_ids", "target_start"])
    print(f"[train] on-policy: lmbda {op.lmbda}, rollouts of {op.max_tokens} tokens at T={op.temperature}, weight sync every "
          f"{op.sync_every} step(s); starting the student's rollout engine and {teacher.replicas.max} teacher scorer(s)", flush=True)
    pool = start_pool(op, teacher, engine_kwargs(teacher, teacher_pass), teacher_pass.top_k, teacher_path, student_path,
                      run.on_policy, train.max_seq_len, train.use_gpu)
    return pool, prompts


def build_trainer(inputs: TrainInputs, datasets: dict, run: RunDir):
    """Ray Train's TorchTrainer over ``train_loop_per_worker``, with checkpoints and restarts under RUN/checkpoints."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = inputs.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        datasets=datasets,
        # Same name and storage on a re-run: Ray Train restores its checkpoint manager from there
        # and get_checkpoint() returns the interrupted run's latest checkpoint.
        run_config=RunConfig(
            name="train",
            storage_path=str(run.checkpoints),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep),
        ),
    )

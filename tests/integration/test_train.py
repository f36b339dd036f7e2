"""The trainer on a local Ray with real DeepSpeed: ZeRO 0/2/3 export fidelity, pruned init, worker-kill recovery.

Signals are made here by teacher-forcing the tiny teacher with transformers (no vLLM), so these
tests exercise only the train stage.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raydistill.data.signals import LOGPROB_SCALE, SIGNAL_SCHEMA, encode_signals, tokenizer_fingerprint, write_signal_meta
from raydistill.spec import DistillSpec, StudentSpec, TrainSpec
from raydistill.jobs.rundir import RunDir

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOP_K = 8
# fp32 training; the export is the same fp32 weights, so only kernel-order noise remains.
EXPORT_LOGIT_ATOL = 1e-4


@pytest.fixture(scope="module")
def signals_dir(tmp_path_factory, model_paths):
    """Score-mode signals: the tiny teacher's top-k over the second half of each corpus prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_path = model_paths[0]
    tok = AutoTokenizer.from_pretrained(teacher_path)
    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    rows = []
    for line in (ROOT / "configs/data/tiny_prompts.jsonl").read_text().splitlines():
        rec = json.loads(line)
        ids = tok(rec["prompt"]).input_ids
        start = len(ids) // 2
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        top = logp[start - 1 : len(ids) - 1].topk(TOP_K, dim=-1)
        rows.append({"id": rec["id"], "split": "train", "input_ids": ids, "target_start": start,
                     "topk_ids": top.indices.tolist(), "topk_logprobs": top.values.float().tolist(),
                     "prompt": rec["prompt"], "response": ""})
    out = tmp_path_factory.mktemp("signals")
    pq.write_table(encode_signals(pa.Table.from_pylist(rows, schema=SIGNAL_SCHEMA)), out / "part-0.parquet")
    write_signal_meta(out, {"teacher": teacher_path, "tokenizer_fingerprint": tokenizer_fingerprint(tok), "top_k": TOP_K,
                            "mode": "score", "logprob_scale": LOGPROB_SCALE})
    return str(out)


@pytest.fixture(scope="module")
def tied_student(tmp_path_factory, model_paths):
    """The tiny student's architecture with its LM head tied to the input embeddings (the tiny models' are untied)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_paths[1])
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    out = tmp_path_factory.mktemp("tied-student")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_paths[1]).save_pretrained(out)
    return str(out)


def _metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "train" / "metrics.jsonl").read_text().splitlines()]


def _check_export(out, run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_dir = Path(out["student_dir"])
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (student_dir / name).exists(), name
    AutoTokenizer.from_pretrained(student_dir)
    # The in-training model's logits on a fixed batch, saved by rank 0 before export.
    ref = torch.load(Path(run_dir) / "train" / "reference_logits.pt")
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ref["input_ids"]).logits, ref["logits"], atol=EXPORT_LOGIT_ATOL, rtol=0)
    assert out["export_max_logit_diff"] <= EXPORT_LOGIT_ATOL
    return model


@pytest.mark.parametrize(
    "stage, options",
    [
        (0, {"grad_accum": 2}),
        (2, {"gradient_checkpointing": True, "tensorboard": True}),
        (3, {"offload_optimizer": True}),
    ],
)
def test_zero_stage_trains_and_exports_exactly(stage, options, ray_local, model_paths, signals_dir, tmp_path):
    from raydistill.distill.train import run_train_stage

    train = TrainSpec(workers=2, zero_stage=stage, micro_batch_size=4, lr=3e-3, warmup_steps=2, max_steps=4,
                      checkpoint_every=2, max_seq_len=64, loss_chunk_tokens=16, **options)
    out = run_train_stage(train, DistillSpec(ce_weight=0.1), model_paths[1], signals_dir, RunDir(tmp_path))
    model = _check_export(out, tmp_path)
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(model_paths[1]).state_dict()
    assert any(not torch.equal(p, start[n]) for n, p in model.state_dict().items()), "training changed no weight"

    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert np.isfinite(m["loss"]) and m["kd"] >= 0 and m["ce"] > 0 and m["tokens_per_s"] > 0
        assert m["loss"] == pytest.approx(m["kd_weighted"] + m["ce_weighted"], rel=1e-5)
        assert m["grad_norm"] is not None and m["grad_norm"] > 0
    # DeepSpeed WarmupDecayLR: linear warmup from 0 over 2 steps, peak at step 3, then linear decay.
    assert [m["lr"] for m in metrics] == pytest.approx([0.0, 1.5e-3, 3e-3, 1.5e-3])
    ds = json.loads((tmp_path / "train" / "deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["gradient_accumulation_steps"] == train.grad_accum
    if options.get("tensorboard"):
        assert list((tmp_path / "train" / "tensorboard").glob("events.out.tfevents.*"))


# One rank of a two-process gloo group running train_step on hand-made micro-batches whose target
# counts differ per rank (argv: student dir, ZeRO stage, [[rank-0 targets, rank-1 targets], ...], and
# optionally 'freeze' for student.freeze_embeddings).
_UNEVEN_CHUNKS_WORKER = """
import json, os, sys
import torch, torch.distributed as dist
from raydistill.distill.dsconfig import deepspeed_config
from raydistill.distill.train import TrainInputs, build_engine, build_model, train_step
from raydistill.spec import DistillSpec, TrainSpec

rank, student, stage, steps = int(os.environ["RANK"]), sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
freeze = sys.argv[4:] == ["freeze"]
dist.init_process_group("gloo", rank=rank, world_size=2)
torch.manual_seed(0)
train = TrainSpec(workers=2, zero_stage=stage, offload_optimizer=stage == 3, micro_batch_size=1, max_steps=len(steps),
                  max_seq_len=64, loss_chunk_tokens=16)
distill = DistillSpec(ce_weight=0.1)
inputs = TrainInputs(train=train, distill=distill, student_path=student, total_steps=len(steps),
                     ds_config=deepspeed_config(train, len(steps)), freeze_embeddings=freeze)
engine = build_engine(build_model(inputs), inputs)
vocab = engine.module.config.vocab_size
g = torch.Generator().manual_seed(rank)
for n in (per_rank[rank] for per_rank in steps):
    ids = torch.randint(0, vocab, (1, 64), generator=g)
    start = 64 - n
    m = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "pred_pos": torch.tensor([[0, t - 1] for t in range(start, 64)], dtype=torch.int64).reshape(-1, 2),
         "targets": ids[0, start:], "topk_ids": torch.rand(n, vocab, generator=g).topk(8).indices,
         "topk_logprobs": torch.log_softmax(torch.randn(n, 9, generator=g), -1)[:, :8]}
    loss, kd, ce, tokens, grad_norm = train_step(engine, [m], distill, train.loss_chunk_tokens, 2)
    print("RESULT " + json.dumps({"loss": loss, "tokens": tokens, "grad_norm": grad_norm}), flush=True)
dist.destroy_process_group()
# Leave without interpreter finalization: DeepSpeed keeps the gloo groups referenced after
# destroy_process_group, so their C++ threads are joined during finalization, which can abort
# the process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291)
# after everything above has succeeded. The outputs are written and flushed by then.
sys.stdout.flush()
os._exit(0)
"""


def _run_uneven_chunks(tmp_path, student, stage, steps, timeout_s=240, freeze=False):
    """Both ranks' per-step results; fails on a hang (timeout) or a crash of either rank."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    script = tmp_path / "uneven_chunks_worker.py"
    script.write_text(_UNEVEN_CHUNKS_WORKER)
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        args = [sys.executable, str(script), student, str(stage), json.dumps(steps)] + (["freeze"] if freeze else [])
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"ZeRO-{stage} train_step with uneven chunk counts did not finish in {timeout_s} s (collective hang)")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return [[json.loads(l[len("RESULT "):]) for l in out.splitlines() if l.startswith("RESULT ")] for out in outputs]


@pytest.mark.parametrize("frozen_tied_head", [False, True], ids=["trainable_head", "frozen_tied_head"])
def test_zero3_uneven_loss_chunks_match_zero0(frozen_tied_head, model_paths, tied_student, tmp_path):
    """Ranks whose target counts fall into different numbers of LM-head chunks (every step here).

    Under ZeRO-3 each LM-head call is a collective; before the fix the rank with fewer chunks
    left the chunk loop for an all_reduce while the other still gathered the head (a hang), and
    its balancing calls gathered differently from real chunks in backward. The result must equal
    ZeRO-0's on the same batches: the balancing adds nothing to the loss or the gradients.

    A frozen head tied to frozen embeddings takes the other ZeRO-3 path (gathered once per
    micro-batch around the fused loss, ``train._zero3_frozen_head``), which must match ZeRO-0 too.
    """
    # Targets per rank with 16-token chunks: 4 vs 2 chunks, 2 vs 4, 3 vs 3, 1 vs 2, and a rank
    # with no target token at all (0 vs 2).
    steps = [[50, 20], [20, 50], [33, 33], [1, 17], [0, 17]]
    student = tied_student if frozen_tied_head else model_paths[1]
    zero3 = _run_uneven_chunks(tmp_path, student, 3, steps, freeze=frozen_tied_head)
    zero0 = _run_uneven_chunks(tmp_path, student, 0, steps, freeze=frozen_tied_head)
    assert len(zero3[0]) == len(zero3[1]) == len(zero0[0]) == len(steps)
    assert zero3[0] == zero3[1]  # every rank reports the global values
    for z3, z0, per_rank in zip(zero3[0], zero0[0], steps):
        assert z3["tokens"] == z0["tokens"] == sum(per_rank)
        assert z3["loss"] == pytest.approx(z0["loss"], rel=1e-5)
        assert z3["grad_norm"] == pytest.approx(z0["grad_norm"], rel=1e-5)


def test_pruned_student_frozen_embeddings(ray_local, model_paths, signals_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from raydistill.distill.train import run_train_stage

    student = StudentSpec(init="prune_from_teacher", layers=[1], freeze_embeddings=True)
    train = TrainSpec(workers=1, zero_stage=2, micro_batch_size=4, max_steps=2, max_seq_len=64)
    out = run_train_stage(train, DistillSpec(), None, signals_dir, RunDir(tmp_path), student=student, teacher_path=model_paths[0])
    assert out["student_init"] == str(tmp_path / "student_init")
    model = _check_export(out, tmp_path)
    assert model.config.num_hidden_layers == 1
    teacher = AutoModelForCausalLM.from_pretrained(model_paths[0]).state_dict()
    trained = model.state_dict()
    assert torch.equal(trained["model.embed_tokens.weight"], teacher["model.embed_tokens.weight"])
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], teacher["model.layers.1.mlp.up_proj.weight"])


def test_zero3_frozen_tied_embeddings(ray_local, tied_student, signals_dir, tmp_path):
    """ZeRO-3 on two workers with ``freeze_embeddings`` and an LM head tied to the embeddings, so frozen too.

    The checkpointed per-chunk loss of trainable heads crashed on such a head in backward (a
    CheckpointError: DeepSpeed had partitioned the frozen weight before the recompute's saved
    copy was used); a frozen head is gathered around the fused loss instead (``train._zero3_frozen_head``).
    """
    from safetensors.torch import load_file

    from raydistill.distill.train import run_train_stage

    train = TrainSpec(workers=2, zero_stage=3, micro_batch_size=4, lr=3e-3, max_steps=2, max_seq_len=64, loss_chunk_tokens=16)
    out = run_train_stage(train, DistillSpec(ce_weight=0.1), tied_student, signals_dir, RunDir(tmp_path),
                          student=StudentSpec(model=tied_student, freeze_embeddings=True))
    model = _check_export(out, tmp_path)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    start = load_file(Path(tied_student) / "model.safetensors")
    trained = model.state_dict()
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    others = [n for n in start if n != "model.embed_tokens.weight"]
    assert others and all(not torch.equal(trained[n], start[n]) for n in others), "a trained weight did not move"
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)


def _registered_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (what a restart resumes from)."""
    snapshot = run_dir / "checkpoints" / "train" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not written yet, or mid-write
        return []
    return [r["metrics"]["step"] for r in results]


def _kill_one_worker_after(run_dir: Path, step: int, killed: dict, deadline_s: float = 240):
    """Once the live log shows ``step`` and a checkpoint is registered, SIGKILL the rank-1 worker.

    A checkpoint written by the workers but not yet registered by the controller is not one a
    restart can use, so the kill waits for the registration.
    """
    train_dir = run_dir / "train"
    progress, pid_file = train_dir / "progress.jsonl", train_dir / "workers" / "rank1.json"
    end = time.time() + deadline_s
    while time.time() < end:
        if progress.exists() and pid_file.exists():
            steps = [json.loads(l).get("step", 0) for l in progress.read_text().splitlines() if '"loss"' in l]
            registered = _registered_checkpoint_steps(run_dir)
            if steps and max(steps) >= step and registered:
                killed["pid"] = json.loads(pid_file.read_text())["pid"]
                killed["at_step"] = max(steps)
                killed["registered"] = max(registered)
                os.kill(killed["pid"], signal.SIGKILL)
                return
        time.sleep(0.02)


def test_worker_kill_recovers_from_checkpoint(ray_local, model_paths, signals_dir, tmp_path):
    from raydistill.distill.train import run_train_stage

    total, every = 30, 5
    train = TrainSpec(workers=2, zero_stage=2, micro_batch_size=4, lr=3e-3, max_steps=total, checkpoint_every=every,
                      max_failures=2, max_seq_len=64, lr_schedule="constant")
    killed: dict = {}
    killer = threading.Thread(target=_kill_one_worker_after, args=(tmp_path, 7, killed), daemon=True)
    killer.start()
    out = run_train_stage(train, DistillSpec(ce_weight=0.1), model_paths[1], signals_dir, RunDir(tmp_path))
    killer.join(timeout=1)
    assert killed.get("pid"), "the worker was never killed"
    assert killed["at_step"] < total, "the run finished before the kill landed"

    # Exactly the configured optimizer steps, each once, in the final history.
    metrics = _metrics(tmp_path)
    assert [m["step"] for m in metrics] == list(range(1, total + 1)) and out["steps"] == total

    live = [json.loads(l) for l in (tmp_path / "train" / "progress.jsonl").read_text().splitlines()]
    resumes = [i for i, r in enumerate(live) if r.get("event") == "resumed_from"]
    assert len(resumes) == 1, "expected exactly one restart"
    resumed_at = live[resumes[0]]["step"]
    assert killed["registered"] <= resumed_at <= killed["at_step"] and resumed_at % every == 0
    before, after = live[: resumes[0]], [r for r in live[resumes[0] + 1 :] if "loss" in r]
    # The new attempt continues at the step after the checkpoint, not at step 1...
    assert after[0]["step"] == resumed_at + 1
    assert [r["step"] for r in after] == list(range(resumed_at + 1, total + 1))
    # ...and with the trained weights: its loss is near the pre-kill loss there, far below the first step's.
    first = before[0]["loss"]
    pre_kill = {r["step"]: r["loss"] for r in before}
    assert after[0]["loss"] < first - 0.5 * (first - pre_kill[resumed_at])
    assert after[0]["loss"] == pytest.approx(pre_kill.get(resumed_at + 1, after[0]["loss"]), rel=0.15)
    _check_export(out, tmp_path)

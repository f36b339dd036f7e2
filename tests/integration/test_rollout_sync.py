"""The on-policy rollout engine follows the trainer: after ``load_weights`` its log-probs are the trainer's.

One vLLM engine (float32, CPU) runs in a Ray actor, as in training. The student is the builtin tiny
student with tied embeddings (``lm_head`` is ``embed_tokens``), the harder case for a reload. The
trainer side is plain transformers: one real AdamW step, then the engine must agree with the HF
forward pass to 1e-4, and must not agree when the sync is skipped.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TOL = 1e-4  # engine vs trainer after a sync (float32 on both sides)
MOVED = 1e-2  # how far one optimizer step must move the log-probs, and the unsynced engine must be off
TEXT = ["the river runs through the quiet forest and the hills", "a small boat drifts on the lake at night"]
TRAIN_TEXT = "the quiet forest hears the river and the boat on the lake"
ROOT = Path(__file__).resolve().parents[2]
FIXED_TEXT_SEED = 123


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny float32 Llama student with tied embeddings, saved as a HF directory, plus its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from raydistill.models import resolve_model

    base = resolve_model("tiny:student")
    config = AutoConfig.from_pretrained(base)
    config.tie_word_embeddings = True
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    path = tmp_path_factory.mktemp("tied-student")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.save_pretrained(path)
    return str(path), tokenizer


@pytest.fixture(scope="module")
def engine(ray_local, student):
    from raydistill.onpolicy.rollout import RolloutEngine

    actor = ray_local.remote(num_cpus=1)(RolloutEngine).remote(student[0], {"dtype": "float32", "max_model_len": 256}, seed=0)
    yield actor
    ray_local.kill(actor)


def _hf_logprobs(model, ids: list[int]) -> list[float]:
    """The trainer's view: log_softmax of the logits at position i-1, read at token i."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def _diffs(a: list[list[float]], b: list[list[float]]) -> list[float]:
    assert [len(x) for x in a] == [len(x) for x in b]
    return [abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]


def _step(model, optimizer, ids: list[int]) -> None:
    import torch

    batch = torch.tensor([ids])
    model.train()
    optimizer.zero_grad()
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    model.eval()


@pytest.fixture(scope="module")
def synced(ray_local, engine, student):
    """Two optimizer steps, each synced into the engine (as a dict of tensors, then as safetensors bytes)."""
    import torch
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    path, tokenizer = student
    ids = [tokenizer(t)["input_ids"] for t in TEXT]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    r = {"ids": ids, "hf_initial": [_hf_logprobs(model, x) for x in ids]}
    r["engine_initial"] = ray_local.get(engine.prompt_logprobs.remote(ids))

    _step(model, optimizer, tokenizer(TRAIN_TEXT)["input_ids"])
    r["hf_step1"] = [_hf_logprobs(model, x) for x in ids]
    state = model.state_dict()  # lm_head.weight and model.embed_tokens.weight are one tensor
    t0 = time.perf_counter()
    r["loaded1"] = ray_local.get(engine.load_weights.remote(state, 1))
    r["sync_s"] = time.perf_counter() - t0
    r["engine_step1"] = ray_local.get(engine.prompt_logprobs.remote(ids))

    # The second sync sends safetensors bytes in the form HF saves a tied model: no lm_head.weight
    # (the first sync's dict carried both names, since Ray ships the two views as separate tensors).
    # The engine must then rebuild its LM head from the new embedding.
    _step(model, optimizer, tokenizer(TRAIN_TEXT)["input_ids"])
    r["hf_step2"] = [_hf_logprobs(model, x) for x in ids]
    payload = save({k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"})
    t0 = time.perf_counter()
    r["loaded2"] = ray_local.get(engine.load_weights.remote(payload, 2))
    r["sync_bytes_s"] = time.perf_counter() - t0
    r["engine_step2"] = ray_local.get(engine.prompt_logprobs.remote(ids))
    r["model"] = model
    print(f"\nsync (dict) {r['sync_s']:.3f}s, sync (bytes) {r['sync_bytes_s']:.3f}s, tensors {r['loaded1']}/{r['loaded2']}")
    return r


def test_engine_starts_at_checkpoint(synced):
    assert max(_diffs(synced["engine_initial"], synced["hf_initial"])) < TOL


def test_optimizer_step_moves_logprobs(synced):
    assert max(_diffs(synced["hf_step1"], synced["hf_initial"])) > MOVED


def test_synced_engine_matches_trainer(synced):
    d1 = _diffs(synced["engine_step1"], synced["hf_step1"])
    d2 = _diffs(synced["engine_step2"], synced["hf_step2"])
    print(f"\nmax |engine - trainer| after sync: dict {max(d1):.2e}, bytes {max(d2):.2e}")
    assert max(d1) < TOL
    assert max(d2) < TOL


def test_unsynced_engine_differs(synced):
    """Negative control: the engine still holding the initial weights is measurably off the trained model."""
    d = _diffs(synced["engine_initial"], synced["hf_step1"])
    print(f"\n|engine - trainer| without sync: min {min(d):.2e}, max {max(d):.2e}")
    assert max(d) > MOVED


def test_generate_carries_version_and_is_seeded(ray_local, engine, synced, student):
    _, tokenizer = student
    prompts = [tokenizer(t)["input_ids"][:6] for t in TEXT]
    first = ray_local.get(engine.generate.remote(prompts, 8, 1.0, 123))
    again = ray_local.get(engine.generate.remote(prompts, 8, 1.0, 123))
    other = ray_local.get(engine.generate.remote(prompts, 8, 1.0, 456))
    assert ray_local.get(engine.get_policy_version.remote()) == 2
    assert len(first) == len(prompts)
    for p, r in zip(prompts, first):
        assert r["policy_version"] == 2
        assert r["prompt_ids"] == p
        assert 1 <= len(r["response_ids"]) <= 8
        assert len(r["response_logprobs"]) == len(r["response_ids"])
        # The rollout log-probs are the synced policy's: the trainer's forward pass on prompt + response.
        full = p + r["response_ids"]
        trainer = _hf_logprobs(synced["model"], full)[len(p) - 1:]
        assert max(abs(a - b) for a, b in zip(r["response_logprobs"], trainer)) < TOL
    assert first == again
    assert [r["response_ids"] for r in first] != [r["response_ids"] for r in other]


# The trainer of the ZeRO cases: two gloo ranks of the project's DeepSpeed engine take two steps,
# then gather the weights as the live sync does and record their own log-probs on fixed text.
_TRAINER = """
import json, os, sys
import torch, torch.distributed as dist
from safetensors.torch import save_file
from raydistill.distill.dsconfig import deepspeed_config
from raydistill.distill.train import TrainInputs, build_engine, build_model, train_step
from raydistill.onpolicy.loop import full_state_dict
from raydistill.spec import DistillSpec, TrainSpec

rank, student, stage, out = int(os.environ["RANK"]), sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", rank=rank, world_size=2)
torch.manual_seed(0)
train = TrainSpec(workers=2, zero_stage=stage, micro_batch_size=1, max_steps=2, lr=1e-2, lr_schedule="constant",
                  max_seq_len=64, loss_chunk_tokens=16)
distill = DistillSpec(ce_weight=1.0)
inputs = TrainInputs(train=train, distill=distill, student_path=student, total_steps=2, ds_config=deepspeed_config(train, 2),
                     freeze_embeddings=sys.argv[5] == "freeze")
engine = build_engine(build_model(inputs), inputs)
vocab = engine.module.config.vocab_size
g = torch.Generator().manual_seed(rank)
for _ in range(2):
    ids = torch.randint(0, vocab, (1, 32), generator=g)
    m = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "pred_pos": torch.tensor([[0, t - 1] for t in range(1, 32)]), "targets": ids[0, 1:],
         "topk_ids": torch.zeros(31, 8, dtype=torch.int64), "topk_logprobs": torch.full((31, 8), -5.0)}
    train_step(engine, [m], distill, train.loss_chunk_tokens, 2)
state = full_state_dict(engine, rank)  # the sync's gather: a collective under ZeRO-3
fixed = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(int(sys.argv[4])))
engine.module.eval()
with torch.no_grad():
    logp = torch.log_softmax(engine.module(input_ids=fixed).logits[0].double(), -1)
if rank == 0:
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "state.safetensors"))
    tokens = fixed[0].tolist()
    trainer = logp[:-1].gather(-1, fixed[0, 1:, None]).squeeze(-1).tolist()
    with open(os.path.join(out, "fixed.json"), "w") as f:
        json.dump({"tokens": tokens, "trainer_logprobs": trainer}, f)
dist.destroy_process_group()
# Leave without interpreter finalization: DeepSpeed keeps the gloo groups referenced after
# destroy_process_group, so their C++ threads are joined during finalization, which can abort
# the process (SIGABRT, "terminate called without an active exception"; pytorch/pytorch#179291)
# after everything above has succeeded. The outputs are written and flushed by then.
sys.stdout.flush()
os._exit(0)
"""


def _train_two_steps(tmp_path: Path, student: str, stage: int, freeze: bool) -> tuple[dict, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    procs = [subprocess.Popen([sys.executable, str(script), student, str(stage), str(tmp_path), str(FIXED_TEXT_SEED),
                              "freeze" if freeze else "train"], cwd=ROOT,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-3000:]
    from safetensors.torch import load_file

    return load_file(tmp_path / "state.safetensors"), json.loads((tmp_path / "fixed.json").read_text())


@pytest.mark.parametrize("stage,freeze", [(2, False), (3, False), (3, True)])
def test_zero_trained_weights_reach_the_engine_exactly(stage, freeze, engine, student, synced, tmp_path):
    """The sync's gather (``full_state_dict``) from DeepSpeed ZeRO-2/3 training of two gloo ranks, through Ray, into the engine.

    With ``freeze_embeddings`` only the trained tensors travel; the engine keeps its (tied) embedding and LM head.
    """
    import ray
    from transformers import AutoModelForCausalLM

    initial = {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(student[0], dtype=torch.float32).state_dict().items()}
    ray.get(engine.load_weights.remote(initial, 0))  # the same start for every case
    state, fixed = _train_two_steps(tmp_path, student[0], stage, freeze)
    embedding = "model.embed_tokens.weight"
    assert "lm_head.weight" not in state  # tied: it travels as the embedding, once
    assert (embedding not in state) == freeze and set(state) - {embedding} == set(initial) - {embedding, "lm_head.weight"}
    trainer = torch.tensor(fixed["trainer_logprobs"], dtype=torch.float64)

    stale = torch.tensor(ray.get(engine.prompt_logprobs.remote([fixed["tokens"]]))[0], dtype=torch.float64)
    assert (stale - trainer).abs().max() > 1e-2, "negative control: without a sync the engine must not match the trained student"

    ray.get(engine.load_weights.remote(state, 2))
    after = torch.tensor(ray.get(engine.prompt_logprobs.remote([fixed["tokens"]]))[0], dtype=torch.float64)
    assert (after - trainer).abs().max() < TOL
    rollouts = ray.get(engine.generate.remote([fixed["tokens"][:4]], 4, 1.0, 0))
    assert rollouts[0]["policy_version"] == 2

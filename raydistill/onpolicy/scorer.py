"""The teacher's scoring pool of on-policy training: the student's rollouts scored by the teacher.

Each ``TeacherScorer`` is a long-lived Ray actor holding one vLLM engine of the teacher for the
whole training run (the teacher pass's Ray Data pool is built per dataset and torn down after it,
which would restart the engine at every step). It scores with the teacher pass's own score path:
the same engine arguments (``engine_kwargs``: raw log-probs, ``max_logprobs``), the same request
(``prompt_logprobs`` = top_k, one throwaway token) and the same conversion (``to_signal_row``),
plus the teacher's log-prob of each sampled token, which vLLM returns even outside the top k.
"""

from __future__ import annotations

from typing import Any

SCORER_DTYPE_KEY = "teacher.engine_args.dtype"


class TeacherScorer:
    """One teacher engine. Wrap with ``ray.remote``; ``score`` is called with whole rollout batches."""

    def __init__(self, model_path: str, engine_kwargs: dict[str, Any], top_k: int):
        from vllm import LLM

        from raydistill.engine_dtype import resolve

        args, self.dtype_choice = resolve(engine_kwargs, SCORER_DTYPE_KEY)
        self.k = top_k
        self.llm = LLM(model=model_path, **args)

    def engine_dtype(self) -> dict:
        return self.dtype_choice.as_dict()

    def score(self, rollouts: list[dict]) -> list[dict]:
        """Per rollout (``prompt_ids``, ``response_ids``): ``topk_ids``, ``topk_logprobs`` and ``target_logprob``
        at every response position, as the teacher pass stores them for score mode."""
        from vllm import SamplingParams, TokensPrompt

        from raydistill.teacher.stage import to_signal_row

        params = SamplingParams(**_score_params(self.k))
        prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_ids"]) + list(r["response_ids"])) for r in rollouts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        scored = []
        for r, out in zip(rollouts, outputs):
            start = len(r["prompt_ids"])
            entries = out.prompt_logprobs
            row = {
                "id": "", "split": "", "prompt": "", "source": "", "response": "",
                "prompt_token_ids": out.prompt_token_ids, "target_start": start,
                # vLLM's Logprob objects as the dicts the Ray Data path hands to to_signal_row.
                "prompt_logprobs": [None if e is None else {t: {"logprob": lp.logprob, "rank": lp.rank} for t, lp in e.items()} for e in entries],
            }
            signal = to_signal_row(row, self.k, "score")
            ids = out.prompt_token_ids
            target = [float(entries[t][ids[t]].logprob) for t in range(start, len(ids))]
            scored.append({"topk_ids": signal["topk_ids"], "topk_logprobs": signal["topk_logprobs"], "target_logprob": target})
        return scored


def _score_params(k: int) -> dict[str, Any]:
    """The teacher pass's score-mode request (``raydistill.teacher.stage.sampling_params`` with mode 'score')."""
    from raydistill.spec import TeacherPassSpec
    from raydistill.teacher.stage import sampling_params

    return sampling_params(TeacherPassSpec(mode="score", top_k=k))

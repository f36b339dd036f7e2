"""The evaluation report: sizes, generation speed, side-by-side answers, plots, report.md.

Generation runs on vLLM (the engine the teacher pass and serving use) in a Ray task per model,
one after the other, with the same engine settings for the student and the teacher, so their
tokens/s compare like for like.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from raydistill.fileio import write_atomic


def model_size(model_dir: str) -> dict:
    """Parameter count (read from the safetensors headers, no weights loaded) and bytes on disk."""
    params, size = 0, 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        size += f.stat().st_size
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                params += n
    return {"parameters": params, "bytes_on_disk": size}


# The spec key whose engine settings the report's generation runs use (the teacher's).
DTYPE_KEY = "teacher.engine_args.dtype"


def _generate(model_dir: str, engine_args: dict, prompts: list[str], side_by_side: int, max_tokens: int, own: dict | None = None) -> dict:
    """Body of the Ray task: greedy answers for the first prompts, then a timed fixed-length run;
    with ``own``, also the model's own samples ({"sample": {prompt_ids, max_tokens}}) or its
    log-probs of another model's samples ({"score": samples}).

    The engine's dtype is chosen here, on the node that runs it (``raydistill.engine_dtype``).
    """
    from vllm import LLM, SamplingParams

    from raydistill import engine_dtype

    engine_args, choice = engine_dtype.resolve({"seed": 0, **engine_args}, DTYPE_KEY)
    extra = {}
    try:
        llm = LLM(model=model_dir, **engine_args)
        if own and "sample" in own:
            extra["samples"] = _sample(llm, own["sample"]["prompt_ids"], own["sample"]["max_tokens"])
        if own and "score" in own:
            extra["sample_logprobs"] = _score(llm, own["score"])
        answers = [o.outputs[0].text for o in llm.generate(prompts[:side_by_side], SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)] if side_by_side else []
        llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up outside the timing
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
    except Exception as err:
        raise RuntimeError(f"the report's vLLM engine for {model_dir} failed: {type(err).__name__}: {err}\n"
                           f"{engine_dtype.death_hint(engine_args, DTYPE_KEY)}") from err
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"answers": answers, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "engine_dtype": choice.as_dict(), **extra}


def generation_runs(models: dict[str, str], engine_args: dict, engine_env: dict[str, str], prompts: list[str], side_by_side: int,
                    max_tokens: int, own: dict | None = None) -> dict:
    """``engine_env``: the environment the engines start with (``TeacherSpec.cpu_engine_env``).

    ``own`` (``prompt_ids``, ``max_tokens``): the student samples from those prompts, and the
    teacher then scores exactly those samples, in the same engines as the speed runs.
    """
    import ray

    task = ray.remote(num_cpus=1, runtime_env={"env_vars": engine_env})(_generate)
    out = {}
    for name, path in models.items():  # one at a time: two engines at once would share the cores
        print(f"[eval] generating with the {name} on vLLM ...", flush=True)
        todo = None
        if own and name == "student":
            todo = {"sample": own}
        elif own and name == "teacher":
            todo = {"score": out["student"]["samples"]}
        out[name] = ray.get(task.remote(path, engine_args, prompts, side_by_side, max_tokens, todo))
    if own:
        samples, teacher_lp = out["student"].pop("samples"), out["teacher"].pop("sample_logprobs")
        out["own_samples"] = own_sample_quality(samples, teacher_lp)
        out["own_sample_rows"] = [{**s, "teacher_logprobs": lp} for s, lp in zip(samples, teacher_lp)]
    return out


def own_sample_quality(samples: list[dict], teacher_logprobs: list[list[float]]) -> dict:
    """Per-token reverse KL to the teacher on the student's own samples (k1: mean of log q(x) - log p(x), x ~ q), and the teacher's NLL of them."""
    import numpy as np

    log_q = np.concatenate([np.asarray(s["response_logprobs"], np.float64) for s in samples]) if samples else np.zeros(0)
    log_p = np.concatenate([np.asarray(lp, np.float64) for lp in teacher_logprobs]) if samples else np.zeros(0)
    if not len(log_q):
        return {"prompts": len(samples), "tokens": 0, "reverse_kl": None, "teacher_nll": None}
    return {"prompts": len(samples), "tokens": int(len(log_q)), "reverse_kl": float((log_q - log_p).mean()), "teacher_nll": float(-log_p.mean())}


def _sample(llm, prompt_ids: list[list[int]], max_tokens: int) -> list[dict]:
    """The model's own samples at temperature 1 (the engine-wide seed), with its log-prob of each sampled token."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
    samples = []
    for ids, o in zip(prompt_ids, outs):
        tokens = list(o.outputs[0].token_ids)
        samples.append({"prompt_ids": list(ids), "response_ids": tokens,
                        "response_logprobs": [float(lp[t].logprob) for t, lp in zip(tokens, o.outputs[0].logprobs)]})
    return samples


def _score(llm, samples: list[dict]) -> list[list[float]]:
    """The model's log-prob of each response token of ``samples`` (prompt log-probs of prompt + response)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s["prompt_ids"] + s["response_ids"]) for s in samples], params, use_tqdm=False)
    out = []
    for s, o in zip(samples, outs):
        ids, start = o.prompt_token_ids, len(s["prompt_ids"])
        out.append([float(o.prompt_logprobs[t][ids[t]].logprob) for t in range(start, len(ids))])
    return out


def loss_curve(metrics_path: Path, out_png: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return False
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    if not rows:
        return False
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "total"), ("kd", "KD"), ("ce", "CE")):
        ax.plot(steps, [r[key] for r in rows], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_title("Training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def comparison_chart(report: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("perplexity on teacher responses", "perplexity"), ("parameters (millions)", "parameters")]
    if "tokens_per_s" in report["student"]:
        panels.append(("generation tokens/s", "tokens_per_s"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (title, key) in zip(axes, panels):
        values = [report[m][key] / (1e6 if key == "parameters" else 1) for m in ("student", "teacher")]
        ax.bar(["student", "teacher"], values, color=["tab:blue", "tab:gray"])
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _own_sample_lines(own: dict | None) -> list[str]:
    if not own or own.get("reverse_kl") is None:
        return []
    return [f"- **On the student's own samples** ({own['prompts']} held-out prompts, {own['tokens']} tokens sampled at temperature 1, "
            f"scored by the teacher): reverse KL to the teacher {own['reverse_kl']:.4f} nats/token, teacher NLL {own['teacher_nll']:.3f} "
            "nats/token. This is the text a user of the student sees; lower is closer to the teacher."]


def _group_lines(report: dict) -> list[str]:
    """A "KL by domain" table (rows with a domain; with domain routing, each against its teacher) and a "KL by teacher"
    one (ensemble); none for a run without domains and with one teacher."""
    lines: list[str] = []
    if by_domain := report.get("by_domain"):
        routed = any(g["teacher"] for g in by_domain.values())
        lines += ["## KL by domain", "",
                  ("Each domain is scored against its own teacher's signals. The teacher NLL is the first teacher's." if routed
                   else "The held-out figures of each domain (data.domain_field)."), "",
                  "| domain | teacher | sequences | tokens | KL to its teacher (nats/token) | top-1 agreement | student NLL | teacher NLL |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {d} | {g['teacher'] or ''} | {g['eval_sequences']} | {g['eval_tokens']} | {g['kl_to_teacher']:.4f} | "
                  f"{g['top1_agreement']:.1%} | {g['student_nll']:.3f} | {g['teacher_nll']:.3f} |" for d, g in by_domain.items()]
        lines.append("")
    if by_teacher := report.get("kl_by_teacher"):
        lines += ["## KL by teacher", "",
                  "The student was trained on the teachers' weighted mixture; here it is also scored against each teacher alone.", "",
                  "| teacher | KL (nats/token) |", "|---|---|"]
        lines += [f"| {name} | {kl:.4f} |" for name, kl in by_teacher.items()]
        lines += [f"| mixture | {report['kl_to_teacher']:.4f} |", ""]
    return lines


def distinct_ngram_fraction(texts: list[str], n: int = 4) -> float | None:
    """Repetition of generated text: per answer, distinct word n-grams over all its word n-grams, averaged over the
    answers that have any (None if none does). A fluent answer is near 1; "the most the most the most" near 0."""
    fractions = []
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if grams:
            fractions.append(len(set(grams)) / len(grams))
    return sum(fractions) / len(fractions) if fractions else None


def repeats_prompt(prompt: str, response: str, n: int = 6) -> bool:
    """Whether ``response`` contains ``n`` consecutive words of ``prompt``: a base-model teacher given an
    instruction tends to echo it instead of answering, and a student distilled on that learns the echo."""
    words = prompt.split()
    return any(" ".join(words[i:i + n]) in response for i in range(len(words) - n + 1))


def prompt_repeat_figures(prompts: list[str], responses: list[str]) -> dict:
    """How many of the held-out teacher responses repeat their prompt (``repeats_prompt``)."""
    count = sum(repeats_prompt(p or "", r or "") for p, r in zip(prompts, responses))
    return {"teacher_prompt_repeats": count, "teacher_prompt_repeat_fraction": count / len(prompts) if prompts else None}


def repetition_figures(side_by_side: list[dict]) -> dict:
    """Both models' distinct-4-gram fraction on their greedy side-by-side answers, and the student's over the teacher's."""
    student = distinct_ngram_fraction([item["student"] for item in side_by_side])
    teacher = distinct_ngram_fraction([item["teacher"] for item in side_by_side])
    return {"student_distinct4": student, "teacher_distinct4": teacher,
            "distinct4_ratio": student / teacher if student is not None and teacher else None}


def write_markdown(report: dict, path: Path) -> None:
    s, t = report["student"], report["teacher"]
    lines = [
        "# Distillation report",
        "",
        f"Held-out set: {report['eval_sequences']} prompts, {report['eval_tokens']} teacher response tokens. "
        "Both models are scored on the teacher's own responses (its token ids), so lower perplexity means "
        "the model predicts what the teacher writes.",
        "",
        "| | student | teacher |",
        "|---|---|---|",
        f"| perplexity on teacher responses | {s['perplexity']:.2f} | {t['perplexity']:.2f} |",
        f"| mean NLL (nats/token) | {s['nll']:.3f} | {t['nll']:.3f} |",
        f"| parameters | {s['parameters']:,} | {t['parameters']:,} |",
        f"| size on disk (MB) | {s['bytes_on_disk'] / 1e6:.1f} | {t['bytes_on_disk'] / 1e6:.1f} |",
    ]
    if "tokens_per_s" in s:
        lines.append(f"| generation tokens/s (same vLLM settings) | {s['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} |")
    if s.get("distinct4") is not None and t.get("distinct4") is not None:
        lines.append(f"| distinct 4-grams in greedy answers (1 = no repetition) | {s['distinct4']:.2f} | {t['distinct4']:.2f} |")
    if report.get("engine_dtype"):
        d = report["engine_dtype"]
        lines.append(f"| vLLM engine dtype | {d['student']['dtype']} | {d['teacher']['dtype']} |")
    lines += [
        "",
        f"- **Top-1 agreement**: the student's most likely token is the teacher's most likely token at {report['top1_agreement']:.1%} of positions.",
        f"- **KL to the teacher**: {report['kl_to_teacher']:.4f} nats/token (forward KL over the teacher's top-k plus a tail bucket; 0 means the same distribution).",
        f"- **Perplexity ratio** (student / teacher): {report['ppl_ratio']:.2f}." if "ppl_ratio" in report else "",
        (f"- **Teacher responses that repeat their prompt** (6 words of it or more): {report['teacher_prompt_repeats']} of "
         f"{report['eval_sequences']}." if report.get("teacher_prompt_repeats") is not None else ""),
        *_own_sample_lines(report.get("own_samples")),
        "",
        *_group_lines(report),
        "![comparison](comparison.png)",
        "",
    ]
    if report.get("loss_curve"):
        lines += ["![training loss](loss_curve.png)", ""]
    if report.get("side_by_side"):
        lines += ["## Side by side (greedy)", ""]
        for item in report["side_by_side"]:
            lines += [f"**Prompt:** {item['prompt']}", "", f"- *student:* {item['student']!r}", f"- *teacher:* {item['teacher']!r}", ""]
    write_atomic(path, "\n".join(lines) + "\n")

"""``RUN/student/README.md``: the student's Hugging Face model card.

YAML front matter in the Hub's format (``base_model``, ``license``, ``tags``, ``pipeline_tag``,
``library_name``) and a markdown body with the provenance (teacher, corpus fingerprint, loss,
steps, pruning), the evaluation figures and how to serve the student. It is built from what the
run directory holds, so the train stage writes it at export and the eval stage rewrites it with
the report's figures. ``README.md`` is not among the files whose hash identifies a model
(``raydistill.jobs.fingerprint``), so rewriting it never invalidates a stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from raydistill.fileio import write_atomic
from raydistill.jobs.rundir import RunDir
from raydistill.spec import JobSpec

CARD_FILE = "README.md"
# Hub ids of the builtin teachers, for ``base_model`` (a local path means nothing on the Hub).
_HUB_IDS = {"gemma3-270m": "google/gemma-3-270m"}
# Hub license identifiers of the licenses our builtins record.
_LICENSE_IDS = {"Gemma Terms of Use": "gemma"}


def teacher_facts(teacher_ref: str, teacher_path: str) -> dict:
    """``base_model`` and ``license`` of the teacher: from a builtin's record, a model card's front matter, or unknown."""
    path = Path(teacher_path)
    facts = {"base_model": _HUB_IDS.get(teacher_ref, teacher_ref), "license": "other", "license_name": None}
    builtin = path / "raydistill_builtin.json"
    if builtin.exists():
        name = json.loads(builtin.read_text()).get("license")
        if name:
            facts["license"], facts["license_name"] = _LICENSE_IDS.get(name, "other"), name
        return facts
    card = path / CARD_FILE
    if card.exists():
        front = front_matter(card.read_text())
        if front.get("license"):
            facts["license"] = front["license"]
    return facts


def front_matter(text: str) -> dict:
    """The YAML between the leading ``---`` lines of a model card ({} when there is none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    return yaml.safe_load(text[4:end]) or {} if end > 0 else {}


def build_model_card(spec: JobSpec, run: RunDir, teacher_path: str) -> str:
    facts = teacher_facts(spec.teacher.model, teacher_path)
    meta = {
        "base_model": facts["base_model"],
        "license": facts["license"],
        **({"license_name": facts["license_name"]} if facts["license"] == "other" and facts["license_name"] else {}),
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["raydistill", "knowledge-distillation", "distillation", *(["on-policy-distillation"] if spec.distill.mode == "on_policy" else [])],
    }
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {spec.model_id}", "",
             f"A student distilled from **{spec.teacher.model}** with raydistill. Its license is the teacher's"
             f"{' (' + facts['license_name'] + ')' if facts['license_name'] else ''}.", "", "## Provenance", ""]
    lines += _provenance(spec, run)
    lines += ["", "## Evaluation", ""] + _evaluation(run)
    lines += ["", "## Use", "",
              f"Served by raydistill (OpenAI-compatible API on {spec.serve.host}:{spec.serve.port}): `raydistill serve {run.root}`.",
              "", "With transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "", f'tokenizer = AutoTokenizer.from_pretrained("{run.student}")',
              f'model = AutoModelForCausalLM.from_pretrained("{run.student}")', "```", ""]
    return "\n".join(lines)


def _provenance(spec: JobSpec, run: RunDir) -> list[str]:
    manifest = json.loads(run.manifest.read_text()) if run.manifest.exists() else {"stages": {}}
    corpus = manifest["stages"].get("teacher", {}).get("inputs", {}).get("corpus")
    tp, d, tr = spec.teacher_pass, spec.distill, spec.train
    teachers = spec.teacher.model if spec.teachers is None else "; ".join(
        f"{t.model} (`{t.name}`, " + (f"domains {', '.join(t.domains)})" if tp.routing == "domain" else f"weight {t.weight:g})") for t in spec.teachers)
    out = [
        f"- **Teacher{'' if spec.teachers is None else 's, routing ' + tp.routing}:** {teachers}; teacher pass `{tp.mode}`, top-{tp.top_k} log-probs"
        + (f", responses of at most {tp.sampling.max_tokens} tokens at temperature {tp.sampling.temperature}" if tp.mode == "generate" else ""),
        f"- **Corpus:** `{spec.data.path}`" + (f" (fingerprint `{corpus}`: file sizes and modification times)" if corpus else ""),
        f"- **Loss:** `{d.loss}` with cross-entropy weight {d.ce_weight}, temperature {d.temperature}"
        + (f"; on-policy (GKD), lmbda {d.on_policy.lmbda}, rollouts of {d.on_policy.max_tokens} tokens, weight sync every "
           f"{d.on_policy.sync_every} step(s)" if d.mode == "on_policy" else "; offline (teacher-written text)"),
    ]
    metrics = run.train / "metrics.jsonl"
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    final = f", final loss {steps[-1]['loss']:.4f}" if steps else ""
    out.append(f"- **Training:** {len(steps) or tr.max_steps} optimizer steps, {tr.workers} workers, DeepSpeed ZeRO-{tr.zero_stage}, "
               f"micro-batch {tr.micro_batch_size} x {tr.grad_accum} accumulation, peak lr {tr.lr}{final}")
    from raydistill.distill.init import PRUNE_INFO_FILE

    prune = run.student_init / PRUNE_INFO_FILE
    if spec.student.init == "prune_from_teacher" and prune.exists():
        info = json.loads(prune.read_text())
        method = (info.get("selection") or {}).get("method", "block_influence").replace("_", " ")
        how = " (depth pruning" + (f", layers chosen by {method} on the teacher's text)" if info.get("selection") else ")")
        out.append(f"- **Initialization:** the teacher's layers {info['kept_layers']} of {info['teacher_layers']}{how}"
                   + (", input embeddings frozen" if spec.student.freeze_embeddings else ""))
    else:
        out.append(f"- **Initialization:** {spec.student.model}")
    return out


def _evaluation(run: RunDir) -> list[str]:
    path = run.eval / "report.json"
    if not path.exists():
        return ["Not evaluated yet (`raydistill eval` writes the figures here)."]
    r = json.loads(path.read_text())
    s, t = r["student"], r["teacher"]
    out = [f"On {r['eval_sequences']} held-out prompts ({r['eval_tokens']} teacher tokens):", "",
           "| | student | teacher |", "|---|---|---|",
           f"| perplexity on the teacher's text | {s['perplexity']:.2f} | {t['perplexity']:.2f} |",
           f"| parameters | {s['parameters']:,} | {t['parameters']:,} |"]
    if "tokens_per_s" in s:
        out.append(f"| generation tokens/s (same vLLM settings) | {s['tokens_per_s']:.1f} | {t['tokens_per_s']:.1f} |")
    out += ["", f"KL to the teacher {r['kl_to_teacher']:.4f} nats/token; top-1 agreement {r['top1_agreement']:.1%}."]
    own = r.get("own_samples") or {}
    if own.get("reverse_kl") is not None:
        out.append(f"On its own samples: reverse KL to the teacher {own['reverse_kl']:.4f} nats/token, teacher NLL {own['teacher_nll']:.3f}.")
    return out


def write_model_card(spec: JobSpec, run: RunDir, teacher_path: str) -> Path:
    path = run.student / CARD_FILE
    write_atomic(path, build_model_card(spec, run, teacher_path))
    return path

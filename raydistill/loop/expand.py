"""The loop's ``expand`` policy: the teacher writes new prompts like the rows the student finds hardest.

PGKD and MPA generate new examples where the student trails; here each round:

1. ranks each domain's training rows by the student's gap (``loop.hard.criterion``) and takes the
   hardest ``loop.expand.seeds`` as seeds, split across domains by the round's weights;
2. renders one few-shot request per seed: ``loop.expand.template`` with the seed last after
   ``shots - 1`` other prompts of its domain. The teacher *continues* it (no chat template), so a
   base-model teacher writes a new prompt as the next item of the list;
3. runs a teacher pass over those requests (``per_seed`` samples each, stopped at the first
   ``stop``): its responses are the new prompts, written to ``expand/prompts.jsonl`` with
   ``parent_id`` and ``round``;
4. runs the normal teacher pass over the new prompts, so they go through the same bad-row handling
   (an empty or over-long prompt is a rejected row in ``expand/signals/_rejected.jsonl``) and get
   signals like every corpus row.

Both passes are ordinary teacher passes into directories of the round, so a killed round re-run
resumes them. The pure parts (seeds, requests, new rows) are functions of their inputs, unit-tested
in tests/unit/test_loop_expand.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from raydistill.loop import policies
from raydistill.spec import LoopExpandSpec


def seed_rows(ranked: Mapping[str, Sequence[str]], weights: Mapping[str, float], seeds: int) -> dict[str, list[str]]:
    """Per domain, its hardest rows (``ranked``: hardest first) up to its share of ``seeds`` by ``weights``.

    A domain with fewer ranked rows than its share gives what it has; a domain with no weight, none.
    """
    counts = policies.allocate({d: weights.get(d, 0.0) for d in ranked}, seeds) if any(weights.get(d, 0.0) > 0 for d in ranked) else {}
    return {d: list(ranked[d][:n]) for d, n in counts.items() if n and ranked[d]}


def plan_requests(seeds: Mapping[str, Sequence[str]], train_rows: Mapping[str, Sequence[str]], shots: int, r: int, seed: int) -> list[dict]:
    """One request per seed: ``{id, parent_id, domain, examples}``, the examples being ``shots - 1`` other training rows
    of the seed's domain (drawn, seeded) and then the seed itself, last, where the teacher continues from."""
    rng = np.random.default_rng(seed)
    out = []
    for d in sorted(seeds):
        pool = sorted(train_rows.get(d, ()))
        for s in seeds[d]:
            others = [i for i in pool if i != s]
            take = min(len(others), shots - 1)
            picked = [others[j] for j in sorted(rng.choice(len(others), size=take, replace=False))] if take else []
            out.append({"id": f"{s}@r{r}", "parent_id": s, "domain": d, "examples": picked + [s]})
    return out


def fewshot_text(spec: LoopExpandSpec, prompts: Sequence[str]) -> str:
    """The text the teacher continues: the template with each example on one line (inner whitespace folded)."""
    lines = [spec.example.replace("{prompt}", " ".join(p.split())) for p in prompts]
    # str.replace, not str.format: prompts may hold braces.
    return spec.template.replace("{examples}", "\n".join(lines))


def new_prompt(text: str, stop: Sequence[str]) -> str:
    """A written prompt: the response up to its first stop string, stripped. vLLM already stops there, but a
    response cut at max_tokens, or one whose stop fell inside a token, may run on."""
    for s in stop:
        if s:
            text = text.split(s, 1)[0]
    return text.strip()


def new_rows(written: Sequence[tuple[str, str]], requests: Sequence[dict], stop: Sequence[str], r: int) -> list[dict]:
    """The teacher's responses (``(id, response)``, ids ``<request id>`` or ``<request id>#<i>``) -> corpus rows
    ``{id, prompt, domain, parent_id, round}``, in request order. An empty prompt is kept: the teacher pass
    over the new rows rejects it, with its reason, like any bad corpus row."""
    by_request = {q["id"]: q for q in requests}
    rows = []
    for wid, response in written:
        base = wid if wid in by_request else wid.rsplit("#", 1)[0]
        q = by_request.get(base)
        if q is None:
            raise ValueError(f"written row {wid!r} answers no request of round {r}")
        rows.append({"id": wid, "prompt": new_prompt(response or "", stop), "domain": q["domain"], "parent_id": q["parent_id"], "round": r})
    order = {q["id"]: n for n, q in enumerate(requests)}
    return sorted(rows, key=lambda x: (order[x["id"] if x["id"] in order else x["id"].rsplit("#", 1)[0]], x["id"]))


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    from raydistill.fileio import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# (data, teacher_pass, signals_dir, writer) -> the pass's outputs; ``writer``: the pass that writes prompts
# (each domain's own teacher, or the first one), else the job's own teacher pass (every teacher, as routed).
TeacherPass = Callable[..., dict]


def expand_round(spec, r: int, out_dir: Path, ranked: Mapping[str, Sequence[str]], weights: Mapping[str, float],
                 train_rows: Mapping[str, Sequence[str]], signals_dir: Path, teacher_pass: TeacherPass) -> dict:
    """Write round ``r``'s new prompts and their signals under ``out_dir``; return the step's outputs."""
    from raydistill.data.signals import load_signals
    from raydistill.spec import SamplingSpec

    loop, e = spec.loop, spec.loop.expand
    seeds = seed_rows(ranked, weights, e.seeds)
    requests = plan_requests(seeds, train_rows, e.shots, r, loop.seed + r)
    if not requests:
        return {"seeds": 0, "written": 0, "rows": 0, "rejected": 0, "rows_by_domain": {}}
    needed = sorted({i for q in requests for i in q["examples"]})
    table = load_signals(signals_dir, ["id", "prompt"], ids=needed)
    prompt_of = dict(zip(table["id"].to_pylist(), table["prompt"].to_pylist()))
    with_domain = spec.data.domain_field is not None
    write_jsonl(out_dir / "requests.jsonl", [{"id": q["id"], "prompt": fewshot_text(e, [prompt_of[i] for i in q["examples"]]),
                                              "parent_id": q["parent_id"], **({"domain": q["domain"]} if with_domain else {})} for q in requests])
    data = spec.data.model_copy(update={
        "path": str(out_dir / "requests.jsonl"), "format": "jsonl", "id_field": "id", "prompt_field": "prompt",
        "response_field": "_no_response", "messages_field": "_no_messages", "domain_field": "domain" if with_domain else None,
        "eval_fraction": 0.0, "on_bad_row": "reject"})
    writing = spec.teacher_pass.model_copy(update={
        "mode": "generate", "top_k": 1, "chat_template": False, "system_prompt": None,
        "sampling": SamplingSpec(max_tokens=e.max_tokens, temperature=e.temperature, n=e.per_seed, stop=list(e.stop), seed=loop.seed + r)})
    print(f"[train] loop round {r}: the teacher writes {len(requests) * e.per_seed} prompts from {len(requests)} hard rows", flush=True)
    teacher_pass(data, writing, str(out_dir / "writer"), True)
    written = load_signals(out_dir / "writer", ["id", "response"])
    rows = new_rows(list(zip(written["id"].to_pylist(), written["response"].to_pylist())), requests, e.stop, r)
    write_jsonl(out_dir / "prompts.jsonl", [row if with_domain else {k: v for k, v in row.items() if k != "domain"} for row in rows])
    passed = teacher_pass(data.model_copy(update={"path": str(out_dir / "prompts.jsonl")}), spec.teacher_pass, str(out_dir / "signals"), False)
    by_domain: dict[str, int] = {}
    for row in rows:
        by_domain.setdefault(row["domain"], 0)
    if passed["rows"]:
        domain_of = {row["id"]: row["domain"] for row in rows}
        for i in load_signals(out_dir / "signals", ["id"])["id"].to_pylist():
            by_domain[domain_of[_row_of(i, domain_of)]] += 1
    return {"seeds": len(requests), "written": len(rows), "rows": passed["rows"], "rejected": passed["rejected_rows"], "rows_by_domain": by_domain}


def expanded_rows(out_dir: Path) -> tuple[dict[str, list[str]], dict[str, tuple[str, int]]]:
    """The new rows that have signals: domain -> ids, and id -> (parent_id, round)."""
    from raydistill.data.signals import load_signals

    prompts = out_dir / "prompts.jsonl"
    if not prompts.exists() or not list((out_dir / "signals").glob("*.parquet")):
        return {}, {}
    rows = {row["id"]: row for row in read_jsonl(prompts)}
    by_domain: dict[str, list[str]] = {}
    labels = {}
    for i in sorted(load_signals(out_dir / "signals", ["id"])["id"].to_pylist()):
        row = rows[_row_of(i, rows)]
        by_domain.setdefault(row.get("domain", "all"), []).append(i)
        labels[i] = (row["parent_id"], int(row["round"]))
    return by_domain, labels


def _row_of(signal_id: str, rows: Mapping[str, object]) -> str:
    """The new row a signal row answers: itself, or ``<id>#<i>`` with teacher_pass.sampling.n > 1."""
    return signal_id if signal_id in rows else signal_id.rsplit("#", 1)[0]

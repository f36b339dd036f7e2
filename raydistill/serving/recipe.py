"""The guarded serving app as a Ray Serve application builder, for config-driven deployments.

KubeRay's RayService (and ``serve deploy`` of a Serve config file) build an app from an import
path plus ``args``; they never run the raydistill CLI. Pointing them at ``ray.serve.llm``'s
``build_openai_app`` would serve without our API key check, request limits, body cap, closed
CORS or route switches. ``app_builder`` builds the same app ``raydistill serve`` deploys, from
a ``serve:`` section given as ``args`` (validated like a spec's: trust_remote_code refused,
an exposed host without a key refused), so a recipe gets every guard by default.

``args``::

    models:                       # one or more students (exported Hugging Face directories)
      - {model_id: distill-1, path: /mnt/shared/runs/distill-1/student}
    serve: {api_key_env: RAYDISTILL_API_KEY, max_tokens: 512, ...}   # any ServeSpec field

The key itself comes from the environment variable ``serve.api_key_env`` of the process that
builds the app (in Kubernetes, a Secret mapped into the container's env); only its SHA-256
digest goes into the app, as with ``raydistill serve``.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from raydistill.serving.app import api_key_from_env, build_app
from raydistill.serving.guard import key_digest
from raydistill.serving.targets import Served
from raydistill.spec import ServeSpec, SpecError


def app_args(args: dict[str, Any]) -> tuple[list[Served], ServeSpec]:
    """``args`` -> (the models, the validated serve section); every problem reported at once, naming its key."""
    errors: list[str] = []
    unknown = sorted(set(args) - {"models", "serve"})
    if unknown:
        errors.append(f"args: unknown keys {unknown}; expected 'models' and 'serve'")
    models: list[Served] = []
    raw_models = args.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        errors.append("args.models: a non-empty list of {model_id, path} is required")
    else:
        for i, m in enumerate(raw_models):
            if not isinstance(m, dict) or not isinstance(m.get("model_id"), str) or not isinstance(m.get("path"), str) or set(m) - {"model_id", "path"}:
                errors.append(f"args.models[{i}]: expected {{model_id: <name>, path: <student directory>}}, got {m!r}")
            else:
                models.append(Served(m["model_id"], m["path"]))
        ids = [m.model_id for m in models]
        if len(ids) != len(set(ids)):
            errors.append(f"args.models: model_id values must be unique, got {ids}")
    serve = None
    try:
        serve = ServeSpec.model_validate(args.get("serve") or {})
    except ValidationError as err:  # one line per field, named as the recipe spells it
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            errors.append(f"args.serve{'.' + where if where else ''}: {e['msg']}")
    if errors:
        raise SpecError(errors)
    return models, serve


def app_builder(args: dict[str, Any]):
    """Ray Serve application builder: ``import_path: raydistill.serving.recipe:app_builder``."""
    models, serve = app_args(args)
    key = api_key_from_env(serve)
    return build_app(models, serve, key_digest(key) if key else None)

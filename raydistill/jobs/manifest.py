"""``RUN/manifest.json``: per stage, its status, timings, outputs and the fingerprint of the inputs it ran on."""

from __future__ import annotations

import json
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from raydistill.fileio import write_atomic

def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Manifest:
    """A thin view of the manifest file; every change is written through atomically."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.data, indent=2, default=str))

    def entry(self, stage: str) -> dict:
        return self.data["stages"].get(stage, {})

    def set_info(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def mark(self, name: str, **fields) -> None:
        self.data["stages"].setdefault(name, {}).update(fields)
        self.save()

    @contextmanager
    def stage(self, name: str, **record):
        """Record a stage's run; ``record`` (fingerprint, inputs, ...) is kept with it. The body fills the yielded dict with the outputs."""
        outputs: dict = {}
        started = time.time()
        entry = {"status": "running", "started_at": _now(), **record, "outputs": outputs}
        self.data["stages"][name] = entry
        self.save()
        try:
            yield outputs
        except BaseException as err:
            entry.update(status="failed", ended_at=_now(), seconds=round(time.time() - started, 1),
                         error="".join(traceback.format_exception_only(type(err), err)).strip())
            self.save()
            raise
        entry.update(status="succeeded", ended_at=_now(), seconds=round(time.time() - started, 1))
        self.save()

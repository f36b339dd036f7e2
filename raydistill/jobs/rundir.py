"""``RunDir``: every path of one run, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunDir":
        return cls(Path(run_dir))

    @property
    def spec(self) -> Path:
        return self.root / "spec.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def signals(self) -> Path:
        return self.root / "signals"

    @property
    def on_policy(self) -> Path:
        """The student's scored rollouts of on-policy training (written by train, not the teacher pass)."""
        return self.signals / "on_policy"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def train(self) -> Path:
        """Training logs: the generated DeepSpeed config, metrics.jsonl."""
        return self.root / "train"

    @property
    def student_init(self) -> Path:
        """A student pruned from the teacher, before training."""
        return self.root / "student_init"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def rounds(self) -> Path:
        """The adaptive loop's rounds (``loop.rounds`` > 1): one run directory per round, and the loop's report."""
        return self.root / "rounds"

    @property
    def mlruns(self) -> Path:
        """The local MLflow store (``tracking.mlflow`` without a tracking_uri)."""
        return self.root / "mlruns"

    @property
    def mlflow_run(self) -> Path:
        """Which MLflow run this directory logs to (store, experiment, run id), so that a re-run continues it."""
        return self.root / "mlflow.json"

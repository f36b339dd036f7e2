"""The console of ``raydistill run``: raydistill's own lines, and one live progress line per stage.

Everything else a run prints (vLLM engines, Ray, Ray Data, DeepSpeed, Ray Train) goes to ``RUN/logs/``:
the driver process's own output to ``driver.log``, the Ray session's logs (engine actors, Train
workers) to ``ray/``. ``raydistill run -v`` leaves all of it on the console instead.

Ray, Ray Data and vLLM each have a switch for part of this (``log_to_driver``, Data's progress bars,
``VLLM_LOGGING_LEVEL``), but none covers what subprocesses and native code write to the driver's
file descriptors (vLLM's engine core process, Ray's C++ core worker), so the driver's fds 1 and 2
are pointed at ``driver.log`` and only lines that look like raydistill's go on to the terminal.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

# What raydistill prints for the user: the pipeline's ``==>`` lines, the stages' ``[stage]`` summaries
# (printed from the driver) and the CLI's errors and warnings.
_CONSOLE_LINE = re.compile(r"^(==> |\[(teacher|train|eval|serve-check|raydistill)\] |(error|warning|note): )")
PLAIN_INTERVAL_S = 30.0  # how often a non-terminal stdout gets a progress line
POLL_S = 1.0


def is_console_line(line: str) -> bool:
    """Whether a line printed in the driver is raydistill's own (it goes to the console as well as driver.log)."""
    return bool(_CONSOLE_LINE.match(line))


# --------------------------------------------------------------------------- formatting (pure)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def eta_seconds(done: float, total: float | None, rate: float | None) -> float | None:
    """Seconds left at ``rate`` units per second; None while the total or a rate is unknown."""
    if total is None or not rate or rate <= 0:
        return None
    return max(0.0, (total - done) / rate)


def bar(fraction: float, width: int = 20) -> str:
    filled = int(round(min(1.0, max(0.0, fraction)) * width))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def fit(text: str, columns: int) -> str:
    """``text`` cut to a terminal line (a wrapped line cannot be redrawn in place with a carriage return)."""
    return text if len(text) < columns else text[: max(0, columns - 2)] + "…"


@dataclass(frozen=True)
class TeacherProgress:
    rows: int  # signal rows written so far (resumed ones included)
    total: int | None  # rows the pass will write at most (None: unknown)
    tokens_per_s: float | None  # sequence tokens of the rows written during this run, per second
    rows_per_s: float | None
    elapsed_s: float

    def text(self) -> str:
        if not self.rows:
            return f"[teacher] running, no signal shard written yet · {format_duration(self.elapsed_s)}"
        done = f"{self.rows}/{self.total} rows" if self.total else f"{self.rows} rows"
        parts = [f"[teacher] {done}"]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        eta = eta_seconds(self.rows, self.total, self.rows_per_s)
        parts.append(f"ETA {format_duration(eta)}" if eta is not None else f"{format_duration(self.elapsed_s)} elapsed")
        return " · ".join(parts)

    def fraction(self) -> float | None:
        return min(1.0, self.rows / self.total) if self.total else None


@dataclass(frozen=True)
class TrainProgress:
    step: int  # last finished optimizer step (0: none yet)
    total: int | None
    loss: float | None
    tokens_per_s: float | None
    step_s: float | None  # mean seconds per step over the recent steps
    elapsed_s: float
    resumed_from: int | None = None

    def text(self) -> str:
        if not self.step:
            return f"[train] workers starting · {format_duration(self.elapsed_s)}"
        parts = [f"[train] step {self.step}/{self.total}" if self.total else f"[train] step {self.step}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s:,.0f} tok/s")
        left = eta_seconds(self.step, self.total, 1.0 / self.step_s if self.step_s else None)
        parts.append(f"ETA {format_duration(left)}" if left is not None and self.step < (self.total or 0) else
                     f"{format_duration(self.elapsed_s)} elapsed")
        return " · ".join(parts)

    def fraction(self) -> float | None:
        return min(1.0, self.step / self.total) if self.total else None


@dataclass(frozen=True)
class RoundProgress:
    """The adaptive loop's training: which round, and that round's ``TrainProgress``."""

    round: int  # 0-based
    rounds: int
    train: TrainProgress

    def text(self) -> str:
        return self.train.text().replace("[train] ", f"[train] round {self.round + 1}/{self.rounds} · ", 1)

    def fraction(self) -> float | None:
        inner = self.train.fraction()
        return None if inner is None else (self.round + inner) / self.rounds


@dataclass(frozen=True)
class Heartbeat:
    stage: str
    elapsed_s: float

    def text(self) -> str:
        return f"[{self.stage}] running · {format_duration(self.elapsed_s)}"

    def fraction(self) -> None:
        return None


# --------------------------------------------------------------------------- the console


class Console:
    """Permanent lines, plus at most one live progress line.

    On a terminal the progress line is redrawn in place (a carriage return) at every update; elsewhere
    (a file, CI, a Ray Job's log) it is printed as a plain line every ``interval_s``. ``log`` gets the
    permanent lines and the plain progress lines either way.
    """

    def __init__(self, out: TextIO, *, tty: bool, err: TextIO | None = None, log: TextIO | None = None,
                 interval_s: float = PLAIN_INTERVAL_S, columns: int = 100, clock: Callable[[], float] = time.monotonic):
        self.out, self.err, self.log, self.tty = out, err or out, log, tty
        self.interval_s, self.columns, self.clock = interval_s, columns, clock
        self._live = ""  # the progress line now on screen (terminal only)
        self._last_plain = clock()
        self._lock = threading.RLock()

    def line(self, text: str, *, err: bool = False) -> None:
        with self._lock:
            stream = self.err if err else self.out
            if self._live:
                self.out.write("\r\x1b[K")
                self.out.flush()
            stream.write(text + "\n")
            stream.flush()
            self._to_log(text)
            if self._live:
                self.out.write(self._live)
                self.out.flush()

    def begin(self) -> None:
        """A stage starts: its first plain progress line comes one interval later."""
        with self._lock:
            self._last_plain = self.clock()

    def progress(self, text: str, fraction: float | None = None) -> None:
        with self._lock:
            now = self.clock()
            due = now - self._last_plain >= self.interval_s
            if due:
                self._last_plain = now
                self._to_log(text)
            if self.tty:
                shown = f"{bar(fraction)} {text}" if fraction is not None else text
                self._live = fit(shown, self.columns)
                self.out.write("\r\x1b[K" + self._live)
                self.out.flush()
            elif due:
                self.out.write(text + "\n")
                self.out.flush()

    def end(self, final: str | None = None) -> None:
        """The stage is over: clear the live line, and print ``final`` (the progress as it ended) if given."""
        with self._lock:
            if self._live:
                self.out.write("\r\x1b[K")
                self.out.flush()
                self._live = ""
            if final:
                self.line(final)

    def _to_log(self, text: str) -> None:
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()


class ProgressWatcher:
    """A driver thread that samples a stage's progress every ``poll_s`` and shows it on the console."""

    def __init__(self, console: Console, sample: Callable[[float], object], *, final: bool = False, poll_s: float = POLL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.console, self.sample, self.final, self.poll_s, self.clock = console, sample, final, poll_s, clock
        self._stop = threading.Event()
        self._started = clock()
        self._thread = threading.Thread(target=self._loop, name="raydistill-progress", daemon=True)

    def __enter__(self) -> "ProgressWatcher":
        self.console.begin()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        last = self._sample() if exc[0] is None else None  # the state as the stage ended
        self.console.end(last.text() if self.final and last is not None and last.fraction() else None)

    def _sample(self):
        try:
            return self.sample(self.clock() - self._started)
        except Exception as err:  # a progress line must never break a run
            print(f"progress: {type(err).__name__}: {err}", file=sys.stderr)
            return None

    def _tick(self) -> None:
        last = self._sample()
        if last is not None:
            self.console.progress(last.text(), last.fraction())

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._tick()


# --------------------------------------------------------------------------- progress sources


class _Rate:
    """Units per second since the first change seen after the start (so engine or worker start-up is not counted)."""

    def __init__(self, start_value: float):
        self.base = start_value
        self.anchor: tuple[float, float] | None = None

    def update(self, t: float, value: float) -> float | None:
        if value < self.base:  # the directory was cleared under us: count from here
            self.base, self.anchor = value, None
        if value > self.base and self.anchor is None:
            self.anchor = (t, value)
            return None
        if self.anchor is None or t <= self.anchor[0] or value <= self.anchor[1]:
            return None
        return (value - self.anchor[1]) / (t - self.anchor[0])


class _Once:
    """A total worked out once, on the watcher's thread; one that cannot be known is None (shown as unknown)."""

    def __init__(self, fn: Callable[[], int | None]):
        self.fn, self.done, self.value = fn, False, None

    def __call__(self) -> int | None:
        if not self.done:
            self.done = True
            try:
                self.value = self.fn()
            except Exception:
                self.value = None
        return self.value


class TeacherShards:
    """Rows and tokens in the signal shards (``RUN/signals/*.parquet``) as Ray Data writes them.

    Each shard is read once: its row count from the footer, its token count from the ``input_ids`` lengths.
    A shard still being written has no footer yet and is read on a later poll.
    """

    def __init__(self, signals_dir: Path, total: Callable[[], int | None] = lambda: None):
        self.dir, self._total = Path(signals_dir), _Once(total)
        self._seen: dict[str, tuple[int, int]] = {}
        self._start = self._scan()
        self._rows = _Rate(self._start[0])
        self._tokens = _Rate(self._start[1])

    def _scan(self) -> tuple[int, int]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        present = {str(p) for p in self.dir.glob("*.parquet")} if self.dir.is_dir() else set()
        self._seen = {k: v for k, v in self._seen.items() if k in present}
        for f in sorted(present - self._seen.keys()):
            try:
                rows = pq.read_metadata(f).num_rows
                try:
                    tokens = int(pc.sum(pc.list_value_length(pq.read_table(f, columns=["input_ids"])["input_ids"])).as_py() or 0)
                except (KeyError, ValueError, TypeError):
                    tokens = 0
            except (OSError, ValueError):  # not complete yet (no footer), or gone
                continue
            self._seen[f] = (rows, tokens)
        return sum(r for r, _ in self._seen.values()), sum(t for _, t in self._seen.values())

    def __call__(self, elapsed_s: float) -> TeacherProgress:
        rows, tokens = self._scan()
        t = time.monotonic()
        return TeacherProgress(rows, self._total(), self._tokens.update(t, tokens), self._rows.update(t, rows), elapsed_s)


class TrainLog:
    """Tails ``RUN/train/progress.jsonl``, which Train's rank 0 appends a record to after each step."""

    def __init__(self, path: Path, total: Callable[[], int | None] = lambda: None, window: int = 5):
        self.path, self._total, self.window = Path(path), _Once(total), window
        self._offset = self.path.stat().st_size if self.path.exists() else 0  # lines of earlier attempts are not this run's
        self._partial = ""
        self._records: list[dict] = []
        self._resumed: int | None = None
        self._steps = _Rate(0)  # steps per wall-clock second: checkpoint saves between steps count too

    def read_new(self) -> list[dict]:
        if not self.path.exists():
            return []
        size = self.path.stat().st_size
        if size < self._offset:  # cleared and restarted
            self._offset, self._partial = 0, ""
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._offset)
            text = f.read()
            self._offset = f.tell()
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def __call__(self, elapsed_s: float) -> TrainProgress:
        for record in self.read_new():
            if record.get("event") == "resumed_from":
                self._resumed = record.get("step")
                self._records = [r for r in self._records if r["step"] <= (self._resumed or 0)]
            elif "step" in record and "loss" in record:
                self._records.append(record)
        rate = self._steps.update(time.monotonic(), self._records[-1]["step"]) if self._records else None
        return train_progress(self._records, self._total(), elapsed_s, self.window, self._resumed, rate)


class RoundsTrainLog:
    """The loop's training (``loop.rounds`` > 1): tails the latest round's ``rounds/<r>/train/progress.jsonl``."""

    def __init__(self, rounds_dir: Path, rounds: int, total: Callable[[], int | None] = lambda: None):
        self.rounds_dir, self.rounds, self._total = Path(rounds_dir), rounds, total
        self._round: int | None = None
        self._log: TrainLog | None = None
        self._since = 0.0

    def __call__(self, elapsed_s: float) -> RoundProgress | TrainProgress:
        found = sorted((int(p.parents[1].name), p) for p in self.rounds_dir.glob("*/train/progress.jsonl") if p.parents[1].name.isdigit())
        if found and found[-1][0] != self._round:
            self._round, path = found[-1]
            self._log, self._since = TrainLog(path, self._total), elapsed_s
            self._log._offset = 0  # a round's file is new to this run (a resumed round's earlier lines are its resumed_from)
        if self._log is None:
            return train_progress([], None, elapsed_s)
        return RoundProgress(self._round, self.rounds, self._log(elapsed_s - self._since))


def train_progress(records: list[dict], total: int | None, elapsed_s: float, window: int = 5, resumed_from: int | None = None,
                   steps_per_s: float | None = None) -> TrainProgress:
    """The progress line's numbers from the step records so far (``progress.jsonl``'s fields).

    ``steps_per_s``: the rate seen on the wall clock, which includes checkpoint saves; without it the ETA
    comes from the steps' own ``step_s``.
    """
    if not records:
        return TrainProgress(resumed_from or 0, total, None, None, None, elapsed_s, resumed_from)
    last = records[-1]
    # The first step of an attempt carries DeepSpeed's and the data pipeline's warm-up; leave it out of the ETA.
    recent = [r["step_s"] for r in records[1:][-window:] if r.get("step_s")] or [r["step_s"] for r in records[-1:] if r.get("step_s")]
    step_s = 1.0 / steps_per_s if steps_per_s else sum(recent) / len(recent) if recent else None
    return TrainProgress(last["step"], total, last.get("loss"), last.get("tokens_per_s"), step_s, elapsed_s, resumed_from)


def corpus_rows_hint(path_spec: str, fmt: str, limit_bytes: int = 256 << 20) -> int | None:
    """At most how many rows a local corpus has (lines, or Parquet footers): the teacher's total when it is cheap to know.

    Remote corpora, and local ones over ``limit_bytes``, give None (the progress line shows rows and rate only).
    """
    import glob

    import pyarrow.parquet as pq

    files: list[str] = []
    for part in (p.strip() for p in path_spec.split(",") if p.strip()):
        if "://" in part:
            return None
        matches = glob.glob(part) if any(c in part for c in "*?[") else [part]
        for m in matches:
            files += sorted(str(f) for f in Path(m).rglob("*") if f.is_file()) if Path(m).is_dir() else [m]
    if not files:
        return None
    if fmt == "text_files":
        return len(files)
    if fmt == "parquet":
        return sum(pq.read_metadata(f).num_rows for f in files if f.endswith(".parquet"))
    if sum(os.path.getsize(f) for f in files) > limit_bytes:
        return None
    rows = 0
    for f in files:
        with open(f, "rb") as fh:
            rows += sum(1 for line in fh if line.strip())
    return rows


# --------------------------------------------------------------------------- the driver's output


class LineRouter(io.TextIOBase):
    """A ``sys.stdout``/``sys.stderr`` stand-in: every line goes to ``log``; raydistill's own lines to the console too."""

    def __init__(self, log: TextIO, console: Console, *, err: bool = False, keep: Callable[[str], bool] = is_console_line):
        self.log, self.console, self.is_err, self.keep = log, console, err, keep
        self._buf = ""
        self._lock = threading.RLock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.log.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def write(self, s: str) -> int:
        with self._lock:
            self._buf += s
            *lines, self._buf = self._buf.split("\n")
            for line in lines:
                if self.keep(line):
                    self.console.line(line, err=self.is_err)  # the console writes it to the log as well
                else:
                    self.log.write(line + "\n")
            if len(self._buf) > 8192:  # progress bars that only ever carriage-return
                self.log.write(self._buf)
                self._buf = ""
        return len(s)

    def flush(self) -> None:
        with self._lock:
            self.log.flush()


@dataclass
class ConsoleSession:
    """The quiet console's state for one run: where its logs go."""

    console: Console
    logs_dir: Path
    verbose: bool

    @property
    def driver_log(self) -> Path:
        return self.logs_dir / "driver.log"


class HeldOutput:
    text = ""


@contextmanager
def held_output(enabled: bool = True) -> Iterator[HeldOutput]:
    """Hold what is printed (at the fd level) before the run directory, and so ``driver.log``, is known: loading
    the spec imports vLLM, which logs as it loads. On an error it is all printed after all; otherwise the caller
    hands ``.text`` to ``quiet_driver(preamble=...)``.
    """
    held = HeldOutput()
    if not enabled:
        yield held
        return
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        failed = True
        try:
            yield held
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, target in zip(saved, (1, 2)):
                os.dup2(fd, target)
                os.close(fd)
            tmp.seek(0)
            held.text = tmp.read().decode("utf-8", "replace")
            if failed and held.text:
                sys.stderr.write(held.text)
                sys.stderr.flush()


@contextmanager
def quiet_driver(logs_dir: Path, *, verbose: bool = False, stdout: TextIO | None = None, preamble: str = "") -> Iterator[ConsoleSession]:
    """Send everything the driver process prints (Python and native, this process and its children) to
    ``logs_dir/driver.log``, and only raydistill's lines and the progress lines to the terminal.

    With ``verbose`` nothing is redirected: the console shows everything, as without this.
    """
    logs_dir = Path(logs_dir)
    logs_dir.mkdir(parents=True, exist_ok=True)
    stdout = stdout or sys.stdout
    tty = _isatty(stdout)
    columns = _columns()
    if verbose:
        if preamble:
            sys.stdout.write(preamble)
        # Plain progress lines among the engines' output: a carriage-return line would be torn by them.
        yield ConsoleSession(Console(stdout, tty=False, err=sys.stderr), logs_dir, verbose)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log = open(logs_dir / "driver.log", "a", buffering=1, encoding="utf-8", errors="replace")
    log.write(f"\n===== raydistill run, pid {os.getpid()}, {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    term_out = open(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    term_err = open(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    console = Console(term_out, tty=tty, err=term_err, log=log, columns=columns)
    old = sys.stdout, sys.stderr
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout, sys.stderr = LineRouter(log, console), LineRouter(log, console, err=True)
    if preamble:
        sys.stdout.write(preamble if preamble.endswith("\n") else preamble + "\n")
    try:
        yield ConsoleSession(console, logs_dir, verbose)
    except BaseException:
        log.write(traceback.format_exc())
        raise
    finally:
        console.end()
        sys.stdout, sys.stderr = old
        for fd, target in zip(saved, (1, 2)):
            os.dup2(fd, target)
            os.close(fd)
        term_out.close()
        term_err.close()
        log.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (OSError, AttributeError, ValueError):
        return 100

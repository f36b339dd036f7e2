"""The quiet console of ``raydistill run``: progress formatting, ETA, terminal vs plain output, the line filter."""

import io
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.jobs import console as c


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_durations_and_eta():
    assert [c.format_duration(s) for s in (0, 42.4, 60, 185, 7620)] == ["0s", "42s", "1m00s", "3m05s", "2h07m"]
    assert c.eta_seconds(30, 100, 7.0) == pytest.approx(10.0)
    assert c.eta_seconds(100, 100, 7.0) == 0.0
    assert c.eta_seconds(30, None, 7.0) is None  # total unknown
    assert c.eta_seconds(30, 100, None) is None and c.eta_seconds(30, 100, 0.0) is None  # no rate yet


def test_bar_and_fit():
    assert c.bar(0.5, width=10) == "[#####-----]"
    assert c.bar(1.7, width=4) == "[####]" and c.bar(-1, width=4) == "[----]"
    assert c.fit("short", 80) == "short"
    cut = c.fit("x" * 200, 80)
    assert len(cut) < 80 and cut.endswith("…")


def test_teacher_line_with_and_without_a_total():
    assert c.TeacherProgress(0, None, None, None, 35).text() == "[teacher] running, no signal shard written yet · 35s"
    known = c.TeacherProgress(48, 64, 1234.4, 4.0, 90)
    assert known.text() == "[teacher] 48/64 rows · 1,234 tok/s · ETA 4s"
    assert known.fraction() == 0.75
    unknown = c.TeacherProgress(48, None, 300.0, 4.0, 90)
    assert unknown.text() == "[teacher] 48 rows · 300 tok/s · 1m30s elapsed" and unknown.fraction() is None


def test_train_progress_from_records_leaves_the_warm_up_step_out_of_the_eta():
    records = [{"step": 1, "loss": 5.0, "tokens_per_s": 10.0, "step_s": 60.0}] + \
              [{"step": s, "loss": 5.0 - s / 10, "tokens_per_s": 800.0, "step_s": 2.0} for s in range(2, 5)]
    p = c.train_progress(records, 12, elapsed_s=70)
    assert (p.step, p.loss, p.tokens_per_s, p.step_s) == (4, pytest.approx(4.6), 800.0, 2.0)
    assert p.text() == "[train] step 4/12 · loss 4.6000 · 800 tok/s · ETA 16s"  # 8 steps left at 2 s
    assert p.fraction() == pytest.approx(4 / 12)
    done = c.train_progress(records + [{"step": 12, "loss": 1.0, "tokens_per_s": 800.0, "step_s": 2.0}], 12, elapsed_s=95)
    assert done.text() == "[train] step 12/12 · loss 1.0000 · 800 tok/s · 1m35s elapsed"
    assert c.train_progress([], 12, elapsed_s=20).text() == "[train] workers starting · 20s"
    # Checkpoint saves between steps: the wall-clock rate, when known, sets the ETA.
    assert c.train_progress(records, 12, elapsed_s=70, steps_per_s=0.1).text().endswith("ETA 1m20s")


def test_a_terminal_gets_one_line_redrawn_in_place():
    out, clock = io.StringIO(), Clock()
    con = c.Console(out, tty=True, clock=clock, columns=200)
    con.begin()
    con.progress("[train] step 1/4", 0.25)
    clock.t += 1
    con.progress("[train] step 2/4", 0.5)
    con.line("==> [train] succeeded in 9s")  # a permanent line lifts the bar above itself and redraws it
    con.end()
    text = out.getvalue()
    assert "\n" not in text.split("==> [train]")[0]  # the progress updates never start a new line
    assert text.count("\r") >= 4
    assert "[#####---------------] [train] step 1/4" in text and "[##########----------] [train] step 2/4" in text
    assert "==> [train] succeeded in 9s\n" in text
    assert text.endswith("\r\x1b[K")  # cleared at the end


def test_a_pipe_gets_a_plain_progress_line_per_interval():
    out, log, clock = io.StringIO(), io.StringIO(), Clock()
    con = c.Console(out, tty=False, log=log, interval_s=30, clock=clock)
    con.begin()
    for step in range(1, 61):  # one update a second for a minute
        clock.t += 1
        con.progress(f"[train] step {step}/60", step / 60)
    con.line("==> [train] succeeded in 60s")
    lines = out.getvalue().splitlines()
    assert lines == ["[train] step 30/60", "[train] step 60/60", "==> [train] succeeded in 60s"]
    assert "\r" not in out.getvalue() and "#" not in out.getvalue()
    assert log.getvalue().splitlines() == lines  # the log gets the same story


def test_watcher_prints_the_final_train_state_once_it_ends():
    out = io.StringIO()
    con = c.Console(out, tty=False, interval_s=3600)
    records = [{"step": s, "loss": 2.0, "tokens_per_s": 100.0, "step_s": 1.0} for s in (1, 2, 3)]
    with c.ProgressWatcher(con, lambda elapsed: c.train_progress(records, 3, elapsed), final=True, poll_s=3600):
        pass
    assert out.getvalue().startswith("[train] step 3/3 · loss 2.0000 · 100 tok/s")


def test_lines_that_reach_the_console():
    keep = ["==> [teacher] starting (10:00:00): never ran", "[teacher] 64 signal rows (9 held out) in /r/signals; 0 rejected",
            "[train] exported /r/student", "[eval] KL to teacher: 0.1", "[serve-check] 'hi' -> 'there'", "error: boom",
            "[raydistill] bf16 self-test: passed"]
    drop = ["INFO 12-02 10:00:00 [core.py:1] vLLM engine", "(RayTrainWorker pid=1) [train] step 1/12 loss 5.0",
            "2026-12-02 10:00:00,000\tINFO worker.py:1 -- Started a local Ray instance.", "Running Dataset: ...", ""]
    assert all(c.is_console_line(line) for line in keep)
    assert not any(c.is_console_line(line) for line in drop)


def test_router_sends_everything_to_the_log_and_only_our_lines_to_the_console():
    out, log = io.StringIO(), io.StringIO()
    con = c.Console(out, tty=False, log=log)
    router = c.LineRouter(log, con)
    print("INFO vllm engine started", file=router)
    router.write("==> [train] star")  # partial lines wait for their end
    assert out.getvalue() == ""
    router.write("ting\n[train] 60 training sequences\nnoise\n")
    assert out.getvalue() == "==> [train] starting\n[train] 60 training sequences\n"
    assert log.getvalue() == "INFO vllm engine started\n==> [train] starting\n[train] 60 training sequences\nnoise\n"


def test_teacher_shards_count_rows_and_tokens_of_complete_shards(tmp_path):
    signals = tmp_path / "signals"
    signals.mkdir()
    old = pa.table({"id": ["a", "b"], "input_ids": [[1, 2, 3], [4, 5]]})
    pq.write_table(old, signals / "old.parquet")  # an earlier attempt's shard: counted as done, not in the rate
    sample = c.TeacherShards(signals, total=lambda: 6)
    first = sample(1.0)
    assert (first.rows, first.total, first.rows_per_s) == (2, 6, None)
    pq.write_table(pa.table({"id": ["c"], "input_ids": [[1] * 10]}), signals / "s1.parquet")
    (signals / "s2.parquet").write_bytes(b"PAR1 half written")  # no footer yet: skipped until complete
    assert sample(2.0).rows == 3
    pq.write_table(pa.table({"id": ["d", "e"], "input_ids": [[1] * 10, [1] * 10]}), signals / "s2.parquet")
    later = sample(3.0)
    assert later.rows == 5 and later.rows_per_s is not None and later.rows_per_s > 0
    assert later.tokens_per_s is not None and later.tokens_per_s > 0
    assert later.text().startswith("[teacher] 5/6 rows · ")


def test_train_log_reads_only_this_attempts_steps(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text(json.dumps({"step": 9, "loss": 9.0, "tokens_per_s": 1.0, "step_s": 1.0}) + "\n")  # an earlier run's
    log = c.TrainLog(path, total=lambda: 12)
    assert log(5.0).step == 0
    with open(path, "a") as f:
        f.write(json.dumps({"event": "resumed_from", "step": 4}) + "\n")
        f.write(json.dumps({"step": 5, "loss": 3.0, "tokens_per_s": 50.0, "step_s": 2.0}) + "\n")
        f.write('{"step": 6, "lo')  # half a line: read on the next poll
    p = log(6.0)
    assert (p.step, p.total, p.loss, p.resumed_from) == (5, 12, 3.0, 4)
    with open(path, "a") as f:
        f.write('ss": 2.5, "tokens_per_s": 50.0, "step_s": 2.0}\n')
    assert log(7.0).step == 6 and log(7.0).loss == 2.5


def test_corpus_rows_hint(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y"}\n')
    pq.write_table(pa.table({"prompt": ["p"] * 5}), tmp_path / "b.parquet")
    assert c.corpus_rows_hint(str(tmp_path / "a.jsonl"), "jsonl") == 2
    assert c.corpus_rows_hint(str(tmp_path / "*.parquet"), "parquet") == 5
    assert c.corpus_rows_hint("s3://bucket/corpus.jsonl", "jsonl") is None
    assert c.corpus_rows_hint(str(tmp_path / "a.jsonl"), "jsonl", limit_bytes=4) is None


def test_quiet_driver_keeps_library_and_native_output_off_the_console(tmp_path):
    """Run in a child process: it points fds 1 and 2 at the log, which pytest's own capture must not see."""
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import logging, os, subprocess, sys
        from raydistill.jobs.console import held_output, quiet_driver
        with held_output() as held:  # before the run directory is known
            os.write(2, b"early noise\\n")
        try:
            with held_output():
                os.write(1, b"said before a bad spec\\n")
                raise KeyError("spec")
        except KeyError:
            pass
        with quiet_driver({str(tmp_path / "logs")!r}, preamble=held.text) as s:
            print("==> [teacher] starting")
            logging.getLogger("vllm").warning("engine noise")
            os.write(1, b"native noise\\n")
            subprocess.run([sys.executable, "-c", "print('child noise')"])
            print("error: shown on stderr", file=sys.stderr)
            s.console.line("[train] step 3/12")
        print("after: back on stdout")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["==> [teacher] starting", "[train] step 3/12", "after: back on stdout"]
    assert proc.stderr.splitlines() == ["said before a bad spec", "error: shown on stderr"]  # an error shows what was held
    log = (tmp_path / "logs" / "driver.log").read_text()
    assert "early noise" not in proc.stdout + proc.stderr
    for text in ("early noise", "==> [teacher] starting", "engine noise", "native noise", "child noise", "error: shown on stderr", "[train] step 3/12"):
        assert text in log


def test_a_failing_stage_says_so_and_names_its_logs(tmp_path, capsys):
    from raydistill.jobs.manifest import Manifest
    from raydistill.jobs.pipeline import Step, _run_step, failed_stage
    from raydistill.jobs.rundir import RunDir
    from raydistill.jobs.stages import Stage, StageContext

    def boom(ctx):
        raise ValueError("the teacher's engines died")

    run = RunDir.of(tmp_path)
    out = io.StringIO()
    session = c.ConsoleSession(c.Console(out, tty=False), tmp_path / "logs", verbose=False)
    step = Step(Stage("eval", boom, reads=()), "run", "never ran", "f" * 16, {}, {}, None)
    with pytest.raises(ValueError) as info:
        _run_step(step, StageContext(None, run, "teacher", None), Manifest(tmp_path), session)
    assert failed_stage(info.value)
    shown = "".join(__import__("traceback").format_exception_only(type(info.value), info.value))
    assert "ValueError: the teacher's engines died" in shown
    assert f"raydistill: the eval stage failed; read {tmp_path / 'logs' / 'driver.log'}" in shown
    assert "==> [eval] failed after" in capsys.readouterr().out
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["eval"]["status"] == "failed"
    assert not failed_stage(ValueError("not from a stage"))


def test_verbose_hides_nothing_and_shows_plain_progress(tmp_path, capsys):
    with c.quiet_driver(tmp_path / "logs", verbose=True, preamble="held vllm import line\n") as session:
        print("INFO vllm engine noise")
        session.console.progress("[train] step 1/2", 0.5)  # not due yet: plain lines come once per interval
        session.console.line("==> [train] succeeded in 3s")
    out = capsys.readouterr().out
    assert out.splitlines() == ["held vllm import line", "INFO vllm engine noise", "==> [train] succeeded in 3s"]
    assert "\r" not in out and not session.console.tty
    assert not (tmp_path / "logs" / "driver.log").exists()


def test_the_loops_progress_follows_the_latest_round(tmp_path):
    from raydistill.jobs.console import RoundsTrainLog

    watch = RoundsTrainLog(tmp_path, rounds=3, total=lambda: 4)
    assert watch(1.0).text() == "[train] workers starting · 1s"
    first = tmp_path / "0" / "train" / "progress.jsonl"
    first.parent.mkdir(parents=True)
    first.write_text(json.dumps({"step": 4, "loss": 1.5, "tokens_per_s": 100.0, "step_s": 1.0}) + "\n")
    progress = watch(5.0)
    assert progress.text().startswith("[train] round 1/3 · step 4/4 · loss 1.5000") and progress.fraction() == 1 / 3
    second = tmp_path / "1" / "train" / "progress.jsonl"
    second.parent.mkdir(parents=True)
    second.write_text(json.dumps({"step": 2, "loss": 1.25, "tokens_per_s": 100.0, "step_s": 1.0}) + "\n")  # written before it was seen
    progress = watch(9.0)
    assert progress.text().startswith("[train] round 2/3 · step 2/4 · loss 1.2500") and progress.fraction() == (1 + 0.5) / 3

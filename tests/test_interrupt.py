"""Ctrl-C and SIGTERM on `florg run`: a prompt stop, status 'interrupted', the resume command, no process left."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

STOP_WITHIN = 10.0  # seconds from the signal to the exit of `florg run`


def _cmd(*args):
    return [sys.executable, "-m", "florg.cli.main", "run", *args]


def _sets(tiny_overrides, tmp_path, name, rounds):
    out = []
    for s in [*tiny_overrides, f"train.rounds={rounds}", f"out_dir={tmp_path}", f"name={name}"]:
        out += ["--set", s]
    return out


def _rows(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _gone(pids):
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _interrupt(tmp_path, tiny_overrides, name, signum, to_group):
    """Start a run, wait until round 1 is under way, signal it; (output, exit code, seconds to exit, tree)."""
    run_dir = tmp_path / name
    proc = subprocess.Popen(_cmd(*_sets(tiny_overrides, tmp_path, name, rounds=3)), env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(r["round"] == 0 for r in _rows(run_dir)):  # round 0 evaluated: round 1's training is next
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            if time.monotonic() > deadline:
                pytest.fail("round 1 did not start in time")
            time.sleep(0.2)
        time.sleep(1.0)  # inside round 1: the clients are training
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert tree, "the simulation should have started Ray processes"
        t0 = time.monotonic()
        if to_group:  # Ctrl-C in a terminal: the whole foreground process group gets SIGINT
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        try:
            proc.wait(timeout=STOP_WITHIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"florg run still running {STOP_WITHIN:.0f} s after {signal.Signals(signum).name}")
        seconds = time.monotonic() - t0
        output = proc.stdout.read()
        return output, proc.returncode, seconds, tree
    finally:
        if proc.poll() is None:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.kill()
            proc.wait(timeout=30)


def _check_stopped(tmp_path, name, output, code, tree, signum):
    run_dir = tmp_path / name
    assert code == 128 + signum, output[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert f"florg run --resume {run_dir}" in " ".join(output.split()), output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    time.sleep(0.5)  # a process killed at the very end may need a moment to be reaped by its parent
    assert not _gone(tree), f"processes left behind: {_gone(tree)}"


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path, tiny_overrides):
    output, code, seconds, tree = _interrupt(tmp_path, tiny_overrides, "sigint", signal.SIGINT, to_group=True)
    _check_stopped(tmp_path, "sigint", output, code, tree, signal.SIGINT)
    assert seconds < STOP_WITHIN

    run_dir = tmp_path / "sigint"
    done = max(r["round"] for r in _rows(run_dir))
    assert done < 3
    resumed = subprocess.run(_cmd("--resume", str(run_dir)), env=dict(os.environ),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
    assert [r["round"] for r in _rows(run_dir)] == [0, 1, 2, 3], done


@pytest.mark.slow
def test_sigterm_stops_cleanly(tmp_path, tiny_overrides):
    output, code, seconds, tree = _interrupt(tmp_path, tiny_overrides, "sigterm", signal.SIGTERM, to_group=False)
    _check_stopped(tmp_path, "sigterm", output, code, tree, signal.SIGTERM)
    assert seconds < STOP_WITHIN

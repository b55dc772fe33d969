"""Crash and exact resume: SIGKILL the server mid-run, `florg run --resume`, compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file


def _cmd(*args):
    return [sys.executable, "-m", "florg.cli.main", "run", *args]


def _sets(tiny_overrides, tmp_path, name):
    out = []
    for s in [*tiny_overrides, "train.rounds=4", "data.max_test_examples=60", f"out_dir={tmp_path}", f"name={name}"]:
        out += ["--set", s]
    return out


def _kill_tree(proc):
    """SIGKILL the process and every descendant it started (and only those)."""
    try:
        parent = psutil.Process(proc.pid)
        family = [parent] + parent.children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
    proc.wait(timeout=30)
    return [p.pid for p in family]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "timing"} for r in rows]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_overrides):
    env = dict(os.environ)
    full = subprocess.run(_cmd(*_sets(tiny_overrides, tmp_path, "full")), env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    run_dir = tmp_path / "crash"
    proc = subprocess.Popen(_cmd(*_sets(tiny_overrides, tmp_path, "crash")), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    pids = []
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:  # wait until round 2 is checkpointed, then kill mid-run
            if (run_dir / "metrics.jsonl").exists() and any(r["round"] == 2 for r in _rows(run_dir)):
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.5)
        else:
            pytest.fail("round 2 was not reached in time")
    finally:
        pids = _kill_tree(proc)
    assert all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "running"
    assert (run_dir / "checkpoint.json").is_file() and not (run_dir / "checkpoint.pt").exists()
    assert len(list(run_dir.glob("checkpoint-*.safetensors"))) == 1  # the pair: JSON + one tensor file

    resumed = subprocess.run(_cmd("--resume", str(run_dir)), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"

    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]  # nothing lost, nothing duplicated
    assert _strip(rows) == _strip(_rows(tmp_path / "full"))
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key  # bit-identical

    again = subprocess.run(_cmd("--resume", str(run_dir)), env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already complete" in again.stderr

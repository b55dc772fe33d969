"""Running a study's phases: one run at a time, claimed with a lock file, timed (wall and CPU), copied.

* :func:`run_phase`: run (or resume) a phase (``florg study run FILE --phase PHASE``); the reports are
  rewritten after every run (:func:`write_reports`, :mod:`florg.study.report`);
* :func:`run_one`: one run from scratch in its run directory (``florg.fl.simulation.run_simulation_engine``),
  its small files then copied to the results folder with ``study_run.json`` (wall and CPU seconds);
* :class:`TreeCPU`: CPU seconds of this process and its descendants (Ray's workers included);
* :func:`measured_costs`: the recorded runs' mean wall and CPU seconds per phase (``florg study plan``).

What runs is planned by :mod:`florg.study.selection` from the study file (:mod:`florg.study.spec`).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from florg.config import load_config
from florg.run.rundir import RunDir

from .report import write_study_reports
from .selection import plan_phase, recorded_status, result_path, run_done
from .spec import COPIED, PHASES, Log, Study, StudyError, StudySpec

__all__ = ["TreeCPU", "measured_costs", "run_one", "run_phase", "write_reports"]


# ----------------------------------------------------------------------------------- running


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(prefix + k)
    return keys


def _comparable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    d = json.loads(json.dumps(cfg))
    d.pop("out_dir", None)
    d.pop("name", None)
    return d


def _check_recorded(study: Study, spec: StudySpec) -> None:
    """Refuse a run whose recorded config differs from the planned one."""
    path = result_path(study, spec) / "config.toml"
    if not path.is_file():
        return
    recorded = load_config(path).to_dict()
    diff = _config_diff(_comparable(recorded), _comparable(spec.cfg.to_dict()))
    if diff:
        raise StudyError(
            f"run '{spec.rel}' in {study.results_dir} was made with a different config ({', '.join(diff[:6])}); "
            "the study file changed since: restore it, set another study.results_dir, or move the old runs away"
        )


def _copy_results(study: Study, spec: StudySpec, run_path: Path, timing: dict[str, Any]) -> None:
    """Copy the run's small files into the results folder (a temporary folder renamed into place)."""
    dest = result_path(study, spec)
    tmp = dest.parent / f".{dest.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in COPIED:
        if (run_path / name).is_file():
            shutil.copy2(run_path / name, tmp / name)
    (tmp / "study_run.json").write_text(json.dumps(timing, indent=2, sort_keys=True))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


class TreeCPU:
    """CPU seconds (user + system) of this process and all its descendants while running.

    Ray's worker processes are not reaped by this process, so ``RUSAGE_CHILDREN`` misses them; a
    background thread samples the process tree (psutil) every ``interval`` seconds instead and keeps
    each process's last reading (a process that ends between two samples loses at most one interval).
    """

    def __init__(self, interval: float = 2.0) -> None:
        self._psutil = psutil
        self._me = psutil.Process()
        self._interval = interval
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        t = self._me.cpu_times()
        self._self0 = t.user + t.system
        self._children0 = {key: v for key, v in self._sample_children().items()}

    def _sample_children(self) -> dict[tuple[int, float], float]:
        out = {}
        for proc in self._me.children(recursive=True):
            try:
                t = proc.cpu_times()
                out[(proc.pid, proc.create_time())] = t.user + t.system
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                continue
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._seen.update(self._sample_children())

    def __enter__(self) -> TreeCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._seen.update(self._sample_children())

    @property
    def self_seconds(self) -> float:
        t = self._me.cpu_times()
        return t.user + t.system - self._self0

    @property
    def children_seconds(self) -> float:
        return sum(v - self._children0.get(k, 0.0) for k, v in self._seen.items())


def run_one(study: Study, spec: StudySpec, reporter: Callable[[dict[str, Any]], None] | None = None,
            verbose: bool = False) -> dict[str, Any]:
    """Run ``spec`` from scratch into its run directory and copy its small files to the results folder."""
    # lazy: florg.cli.main imports this module: keeps florg --help under 1 s (flwr, torch)
    from florg.fl import simulation

    path = study.runs_dir / spec.rel
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    error = None
    with TreeCPU() as cpu:
        try:
            simulation.run_simulation_engine(spec.cfg, RunDir.create(spec.cfg, path),
                                             reporter=reporter or (lambda row: None), verbose=verbose)
        except (KeyboardInterrupt, simulation.RunInterrupted):
            raise  # Ctrl-C or SIGTERM stops the study; the run in flight starts again on the next call
        except Exception as exc:  # noqa: BLE001 - one failed run must not stop the study
            error = f"{type(exc).__name__}: {exc}"
            if recorded_status(path) != "failed":
                RunDir(path).set_status("failed", error=error)
    timing = {"wall_seconds": time.perf_counter() - t0, "cpu_seconds_self": cpu.self_seconds,
              "cpu_seconds_children": cpu.children_seconds, "loadavg_start": list(load0),
              "loadavg_end": list(os.getloadavg()), "cpus": os.cpu_count(), "error": error}
    _copy_results(study, spec, path, timing)
    return timing


def _lock(study: Study, spec: StudySpec) -> Path | None:
    """Claim ``spec`` for this process (a lock file next to its run directory); None if another live
    process holds it. A lock left by a process that no longer exists is taken over."""
    path = study.runs_dir / f"{spec.rel}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and psutil.pid_exists(pid):
                return None
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return path
    return None


def _past_seconds(study: Study, phase: str) -> list[float]:
    """Wall seconds of the phase's runs recorded so far (for the first ETA of a new invocation)."""
    out = []
    for p in sorted(study.results_dir.glob(f"runs/*/{phase}/*/*/study_run.json")):
        try:
            out.append(float(json.loads(p.read_text())["wall_seconds"]))
        except (ValueError, KeyError, OSError):
            continue
    return out


def run_phase(study: Study, phase: str, log: Log = print, tasks: Sequence[str] | None = None,
              max_minutes: float | None = None, retry_failed: bool = False,
              reporter: Callable[[StudySpec], Callable[[dict[str, Any]], None]] | None = None,
              verbose: bool = False, deadline: float | None = None) -> dict[str, Any]:
    """Run (or resume) one phase; the reports are rewritten after every run. Returns counts and failures.

    No run starts after ``max_minutes`` (from now) or after ``deadline`` (a ``time.monotonic()`` value,
    shared by several phases)."""
    if max_minutes is not None:
        mine = time.monotonic() + 60.0 * max_minutes
        deadline = mine if deadline is None else min(deadline, mine)
    durations = _past_seconds(study, phase)
    failed: list[str] = []
    ran, tried, time_up = 0, set(), False
    unknown = [t for t in tasks or () if t not in study.tasks]
    if unknown:
        raise StudyError(f"--task: unknown {', '.join(unknown)}; valid: {', '.join(study.tasks)}")
    while not time_up:  # a pass per grid extension (tune): the runs just done may plan new ones
        specs = [s for s in plan_phase(study, phase) if not tasks or s.task in tasks]
        for spec in specs:
            _check_recorded(study, spec)
        todo = [s for s in specs if s.rel not in tried and not (run_done(study, s) == "complete" or (
            run_done(study, s) == "failed" and not retry_failed))]
        if tried and not todo:
            break
        log((f"phase {phase}: {len(specs)} run(s) planned, {len(specs) - len(todo)} done, {len(todo)} to run "
             f"(runs in {study.runs_dir}, results in {study.results_dir})") if not tried else
            (f"phase {phase}: the grid was extended past its edge for {len(todo)} new run(s) "
             f"(study.extend_grid = {study.extend_grid})"))
        if not todo:
            break
        for i, spec in enumerate(todo, 1):
            tried.add(spec.rel)
            if deadline is not None and time.monotonic() >= deadline:
                log(f"phase {phase}: time is up (--max-minutes); {len(todo) - i + 1} runs left "
                    "(run the same command again to continue)")
                time_up = True
                break
            eta = ""
            if durations:
                per = sum(durations[-20:]) / len(durations[-20:])
                eta = f", about {(len(todo) - i + 1) * per / 60:.0f} min left for this phase ({per:.0f} s per run)"
            lock = _lock(study, spec)
            if lock is None or run_done(study, spec) == "complete":
                if lock is not None:
                    lock.unlink(missing_ok=True)
                log(f"[{phase} {i}/{len(todo)}] {spec.rel}: run or being run by another process, skipped")
                continue
            log(f"[{phase} {i}/{len(todo)}] {spec.rel}{eta}")
            try:
                timing = run_one(study, spec, reporter(spec) if reporter else None, verbose)
            finally:
                lock.unlink(missing_ok=True)
            durations.append(timing["wall_seconds"])
            ran += 1
            cpu = timing["cpu_seconds_self"] + timing["cpu_seconds_children"]
            if timing["error"]:
                failed.append(spec.rel)
                log(f"[{phase} {i}/{len(todo)}] {spec.rel}: FAILED ({timing['error']})")
            log(f"[{phase} {i}/{len(todo)}] {spec.rel}: {timing['wall_seconds']:.0f} s wall, {cpu:.0f} s CPU")
            write_reports(study)
    write_reports(study)
    specs = [s for s in plan_phase(study, phase) if not tasks or s.task in tasks]
    left = sum(1 for s in specs if not run_done(study, s))
    return {"phase": phase, "planned": len(specs), "ran": ran, "left": left, "failed": failed}


# ----------------------------------------------------------------------------------- reports


def write_reports(study: Study) -> list[Path]:
    """Regenerate everything in ``results_dir`` from the copied runs (see :mod:`florg.study.report`)."""
    return write_study_reports(study)



def measured_costs(study: Study) -> dict[str, dict[str, Any]]:
    """Per phase: runs recorded in the results folder and their mean wall and CPU seconds."""
    out: dict[str, dict[str, Any]] = {}
    for phase in PHASES:
        walls, cpus = [], []
        for p in sorted(study.results_dir.glob(f"runs/*/{phase}/*/*/study_run.json")):
            try:
                t = json.loads(p.read_text())
                walls.append(float(t["wall_seconds"]))
                cpus.append(float(t["cpu_seconds_self"]) + float(t["cpu_seconds_children"]))
            except (ValueError, KeyError, OSError):
                continue
        out[phase] = {"runs": len(walls), "wall": sum(walls) / len(walls) if walls else None,
                      "cpu": sum(cpus) / len(cpus) if cpus else None}
    return out

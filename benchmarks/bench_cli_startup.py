"""Start-up time of the ``florg`` command: ``florg --help`` and ``florg --version`` in fresh processes.

The target is ``florg --help`` in at most 1.5 s. The command imports only typer, rich and florg's
config module for these; torch, transformers, PEFT and Flower load inside the commands that need
them (``florg.cli.main`` and ``import florg`` are lazy, see ``florg/__init__.py``). Each variant
runs ``--reps`` times (after one warm-up run that fills the OS file cache); the table shows the
minimum and the median wall time, and the modules of the heavy packages that a bare
``import florg.cli.main`` loaded (none expected).

``florg predict`` (issue 21, part 4), on a finished MiniLM run (``--run-dir``; by default one is
made with ``configs/tiny.toml`` in a temporary folder):

* **fail fast**: ``florg predict RUN a --top-k 0`` (a bad argument) in a fresh process: wall and
  CPU time (the child's user + sys), and the heavy packages it imported (none expected: the
  request is checked from ``config.toml`` before torch is imported);
* **model load**: :func:`florg.run.predict.load_run_model` in a fresh process, wall and CPU
  (``time.process_time``) of the load itself, after the imports (timed apart): *before*, FLoRG's
  bases drawn by every layer (a QR each, as before the change: the bases store is switched off),
  and *after*, the bases read from the experiment cache's bases file (the default);
* **end to end**: ``florg predict RUN TEXT --json`` in a fresh process (imports included).

Each figure is the median (and minimum) of ``--load-reps`` fresh processes; the load average is
recorded around each, as the machine may be shared. Target: the model load in at most 5 s.

Results: tables on stdout, ``benchmarks/results_cli_startup.json`` and the marked sections
``cli-startup`` and ``predict-startup`` of ``benchmarks/RESULTS.md``::

    .venv/bin/python -m benchmarks.bench_cli_startup [--reps 10] [--load-reps 3] [--run-dir DIR] [--skip-predict]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import HERE, loadavg, log, print_table, update_section

TARGET_S = 1.5
LOAD_TARGET_S = 5.0
HEAVY = ("torch", "transformers", "peft", "flwr", "datasets", "ray")
ROOT = HERE.parent


def _florg_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("florg")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "florg.cli.main"]


def _time(cmd: list[str], reps: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, check=True)  # warm-up: the OS file cache
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------ florg predict
#: a fresh process: the imports, then load_run_model (``slow``: the bases store switched off), timed apart
_LOAD_PROBE = """
import contextlib, json, sys, time
w0, c0 = time.perf_counter(), time.process_time()
import torch, transformers, peft, datasets
import florg.adapters, florg.run.experiment, florg.tasks, florg.train
import florg.run.predict as p
w1, c1 = time.perf_counter(), time.process_time()
if sys.argv[2] == "slow":
    p._stored_bases = lambda *args: contextlib.nullcontext()
run = p.load_run_model(sys.argv[1])
w2, c2 = time.perf_counter(), time.process_time()
print(json.dumps({"import_wall": w1 - w0, "import_cpu": c1 - c0, "load_wall": w2 - w1, "load_cpu": c2 - c1,
                  "threads": torch.get_num_threads()}))
"""

_HEAVY_PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("\\nHEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules) + "\\n"))
sys.argv = ["florg", "predict", *{args!r}]
from florg.cli.main import main
main()
"""


def _child(cmd: list[str], check: bool = True) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run ``cmd``; its wall time and its CPU time (user + sys of the child, from ``getrusage``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if check and res.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({res.returncode}): {res.stderr[-2000:]}")
    return res, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


def _make_run(folder: Path) -> Path:
    log(f"making a MiniLM run with configs/tiny.toml under {folder} (about a minute)")
    _child([*_florg_cmd(), "run", "--config", str(ROOT / "configs" / "tiny.toml"), "--set", f"out_dir={folder}",
            "--no-progress"])
    return next(p for p in folder.iterdir() if (p / "adapter" / "adapter_config.json").is_file())


def bench_predict(run_dir: Path, reps: int) -> dict[str, Any]:
    """Fail-fast, model-load (bases drawn vs stored) and end-to-end figures of ``florg predict`` on ``run_dir``."""
    res: dict[str, Any] = {"run_dir": str(run_dir), "reps": reps, "loadavg_start": loadavg()}
    bad = [str(run_dir), "a", "--top-k", "0"]
    out, _, _ = _child([sys.executable, "-c", _HEAVY_PROBE.format(heavy=HEAVY, args=bad)], check=False)
    heavy = next(line for line in reversed(out.stderr.splitlines()) if line.startswith("HEAVY="))
    res["fail_fast_exit_code"] = out.returncode
    res["fail_fast_error"] = next((line for line in out.stderr.splitlines() if line.startswith("error")), "")
    res["fail_fast_heavy_modules"] = heavy.removeprefix("HEAVY=") or "none"
    walls, cpus = [], []
    log("timing florg predict with a bad argument")
    for _ in range(reps + 1):  # the first fills the OS file cache
        _, wall, cpu = _child([*_florg_cmd(), "predict", *bad], check=False)
        walls.append(wall)
        cpus.append(cpu)
    res["fail_fast"] = {"wall": _stats(walls[1:]), "cpu": _stats(cpus[1:]), "loadavg": loadavg()}
    _child([sys.executable, "-c", _LOAD_PROBE, str(run_dir), "fast"])  # warm-up: the bases file exists after it
    for variant, label in (("slow", "before: bases drawn (QR per layer)"), ("fast", "after: bases from the cache")):
        log(f"timing load_run_model, {label}")
        rows = [json.loads(_child([sys.executable, "-c", _LOAD_PROBE, str(run_dir), variant])[0].stdout.splitlines()[-1])
                for _ in range(reps)]
        res[variant] = {"label": label, **{k: _stats([r[k] for r in rows]) for k in
                                           ("import_wall", "import_cpu", "load_wall", "load_cpu")},
                        "threads": rows[0]["threads"], "loadavg": loadavg()}
    log("timing florg predict end to end")
    walls, cpus = [], []
    for _ in range(reps):
        _, wall, cpu = _child([*_florg_cmd(), "predict", str(run_dir), "a domestic animal", "--json"])
        walls.append(wall)
        cpus.append(cpu)
    res["end_to_end"] = {"wall": _stats(walls), "cpu": _stats(cpus), "loadavg": loadavg()}
    res["loadavg_end"] = loadavg()
    return res


def _predict_section(r: dict[str, Any]) -> str:
    def ws(d: dict[str, Any], a: str, b: str) -> list[str]:
        return [f"{d[a]['median']:.2f} s (min {d[a]['min']:.2f})", f"{d[b]['median']:.2f} s (min {d[b]['min']:.2f})"]

    slow, fast = r["slow"], r["fast"]
    ff = r["fail_fast"]
    rows = [
        ["`florg predict RUN a --top-k 0` (bad argument, whole process)", *ws(ff, "wall", "cpu"),
         f"{ff['loadavg'][0]:.2f}"],
        [f"`load_run_model`, {slow['label']}", *ws(slow, "load_wall", "load_cpu"), f"{slow['loadavg'][0]:.2f}"],
        [f"`load_run_model`, {fast['label']}", *ws(fast, "load_wall", "load_cpu"), f"{fast['loadavg'][0]:.2f}"],
        ["imports before the load (torch, transformers, peft, datasets, florg)", *ws(fast, "import_wall", "import_cpu"),
         f"{fast['loadavg'][0]:.2f}"],
        ["`florg predict RUN TEXT --json` (whole process)", *ws(r["end_to_end"], "wall", "cpu"),
         f"{r['end_to_end']['loadavg'][0]:.2f}"],
    ]
    load_med = fast["load_wall"]["median"]
    return "\n".join([
        "## `florg predict` start-up (`benchmarks/bench_cli_startup.py`)",
        "",
        f"A MiniLM FLoRG run (query/value, r = 4, float32; `configs/tiny.toml`); each figure is the median (min) of "
        f"{r['reps']} fresh processes, CPU = user + sys of the process (`time.process_time` inside it for the "
        f"load). torch threads: {fast['threads']}. Load average (1 min) {r['loadavg_start'][0]:.2f} at start, "
        f"{r['loadavg_end'][0]:.2f} at end; the machine was shared, so wall times swing with the load.",
        "",
        "| what | wall | CPU | load avg |",
        "|---|---:|---:|---:|",
        *[f"| {' | '.join(row)} |" for row in rows],
        "",
        f"Bad arguments: exit code {r['fail_fast_exit_code']}, heavy packages imported: "
        f"{r['fail_fast_heavy_modules']} (`{r['fail_fast_error']}`). Model-load target ({LOAD_TARGET_S:.0f} s) met: "
        f"**{'yes' if load_med <= LOAD_TARGET_S else 'no'}** (median {load_med:.2f} s, "
        f"{slow['load_wall']['median'] / max(load_med, 1e-9):.0f}x faster than drawing the bases).",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--load-reps", type=int, default=3, help="fresh processes per florg predict figure")
    ap.add_argument("--run-dir", type=Path, default=None, help="a finished MiniLM run (default: made here)")
    ap.add_argument("--skip-predict", action="store_true", help="only florg --help / --version")
    args = ap.parse_args(argv)
    probe = ("import sys, florg.cli.main; print(','.join(m for m in " + repr(HEAVY) + " if m in sys.modules))")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    res = {"loadavg_start": loadavg(), "reps": args.reps, "heavy_modules_on_import": heavy or "none"}
    rows = []
    for label, extra in (("florg --help", ["--help"]), ("florg --version", ["--version"])):
        log(f"timing {label}")
        times = _time([*_florg_cmd(), *extra], args.reps)
        res[label] = {"min_s": min(times), "median_s": statistics.median(times)}
        rows.append([label, f"{min(times):.2f} s", f"{statistics.median(times):.2f} s"])
    res["loadavg_end"] = loadavg()
    print_table(["command", "min", "median"], rows)
    (HERE / "results_cli_startup.json").write_text(json.dumps(res, indent=2))
    help_med = res["florg --help"]["median_s"]
    body = "\n".join([
        "## CLI start-up (`benchmarks/bench_cli_startup.py`)",
        "",
        f"Wall time of a fresh `florg` process, {args.reps} runs after one warm-up; target: `florg --help` in at "
        f"most {TARGET_S} s. Load average {res['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end.",
        "",
        "| command | min | median |",
        "|---|---:|---:|",
        *[f"| `{r[0]}` | {r[1]} | {r[2]} |" for r in rows],
        "",
        f"Target met: **{'yes' if help_med <= TARGET_S else 'no'}** (median {help_med:.2f} s). Heavy packages "
        f"imported by `import florg.cli.main`: {res['heavy_modules_on_import']}.",
    ])
    update_section(HERE / "RESULTS.md", "cli-startup", body)
    if args.skip_predict:
        return
    with tempfile.TemporaryDirectory(prefix="florg-bench-predict-") as tmp:
        run_dir = args.run_dir or _make_run(Path(tmp))
        res["predict"] = bench_predict(run_dir, args.load_reps)
    (HERE / "results_cli_startup.json").write_text(json.dumps(res, indent=2))
    section = _predict_section(res["predict"])
    print(section)
    update_section(HERE / "RESULTS.md", "predict-startup", section)


if __name__ == "__main__":
    main()

"""Start-up time of the ``florg`` command: ``florg --help`` and ``florg --version`` in fresh processes.

The target is ``florg --help`` in at most 1.5 s. The command imports only typer, rich and florg's
config module for these; torch, transformers, PEFT and Flower load inside the commands that need
them (``florg.cli.main`` and ``import florg`` are lazy, see ``florg/__init__.py``). Each variant
runs ``--reps`` times (after one warm-up run that fills the OS file cache); the table shows the
minimum and the median wall time, and the modules of the heavy packages that a bare
``import florg.cli.main`` loaded (none expected).

Results: a table on stdout, ``benchmarks/results_cli_startup.json`` and the marked section
``cli-startup`` of ``benchmarks/RESULTS.md``::

    .venv/bin/python -m benchmarks.bench_cli_startup [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import HERE, loadavg, log, print_table, update_section

TARGET_S = 1.5
HEAVY = ("torch", "transformers", "peft", "flwr", "datasets", "ray")


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
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


if __name__ == "__main__":
    main()

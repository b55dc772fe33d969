"""``florg study``: plan, run and report a study (:mod:`florg.study`)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from florg.config import ConfigError
from florg.study.execution import measured_costs, run_phase, write_reports
from florg.study.selection import done_counts, planned_counts
from florg.study.spec import PHASES, load_study

from .common import console, err_console, fail, fmt_bytes

__all__ = ["study_app"]

study_app = typer.Typer(no_args_is_help=True, help="A comparison with an equal tuning budget: lr sweep and FLoRG "
                        "variants selected on validation, then final seeds on the test split (florg.study).")
StudyFile = Annotated[Path, typer.Argument(help="Study file, e.g. configs/studies/h12.toml.")]
StudySet = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a [study] key: --set "
                                                       "study.final_seeds=[0,1] (repeatable).")]


def _load_study(path: Path, overrides: list[str] | None):  # noqa: ANN202
    try:
        return load_study(path, overrides or [])
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable


@study_app.command("plan")
def study_plan(
    file: StudyFile,
    set_: StudySet = None,
    seconds_per_run: Annotated[float | None, typer.Option("--seconds-per-run", help="Project with this wall time "
                                                             "per run instead of the runs recorded so far.")] = None,
) -> None:
    """Print the number of runs of every phase, how many are done, and the projected time left."""
    study = _load_study(file, set_)
    counts = planned_counts(study)
    done = done_counts(study)
    costs = measured_costs(study)  # every recorded run's cost, planned now or not
    measured = [c for c in costs.values() if c["runs"]]
    overall = (sum(c["wall"] * c["runs"] for c in measured) / sum(c["runs"] for c in measured)) if measured else None
    cpu_all = [c for c in costs.values() if c["cpu"]]
    cpu_overall = (sum(c["cpu"] * c["runs"] for c in cpu_all) / sum(c["runs"] for c in cpu_all)) if cpu_all else None
    cores = os.cpu_count() or 1
    table = Table(title=f"{study.title} ({file})")
    for col in ("phase", "runs", "done", "left", "wall s/run", "CPU s/run", "left (wall)", f"left (CPU/{cores})"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    total = total_cpu = 0.0
    for phase in PHASES:
        c = costs.get(phase, {"runs": 0, "wall": None, "cpu": None})
        per = seconds_per_run or c["wall"] or overall
        cpu = c["cpu"] or cpu_overall
        left = max(counts[phase] - done[phase], 0)
        total += left * (per or 0.0)
        total_cpu += left * (cpu or 0.0) / cores
        table.add_row(phase, str(counts[phase]), str(done[phase]), str(left),
                      f"{c['wall']:.0f}" if c["wall"] else "–", f"{c['cpu']:.0f}" if c["cpu"] else "–",
                      f"{left * per / 60:.0f} min" if per else "–", f"{left * cpu / cores / 60:.0f} min" if cpu else "–")
    console.print(table)
    if seconds_per_run or overall:
        console.print(f"projected time left: {total / 3600:.1f} h"
                      + ("" if seconds_per_run else " (from the wall time of the runs recorded so far)")
                      + (f"; {total_cpu / 3600:.1f} h if the measured CPU time used all {cores} cores (a quiet "
                         "machine's lower bound)" if total_cpu else ""), markup=False)
    else:
        console.print("no run recorded yet: pass --seconds-per-run to project", markup=False)


@study_app.command("run")
def study_run(
    file: StudyFile,
    phase: Annotated[str, typer.Option("--phase", help="florg-best, tune, final, or all (in that order).")] = "all",
    task: Annotated[list[str] | None, typer.Option("--task", help="Only this task (repeatable).")] = None,
    max_minutes: Annotated[float | None, typer.Option("--max-minutes", help="Start no new run after this many "
                                                         "minutes (run again to continue).")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run again the runs recorded as failed.")] = False,
    set_: StudySet = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's own INFO logs.")] = False,
) -> None:
    """Run (or resume) a phase of a study; tables and plots in the results folder are rewritten after every run."""
    # lazy: keeps florg --help under 1 s (torch)
    from florg.run.experiment import set_offline_env

    set_offline_env()
    study = _load_study(file, set_)
    if phase != "all" and phase not in PHASES:
        fail(f"--phase: '{phase}' is not one of {', '.join(PHASES)}, all")
    if phase == "florg-best" and study.florg_best is None:
        fail("--phase florg-best: the study file has no [florg_best] section")
    phases = [p for p in PHASES if p != "florg-best" or study.florg_best is not None] if phase == "all" else [phase]

    def reporter(spec):  # noqa: ANN001, ANN202
        total = spec.cfg.train.rounds

        def report(row: dict[str, Any]) -> None:
            shown = [(k, v) for k, v in row.items() if k.startswith(("test_", "val_", "personal_"))
                     and not k.endswith(("_min", "_max"))]
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in shown)
            console.print(f"  round {row['round']:>2}/{total}  {metrics}  bytes (cum) "
                          f"{fmt_bytes(row.get('bytes_total_cum', 0))}", markup=False)

        return report

    failed: list[str] = []
    deadline = time.monotonic() + 60.0 * max_minutes if max_minutes is not None else None  # shared by the phases
    for name in phases:
        try:
            res = run_phase(study, name, log=lambda m: console.print(m, markup=False), tasks=task,
                            retry_failed=retry_failed, reporter=reporter, verbose=verbose, deadline=deadline)
        except ConfigError as exc:
            fail(str(exc))
            return
        failed += res["failed"]
        if res["left"]:
            console.print(f"phase {name}: {res['left']} run(s) not done; run the same command again to continue",
                          markup=False)
            break
    console.print(f"results: {study.results_dir / 'results.md'}", markup=False)
    if failed:
        err_console.print(f"[bold red]failed runs:[/] {', '.join(failed)} (--retry-failed runs them again)")
        raise typer.Exit(code=1)


@study_app.command("report")
def study_report(file: StudyFile, set_: StudySet = None) -> None:
    """Rewrite the tables and plots of a study's results folder from its recorded runs."""
    study = _load_study(file, set_)
    try:
        paths = write_reports(study)
    except ConfigError as exc:
        fail(str(exc))
        return
    console.print(f"{len(paths)} files written under {study.results_dir}", markup=False)

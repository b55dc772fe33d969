"""Selection of a study on validation: the runs' results, the validation scores, the grids and the choices.

* :func:`phase_results`: the planned runs whose copy exists in the results folder (done or failed);
* :func:`validation_score`: a tuning run's score (``val_<metric>`` in its final round, or its mean over
  the last 3 rounds); a run with a round without a valid reply counts as failed;
* :func:`select_florg_best`: the FLoRG sub-study's grid, scores and chosen variant;
* :func:`row_tuning`, :func:`select_lrs`: each row's lr grid (extended past an edge where its best lr lies),
  its scores and its chosen lr (and sweep point);
* :func:`florg_best_specs`, :func:`tune_specs`, :func:`final_specs`, :func:`plan_phase`: the runs of each
  phase as the results stand; :func:`planned_counts`: runs per phase from the study file alone.

The study file and its configs are in :mod:`florg.study.spec`; running the phases in
:mod:`florg.study.execution`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from florg.config import RunConfig

from .spec import (
    PHASES,
    Study,
    StudyError,
    StudyRow,
    StudySpec,
    build_config,
    florg_row,
    run_config,
)
from .stats import final_value, last_k_mean
from .tables import MetricInfo

__all__ = [
    "broken_rounds",
    "final_specs",
    "florg_best_specs",
    "phase_results",
    "plan_phase",
    "done_counts",
    "planned_counts",
    "read_rows",
    "recorded_status",
    "result_path",
    "row_tuning",
    "run_done",
    "select_florg_best",
    "select_lrs",
    "tune_specs",
    "validation_key",
    "validation_score",
]


# --------------------------------------------------------------------------------- results


def read_rows(path: Path) -> list[dict[str, Any]]:
    p = path / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def recorded_status(path: Path) -> str | None:
    p = path / "status.json"
    return json.loads(p.read_text()).get("status") if p.is_file() else None


def result_path(study: Study, spec: StudySpec) -> Path:
    return study.results_dir / "runs" / spec.rel


def run_done(study: Study, spec: StudySpec) -> str | None:
    """'complete' / 'failed' when the run's copy exists in the results folder, else None."""
    status = recorded_status(result_path(study, spec))
    return status if status in ("complete", "failed") else None


def phase_results(study: Study, specs: Sequence[StudySpec]) -> dict[str, dict[str, Any]]:
    """``{spec.rel: {"status", "rows", "spec"}}`` for the planned runs that are done."""
    out = {}
    for spec in specs:
        status = run_done(study, spec)
        if status:
            out[spec.rel] = {"status": status, "rows": read_rows(result_path(study, spec)), "spec": spec}
    return out


# -------------------------------------------------------------------------------- selection


def _metric_info(cfg: RunConfig):  # noqa: ANN202
    return MetricInfo.of_task(cfg.data.task)


def broken_rounds(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """Rounds in which the server had no valid reply (``failed`` in the row): the global model did not move.
    A run with such a round counts as failed for the selection."""
    return [int(r["round"]) for r in rows if r.get("failed")]


def validation_key(rows: Sequence[Mapping[str, Any]], headline: str, primary: str) -> str:
    """The key a run is selected on: ``val_personal_<primary>`` for a personalised headline when the rows
    carry it, else ``val_<primary>``. Never a ``test_`` key."""
    if headline == "personal" and any(f"val_personal_{primary}" in r for r in rows):
        return f"val_personal_{primary}"
    return f"val_{primary}"


def validation_score(rows: Sequence[Mapping[str, Any]], key: str, select: str) -> float | None:
    """A tuning run's score: ``key`` in its final round (``select="final"``) or its mean over the last 3
    rounds that report it (``"last3"``); None when no round reports it."""
    if not key.startswith("val_"):
        raise ValueError(f"selection reads validation keys only, got '{key}'")
    try:
        return final_value(rows, key) if select == "final" else last_k_mean(rows, key, 3)
    except KeyError:
        return None


def _cell(runs: Sequence[dict[str, Any]], headline: str, primary: str, select: str, expected: int) -> dict[str, Any]:
    """One grid cell (a setting over its tuning seeds): per-seed scores, mean, and whether it is complete."""
    scores: dict[int, float | None] = {}
    key = None
    for r in runs:
        key = key or validation_key(r["rows"], headline, primary)
        broken = r["status"] != "complete" or broken_rounds(r["rows"])
        scores[r["spec"].seed] = None if broken else validation_score(r["rows"], key, select)
    ok = [v for v in scores.values() if v is not None]
    failed = len(ok) < len(scores)
    return {"key": key, "scores": scores, "mean": (math.fsum(ok) / len(ok)) if ok and not failed else None,
            "complete": len(scores) == expected, "failed": failed}


def _best(cells: Mapping[float, dict[str, Any]], higher: bool) -> float | None:
    """The lr with the best mean score (first in grid order on a tie); None until every cell is complete."""
    if not cells or not all(c["complete"] for c in cells.values()):
        return None
    valid = [(lr, c["mean"]) for lr, c in cells.items() if c["mean"] is not None]
    if not valid:
        return None
    best = max(v for _, v in valid) if higher else min(v for _, v in valid)
    return next(lr for lr, v in valid if v == best)


def florg_best_specs(study: Study) -> list[StudySpec]:
    fb = study.florg_best
    if not fb:
        return []
    row = study.rows.get("florg") or florg_row()
    specs = []
    for task in fb["tasks"]:
        for name, v in fb["variants"].items():
            for lr in fb["lr_grid"]:
                for seed in fb["seeds"]:
                    specs.append(StudySpec("florg-best", task, name, lr, seed,
                                           run_config(study, "florg-best", task, row, lr, seed, v["set"])))
    return specs


def select_florg_best(study: Study) -> dict[str, Any] | None:
    """The sub-study's grid, scores and choice (None without a [florg_best] section).

    Per task and variant: the best lr's mean validation score over the seeds; a variant's score is
    the mean of those over the sub-study's tasks; the best variant wins (``chosen`` is None until
    every run is done).
    """
    fb = study.florg_best
    if not fb:
        return None
    specs = florg_best_specs(study)
    done = phase_results(study, specs)
    info = _metric_info(specs[0].cfg)
    grid: dict[str, dict[str, dict[float, dict[str, Any]]]] = {}
    for task in fb["tasks"]:
        for name in fb["variants"]:
            cells = {}
            for lr in fb["lr_grid"]:
                runs = [done[s.rel] for s in specs if (s.task, s.group, s.lr) == (task, name, lr) and s.rel in done]
                cells[lr] = _cell(runs, "global", info.primary, study.select, len(fb["seeds"]))
            grid.setdefault(task, {})[name] = cells
    variant_scores: dict[str, float | None] = {}
    best_lr: dict[str, dict[str, float | None]] = {}
    for name in fb["variants"]:
        per_task = []
        for task in fb["tasks"]:
            lr = _best(grid[task][name], info.higher_is_better)
            best_lr.setdefault(task, {})[name] = lr
            per_task.append(grid[task][name][lr]["mean"] if lr is not None else None)
        variant_scores[name] = math.fsum(per_task) / len(per_task) if all(v is not None for v in per_task) else None
    complete = len(done) == len(specs)  # a variant whose every lr failed is out of the race, not a blocker
    chosen = None
    valid = {k: v for k, v in variant_scores.items() if v is not None}
    if complete and valid:
        top = max(valid.values()) if info.higher_is_better else min(valid.values())
        chosen = next(k for k, v in valid.items() if v == top)
    return {"tasks": fb["tasks"], "seeds": fb["seeds"], "lr_grid": fb["lr_grid"], "select": study.select,
            "variants": fb["variants"], "apply_to": fb["apply_to"], "grid": grid, "best_lr": best_lr,
            "variant_scores": variant_scores, "chosen": chosen,
            "chosen_settings": fb["variants"][chosen]["set"] if chosen else None,
            "runs_done": len(done), "runs_planned": len(specs)}


def _variant_for(study: Study, row: StudyRow, fb_sel: dict[str, Any] | None) -> dict[str, Any] | None:
    if not study.florg_best or (row.subrow_of or row.label) not in study.florg_best["apply_to"]:
        return None
    if not fb_sel or fb_sel["chosen"] is None:
        raise StudyError(f"row '{row.label}' takes the settings chosen by phase florg-best, which is not complete "
                         f"({fb_sel['runs_done'] if fb_sel else 0}/{fb_sel['runs_planned'] if fb_sel else '?'} runs); "
                         "run `florg study run FILE --phase florg-best` first")
    return fb_sel["chosen_settings"]


def tune_specs(study: Study, fb_sel: dict[str, Any] | None = None, strict: bool = True) -> list[StudySpec]:
    """The tuning runs (rows with their own sweep, over their grids as extended so far). Without ``strict``,
    rows that wait for the florg-best choice are left out instead of raising."""
    return [spec for task, row, variant in _rows_with_settings(study, fb_sel, strict, tuned_only=True)
            for spec in row_tuning(study, task, row, variant)["specs"]]


def _grid_step(lr: float) -> float:
    return float(f"{lr:.12g}")  # 0.0125 * 2.5 is 0.03125, not 0.031250000000000007: stable lr tags and configs


def _extension(study: Study, row: StudyRow, grid: list[float], chosen: float | None) -> float | None:
    """The next lr past the edge of ``grid`` where ``chosen`` lies (None: inside, not chosen yet, or no
    extension left). The step is the grid's own ratio at that edge."""
    if chosen is None or len(grid) < 2 or len(grid) - len(study.grid(row)) >= study.extend_grid:
        return None
    if chosen == grid[-1]:
        return _grid_step(grid[-1] * grid[-1] / grid[-2])
    if chosen == grid[0]:
        return _grid_step(grid[0] * grid[0] / grid[1])
    return None


def row_tuning(study: Study, task: str, row: StudyRow, variant: Mapping[str, Any] | None,
               with_configs: bool = True) -> dict[str, Any]:
    """One row's sweep on one task as its results stand: ``grid`` (the study's, extended past an edge where the
    best lr lies, see ``study.extend_grid``), the planned ``specs``, the ``cells`` (validation scores per lr),
    the ``chosen`` lr (None until every run of the grid is done) and the ``extended`` points.

    ``with_configs=False`` plans without building run configs (counting only: the specs' ``cfg`` is None)."""
    info = _metric_info(build_config(study, [study.tasks[task]], f"task '{task}'"))
    base = study.grid(row)
    grid: list[float] = []
    specs: list[StudySpec] = []
    cells: dict[float, dict[str, Any]] = {}
    new = list(base)
    while new:  # each pass reads the results of the new points only
        added = [StudySpec("tune", task, row.label, lr, seed,
                           run_config(study, "tune", task, row, lr, seed, variant) if with_configs else None)  # type: ignore[arg-type]
                 for lr in new for seed in study.tune_seeds]
        done = phase_results(study, added)
        for lr in new:
            cells[lr] = _cell([done[s.rel] for s in added if s.lr == lr and s.rel in done], row.headline, info.primary,
                              study.select, len(study.tune_seeds))
        specs += added
        grid = sorted([*grid, *new])
        chosen = _best({lr: cells[lr] for lr in grid}, info.higher_is_better)
        nxt = _extension(study, row, grid, chosen)
        new = [] if nxt is None else [nxt]
    specs.sort(key=lambda spec: spec.lr)  # grid order (stable: seeds stay in order)
    return {"grid": grid, "specs": specs, "cells": {lr: cells[lr] for lr in grid}, "chosen": chosen,
            "extended": [lr for lr in grid if lr not in base]}


def _rows_with_settings(study: Study, fb_sel: dict[str, Any] | None, strict: bool, tuned_only: bool = False):  # noqa: ANN202
    """``(task, row, florg-best settings)`` for every task and row; without ``strict``, rows that wait for the
    florg-best choice are skipped instead of raising."""
    for task in study.tasks:
        for row in study.rows.values():
            if tuned_only and not row.tuned:
                continue
            try:
                variant = _variant_for(study, row, fb_sel)
            except StudyError:
                if strict:
                    raise
                continue
            yield task, row, variant


def select_lrs(study: Study, fb_sel: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per task and row: the grid (as extended so far), each lr's validation scores (per tuning seed and mean)
    and the chosen lr (None until the row's tuning runs are all done, extensions included). Rows without an
    own sweep take their ``lr_from`` / ``same_training_as`` row's choice."""
    ready = {(task, row.label): variant for task, row, variant in _rows_with_settings(study, fb_sel, strict=False,
                                                                                      tuned_only=True)}
    out: dict[str, dict[str, Any]] = {}
    for task in study.tasks:
        per: dict[str, Any] = {}
        for row in study.rows.values():
            if not row.tuned:
                continue
            if (task, row.label) not in ready:  # waits for the florg-best choice
                per[row.label] = {"grid": study.grid(row), "cells": {}, "chosen": None, "key": None, "extended": []}
                continue
            t = row_tuning(study, task, row, ready[(task, row.label)])
            per[row.label] = {"grid": t["grid"], "cells": t["cells"], "chosen": t["chosen"], "extended": t["extended"],
                              "key": next((c["key"] for c in t["cells"].values() if c["key"]), None)}
        for row in study.rows.values():
            if row.subrows:  # the best sweep point (its best lr's mean validation score); None until all are chosen
                per[row.label] = _best_point(study, task, row, per)
        for row in study.rows.values():
            if not row.selects:
                if row.subrow_of:
                    continue
                src = row.lr_from or row.same_training_as
                per[row.label] = {"grid": [], "cells": {}, "chosen": per[src]["chosen"], "from": src, "key": None,
                                  "settings": dict(per[src].get("settings", {}))}
        out[task] = per
    return out


def _best_point(study: Study, task: str, row: StudyRow, per: Mapping[str, Any]) -> dict[str, Any]:
    """A swept row's choice: the sweep point whose chosen lr scores best on validation (first in order on a tie)."""
    higher = _metric_info(build_config(study, [study.tasks[task]], f"task '{task}'")).higher_is_better
    scores = {}
    for label in row.subrows:
        e = per[label]
        if e["chosen"] is None:
            scores[label] = None
            continue
        scores[label] = e["cells"][e["chosen"]]["mean"]
    chosen_point = None
    if scores and all(label in per and per[label]["chosen"] is not None for label in row.subrows):
        valid = {k: v for k, v in scores.items() if v is not None}
        if valid:
            best = max(valid.values()) if higher else min(valid.values())
            chosen_point = next(k for k, v in valid.items() if v == best)
    key = next((per[label]["key"] for label in row.subrows if per[label].get("key")), None)
    return {"grid": [], "cells": {}, "points": scores, "key": key, "from": chosen_point,
            "chosen": per[chosen_point]["chosen"] if chosen_point else None,
            "settings": dict(study.rows[chosen_point].point) if chosen_point else {}}


def final_specs(study: Study, fb_sel: dict[str, Any] | None, lrs: Mapping[str, Mapping[str, Any]],
                strict: bool = True) -> list[StudySpec]:
    """The final runs: every row at its chosen lr x the final seeds (a ``same_training_as`` row: one run,
    the first final seed). Without ``strict``, rows whose lr is not chosen yet are left out."""
    specs = []
    for task, row, variant in _rows_with_settings(study, fb_sel, strict):
        if row.subrow_of:
            continue  # a sweep point: tuning only
        lr = lrs[task][row.label]["chosen"]
        if lr is None:
            if strict:
                raise StudyError(f"task '{task}', row '{row.label}': no lr chosen yet (its tuning runs are not all "
                                 "done); run `florg study run FILE --phase tune` first")
            continue
        seeds = study.final_seeds[:1] if row.same_training_as else study.final_seeds
        for seed in seeds:
            specs.append(StudySpec("final", task, row.label, lr, seed,
                                   run_config(study, "final", task, row, lr, seed, variant,
                                              lrs[task][row.label].get("settings"))))
    return specs


def plan_phase(study: Study, phase: str, strict: bool = True) -> list[StudySpec]:
    """The runs of ``phase`` (``florg-best``, ``tune``, ``final``) as the study's results stand now."""
    if phase not in PHASES:
        raise StudyError(f"--phase: '{phase}' is not one of {', '.join(PHASES)}, all")
    if phase == "florg-best":
        return florg_best_specs(study)
    fb_sel = select_florg_best(study)
    if phase == "tune":
        return tune_specs(study, fb_sel, strict)
    return final_specs(study, fb_sel, select_lrs(study, fb_sel), strict)


# --------------------------------------------------------------------------------- the plan


def done_counts(study: Study) -> dict[str, int]:
    """Runs per phase that are planned now and done (complete or failed). Runs in the results folder that the
    study no longer plans (e.g. at a grid point the study file dropped) are not counted."""
    out = {}
    for phase in PHASES:
        try:
            specs = plan_phase(study, phase, strict=False)
        except StudyError:  # a phase that waits for an earlier one
            specs = []
        out[phase] = sum(1 for spec in specs if run_done(study, spec))
    return out


def planned_counts(study: Study) -> dict[str, int]:
    """Runs per phase, counted from the study file alone (no selection needed)."""
    fb = study.florg_best
    n_fb = (len(fb["tasks"]) * len(fb["variants"]) * len(fb["lr_grid"]) * len(fb["seeds"])) if fb else 0
    # the grids as extended so far (an extension is planned once the grid before it is done)
    n_tune = sum(len(row_tuning(study, task, r, None, with_configs=False)["grid"]) * len(study.tune_seeds)
                 for task in study.tasks for r in study.rows.values() if r.tuned)
    n_final = len(study.tasks) * sum(1 if r.same_training_as else len(study.final_seeds) for r in study.final_rows())
    return {"florg-best": n_fb, "tune": n_tune, "final": n_final}


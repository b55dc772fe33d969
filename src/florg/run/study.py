"""``florg study``: a comparison with an equal tuning budget, selection on validation, and final seeds.

A study is one TOML file (``configs/studies/*.toml``; format below). It runs in three phases, each
resumable and each started by one command (``florg study run FILE --phase PHASE``):

1. ``florg-best`` (optional): FLoRG's open choices (named *variants*, e.g. Procrustes variant, init
   scale, lr schedule, optimizer state) x the lr grid x the tuning seeds, on the **validation**
   split. The variant with the best validation score (mean over tuning seeds at its best lr,
   averaged over the sub-study's tasks) is applied to the FLoRG rows of the next phases.
2. ``tune``: every row x the lr grid x the tuning seeds, scored on the **validation** split.
   Per task and row the lr with the best mean validation score is chosen; where it lies at an edge
   of the grid, the row's grid is extended past that edge by the grid's own geometric step (at most
   ``study.extend_grid`` points per row and task) and the phase runs the new points. Tuning runs evaluate the
   validation split in the last 3 rounds and the test split only at round 0 and the final round;
   the selection reads ``val_<metric>`` (``val_personal_<metric>`` for a personalised headline when
   the rows carry it) and nothing else.
3. ``final``: every row at its chosen lr x the final seeds (other seeds than the tuning seeds), scored
   on the **test** split every round (the validation split stays held out, so clients train on
   exactly the data of the tuning runs, but is not evaluated).

Run directories live under ``study.runs_dir`` (adapters, checkpoints: not for version control).
When a run ends, its small files (``config.toml``, ``metrics.jsonl``, ``summary.json``,
``partitions.json``, ``status.json`` and ``study_run.json`` with its wall and CPU time) are copied to
``<results_dir>/runs/<task>/<phase>/<row>/lr<lr>-seed<seed>/`` and every table and plot of
``results_dir`` is regenerated from those copies: the results folder can be committed after every
run. A run counts as done once its copy exists; a run that was cut short (killed process, machine
restart) is started again from scratch, so an interruption loses at most the run in flight. A run
that raised an error is recorded as failed and not retried (``--retry-failed`` retries it); a
setting with a failed tuning run is never selected. A planned run whose recorded config differs from
the one the study file now gives is refused (change ``results_dir`` or move the old runs away).
Several processes may work on one study at once (e.g. one per task): each run is claimed with a
lock file next to its run directory, and a run claimed by a live process is skipped.

Study file::

    [study]
    title = "..."
    runs_dir = "runs/study"              # run directories (large)
    results_dir = "docs/results/study"   # tables, plots, per-run metrics (small, committed)
    tasks = ["wordnet", "nouns"]         # names of [tasks.*] sections
    rows = ["florg", "fedit", ...]       # registry rows (florg compare's) or [rows.*] sections
    reference = "florg"                  # paired differences are taken against this row
    lr_grid = [2e-3, 5e-3, 1e-2]
    extend_grid = 2                      # a row whose best lr is at an edge of the grid gets the next
                                         # point past it (the grid's geometric step), at most 2 per row
    tune_seeds = [100]
    final_seeds = [0, 1, 2, 3, 4]
    select = "final"                     # validation score: "final" round or "last3" mean
    target_fraction = 0.95               # bytes to target: this fraction of the best final value

    [base]                               # the run config every run starts from (as configs/compare.toml)
    ...
    [tasks.nouns]                        # per task: dotted config keys
    "data.task" = "wordnet"
    "data.classes" = [...]

    [rows.flora-hetero]                  # a row the registry does not have ...
    method = "flora"
    display = "FLoRA, ranks 2/4/8"
    set = { "method.client_ranks" = [2, 4, 8] }
    [rows.florg-noalign]                 # ... or study settings of a registry row
    lr_from = "florg"                    # no own sweep: the chosen lr of another row (an ablation)
                                         # ([rows.*] sections of rows not in study.rows are ignored,
                                         # so --set study.rows=[...] can narrow a study, e.g. a pilot)
    [rows.flora-dense]
    same_training_as = "flora"           # trains exactly as FLoRA: one run measures its bytes

    [florg_best]                         # the FLoRG sub-study (phase florg-best)
    tasks = ["wordnet"]
    seeds = [100, 101]
    apply_to = ["florg", "florg-noalign", "florg-hetero"]
    [florg_best.variants.paper]
    description = "the paper's rule, today's defaults"
    [florg_best.variants.top-r-cosine]
    "method.florg.procrustes" = "top-r"
    "train.lr_schedule" = "cosine"
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florg.config import ConfigError, RunConfig

__all__ = [
    "PHASES",
    "Study",
    "StudyRow",
    "StudySpec",
    "load_study",
    "measured_costs",
    "planned_counts",
    "plan_phase",
    "run_phase",
    "select_florg_best",
    "row_tuning",
    "select_lrs",
    "write_reports",
]

PHASES = ("florg-best", "tune", "final")
#: what the server evaluates in each phase's runs (see florg.fl.server_app.evaluated_splits)
PHASE_EVAL = {
    "florg-best": {"eval.test_rounds": "first-last", "eval.validation_rounds": "last3"},
    "tune": {"eval.test_rounds": "first-last", "eval.validation_rounds": "last3"},
    "final": {"eval.test_rounds": "all", "eval.validation_rounds": "none"},
}
#: files of a run directory copied into the results folder
COPIED = ("config.toml", "metrics.jsonl", "summary.json", "partitions.json", "status.json")
Log = Callable[[str], None]


class StudyError(ConfigError):
    """A bad study file or a phase that cannot run yet; the message says what to change."""


# ----------------------------------------------------------------------------------- the study


@dataclass
class StudyRow:
    """A row of the study: a method with settings (dotted config keys), and how it is tuned."""

    label: str
    method: str
    display: str
    settings: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False
    lr_grid: list[float] = field(default_factory=list)
    lr_from: str = ""  # no own sweep: the lr chosen for this row
    same_training_as: str = ""  # trains exactly as this row: one run measures the bytes
    headline: str = "global"
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # extra axes of the row's own sweep (dotted keys)
    subrows: list[str] = field(default_factory=list)  # labels of its sweep points (each with its own lr sweep)
    subrow_of: str = ""  # a sweep point of this row (tuning only; never a final row)
    point: dict[str, Any] = field(default_factory=dict)  # a sweep point's settings

    @property
    def selects(self) -> bool:
        """Whether the row chooses its own settings on validation (its own lr sweep, or its sweep points')."""
        return not self.lr_from and not self.same_training_as and not self.subrow_of

    @property
    def tuned(self) -> bool:
        """Whether the row runs an lr sweep of its own (a row without extra axes, or one sweep point)."""
        return not self.lr_from and not self.same_training_as and not self.subrows


@dataclass
class Study:
    path: Path
    title: str
    runs_dir: Path
    results_dir: Path
    tasks: dict[str, dict[str, Any]]
    rows: dict[str, StudyRow]
    base: dict[str, Any]
    reference: str
    lr_grid: list[float]
    tune_seeds: list[int]
    final_seeds: list[int]
    select: str
    target_fraction: float
    florg_best: dict[str, Any] | None = None
    extend_grid: int = 0  # points a row's grid may grow past an edge where its best lr lies
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # extra axes swept for every row (e.g. train.head_lr)

    def final_rows(self) -> list[StudyRow]:
        """The rows of the comparison (sweep points are tuning runs, not rows of their own)."""
        return [row for row in self.rows.values() if not row.subrow_of]

    def grid(self, row: StudyRow) -> list[float]:
        return list(row.lr_grid or self.lr_grid)


@dataclass
class StudySpec:
    """One planned run."""

    phase: str
    task: str
    group: str  # the row label (tune, final) or the variant name (florg-best)
    lr: float
    seed: int
    cfg: RunConfig

    @property
    def rel(self) -> str:
        return f"{self.task}/{self.phase}/{self.group}/{lr_tag(self.lr)}-seed{self.seed}"

    @property
    def name(self) -> str:
        return self.rel.replace("/", "-")


def lr_tag(lr: float) -> str:
    return f"lr{lr:g}"


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise StudyError(f"study file: {where}: {msg}")


def _floats(value: Any, where: str) -> list[float]:
    ok = isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                                   for v in value)
    _need(bool(ok), where, f"expected a non-empty list of positive numbers, got {value!r}")
    return [float(v) for v in value]


def _ints(value: Any, where: str) -> list[int]:
    _need(isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
          and len(set(value)) == len(value), where, f"expected a non-empty list of distinct integers, got {value!r}")
    return [int(v) for v in value]


def _count(value: Any, where: str) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= 0, where,
          f"expected a whole number >= 0 (0: a fixed grid), got {value!r}")
    return int(value)


def _settings(value: Any, where: str) -> dict[str, Any]:
    _need(isinstance(value, dict), where, f"expected a table of dotted config keys, got {value!r}")
    for key in value:
        hint = (" (a name with dots in a [section] header must be quoted, e.g. [florg_best.variants.\"init-0.03\"])"
                if isinstance(value[key], dict) else "")
        _need("." in key, where, f"'{key}' is not a dotted config key (e.g. \"method.florg.procrustes\"){hint}")
    return dict(value)


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> Study:
    """Read and check a study file (every planned config is validated before anything runs).

    ``overrides`` are ``study.<key>=<TOML value>`` strings (e.g. ``study.final_seeds=[0,1]``).
    """
    from florg.config import read_toml

    p = Path(path)
    data = read_toml(p, "study file", "configs/studies/h12.toml", error=StudyError)
    for item in overrides:
        key, sep, raw = item.partition("=")
        _need(bool(sep) and key.strip().startswith("study.") and key.count(".") == 1, "--set",
              f"'{item}' must look like study.<key>=<TOML value>, e.g. study.final_seeds=[0,1]")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        data.setdefault("study", {})[key.strip().split(".", 1)[1]] = value
    unknown = set(data) - {"study", "base", "tasks", "rows", "florg_best"}
    _need(not unknown, "top level", f"unknown section(s) {sorted(unknown)}; valid: study, base, tasks, rows, florg_best")
    s = data.get("study", {})
    known = {"title", "runs_dir", "results_dir", "tasks", "rows", "reference", "lr_grid", "extend_grid", "tune_seeds",
             "final_seeds", "select", "target_fraction", "sweep"}
    _need(not set(s) - known, "[study]", f"unknown key(s) {sorted(set(s) - known)}; valid: {', '.join(sorted(known))}")
    for key in ("runs_dir", "results_dir", "tasks", "rows", "lr_grid", "tune_seeds", "final_seeds"):
        _need(key in s, "[study]", f"'{key}' is required")
    tasks_cfg = data.get("tasks", {})
    tasks = {}
    for name in s["tasks"]:
        _need(name in tasks_cfg, "study.tasks", f"task '{name}' has no [tasks.{name}] section")
        tasks[name] = _settings(tasks_cfg[name], f"[tasks.{name}]")
    study = Study(
        path=p,
        title=str(s.get("title", p.stem)),
        runs_dir=Path(str(s["runs_dir"])),  # relative to the current directory (the repository root), like --dir
        results_dir=Path(str(s["results_dir"])),
        tasks=tasks,
        rows=_rows(s["rows"], data.get("rows", {}), _sweep(s.get("sweep", {}), "study.sweep")),
        base=data.get("base", {}),
        reference=str(s.get("reference", "florg")),
        lr_grid=_floats(s["lr_grid"], "study.lr_grid"),
        tune_seeds=_ints(s["tune_seeds"], "study.tune_seeds"),
        final_seeds=_ints(s["final_seeds"], "study.final_seeds"),
        select=str(s.get("select", "final")),
        target_fraction=float(s.get("target_fraction", 0.95)),
        extend_grid=_count(s.get("extend_grid", 0), "study.extend_grid"),
        sweep=_sweep(s.get("sweep", {}), "study.sweep"),
    )
    _need(study.select in ("final", "last3"), "study.select", f"'{study.select}' is not 'final' or 'last3'")
    _need(0.0 < study.target_fraction <= 1.0, "study.target_fraction", "must be in (0, 1]")
    _need(not set(study.tune_seeds) & set(study.final_seeds), "study.final_seeds",
          f"must not share seeds with study.tune_seeds ({sorted(set(study.tune_seeds) & set(study.final_seeds))}): "
          "a run whose validation score chose the setting would bias the final test scores")
    _need(study.reference in study.rows, "study.reference", f"'{study.reference}' is not one of study.rows")
    for row in study.rows.values():
        for other in (row.lr_from, row.same_training_as):
            _need(not other or (other in study.rows and study.rows[other].selects), f"[rows.{row.label}]",
                  f"'{other}' must be a tuned row of study.rows")
    if "florg_best" in data:
        study.florg_best = _florg_best(data["florg_best"], study)
    _check_configs(study)
    return study


#: short names of swept keys in sweep-point labels (else the key's last part)
SHORT = {"train.head_lr": "hlr", "method.florg.init_scale": "init", "method.alpha": "alpha"}


def _sweep(value: Any, where: str) -> dict[str, list[Any]]:
    _need(isinstance(value, dict), where, f"expected a table of dotted config keys and value lists, got {value!r}")
    out = {}
    for key, values in value.items():
        _need("." in key, where, f"'{key}' is not a dotted config key (e.g. \"train.head_lr\")")
        _need(isinstance(values, list) and values and len(set(map(str, values))) == len(values), f"{where}.{key}",
              f"expected a non-empty list of distinct values, got {values!r}")
        out[key] = list(values)
    return out


def point_tag(point: Mapping[str, Any]) -> str:
    """A sweep point's label part, e.g. ``hlr0.0125-init0.025``."""
    return "-".join(f"{SHORT.get(k, k.rsplit('.', 1)[-1])}{v:g}" if isinstance(v, float) else
                    f"{SHORT.get(k, k.rsplit('.', 1)[-1])}{v}" for k, v in point.items())


def _expand(row: StudyRow, axes: Mapping[str, list[Any]]) -> list[StudyRow]:
    """The row's sweep points (the product of ``axes``) as rows of their own, each with its own lr sweep."""
    import itertools

    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    subs = []
    for point in points:
        tag = point_tag(point)
        subs.append(StudyRow(label=f"{row.label}@{tag}", method=row.method, display=f"{row.display} ({tag})",
                             settings={**row.settings, **point}, ablation=row.ablation, lr_grid=row.lr_grid,
                             headline=row.headline, subrow_of=row.label, point=point))
    row.subrows = [sub.label for sub in subs]
    return subs


def _rows(labels: Any, extra: Mapping[str, Any], sweep: Mapping[str, list[Any]] | None = None) -> dict[str, StudyRow]:
    from florg.methods.registry import METHODS, compare_rows

    registry = {r.label: r for r in compare_rows()}
    _need(isinstance(labels, list) and labels and len(set(labels)) == len(labels), "study.rows",
          "expected a non-empty list of distinct row labels")
    out: dict[str, StudyRow] = {}
    for label in labels:
        spec = dict(extra.get(label, {}))
        allowed = {"method", "display", "set", "ablation", "lr_grid", "lr_from", "same_training_as", "sweep"}
        _need(not set(spec) - allowed, f"[rows.{label}]", f"unknown key(s) {sorted(set(spec) - allowed)}; valid: "
              f"{', '.join(sorted(allowed))}")
        if label in registry:
            reg = registry[label]
            method, display, ablation = reg.method, reg.display_name, reg.ablation
            settings = {f"method.{reg.method}.{k}": v for k, v in reg.options.items()}
            settings.update({f"method.{k}": v for k, v in reg.shared.items()})
            _need("method" not in spec or spec["method"] == method, f"[rows.{label}]",
                  f"is the registry row of method '{method}'; drop 'method' or pick another label")
        else:
            _need("method" in spec, "study.rows", f"'{label}' is neither a registry row ({', '.join(registry)}) nor "
                  f"defined in a [rows.{label}] section with a 'method'")
            method = str(spec["method"])
            _need(method in METHODS, f"[rows.{label}]", f"unknown method '{method}'; valid: {', '.join(METHODS)}")
            display, ablation, settings = label, False, {}
        settings.update(_settings(spec.get("set", {}), f"[rows.{label}].set"))
        out[label] = StudyRow(
            label=label, method=method, display=str(spec.get("display", display)), settings=settings,
            ablation=bool(spec.get("ablation", ablation)),
            lr_grid=_floats(spec["lr_grid"], f"[rows.{label}].lr_grid") if "lr_grid" in spec else [],
            lr_from=str(spec.get("lr_from", "")), same_training_as=str(spec.get("same_training_as", "")),
            headline=str(getattr(METHODS[method], "headline", "global")),
            sweep=_sweep(spec.get("sweep", {}), f"[rows.{label}].sweep"),
        )
    expanded: dict[str, StudyRow] = {}
    for label, row in out.items():
        expanded[label] = row
        axes = {**(sweep or {}), **row.sweep}
        if axes and not row.lr_from and not row.same_training_as:
            for sub in _expand(row, axes):
                expanded[sub.label] = sub
    return expanded


def _florg_best(fb: Any, study: Study) -> dict[str, Any]:
    _need(isinstance(fb, dict), "[florg_best]", "must be a table")
    allowed = {"tasks", "seeds", "lr_grid", "apply_to", "variants"}
    _need(not set(fb) - allowed, "[florg_best]",
          f"unknown key(s) {sorted(set(fb) - allowed)}; valid: {', '.join(sorted(allowed))}")
    tasks = list(fb.get("tasks", list(study.tasks)))
    for t in tasks:
        _need(t in study.tasks, "florg_best.tasks", f"'{t}' is not one of study.tasks")
    variants = fb.get("variants", {})
    _need(isinstance(variants, dict) and variants, "[florg_best.variants]", "needs at least one [florg_best.variants.<name>]")
    out_variants = {}
    for name, body in variants.items():
        body = dict(body)
        desc = str(body.pop("description", ""))
        out_variants[name] = {"description": desc, "set": _settings(body, f"[florg_best.variants.{name}]")}
    apply_to = [label for label in fb.get("apply_to", ["florg"]) if label in study.rows]  # rows not studied: ignored
    for label in apply_to:
        _need(study.rows[label].method == "florg", "florg_best.apply_to", f"'{label}' is not a FLoRG row")
    seeds = _ints(fb.get("seeds", study.tune_seeds), "florg_best.seeds")
    _need(not set(seeds) & set(study.final_seeds), "florg_best.seeds", "must not share seeds with study.final_seeds")
    return {"tasks": tasks, "seeds": seeds, "lr_grid": _floats(fb.get("lr_grid", study.lr_grid), "florg_best.lr_grid"),
            "apply_to": apply_to, "variants": out_variants}


# ---------------------------------------------------------------------------------- configs


def _deep_set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise StudyError(f"study file: '{dotted}' sets a key below '{p}', which is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _build_config(study: Study, settings: Sequence[Mapping[str, Any]], where: str) -> RunConfig:
    d = json.loads(json.dumps(study.base))
    for layer in settings:
        for key, value in layer.items():
            _deep_set(d, key, value)
    try:
        return RunConfig.from_dict(d)
    except ConfigError as exc:
        raise StudyError(f"study file: {where}: {exc}") from None


def run_config(study: Study, phase: str, task: str, row: StudyRow, lr: float, seed: int,
               variant: Mapping[str, Any] | None = None, chosen: Mapping[str, Any] | None = None) -> RunConfig:
    """The config of one run: base, task, the FLoRG variant, the row's own settings, the settings chosen on its
    sweep's extra axes (``chosen``: final runs), lr, seed, the phase's evaluation."""
    from florg.methods import get_method

    layers: list[Mapping[str, Any]] = [study.tasks[task], {"method.name": row.method}]
    if variant:
        layers.append(variant)
    layers += [row.settings, dict(chosen or {}), {"train.lr": lr, "seed": seed}, PHASE_EVAL[phase]]
    cfg = _build_config(study, layers, f"task '{task}', row '{row.label}'")
    cfg.out_dir = str(study.runs_dir)
    cfg.name = ""
    try:
        get_method(cfg)  # settings the method cannot honour fail before anything runs
    except ConfigError as exc:
        raise StudyError(f"study file: task '{task}', row '{row.label}': {exc}") from None
    return cfg


def _check_configs(study: Study) -> None:
    """Build one config per task x row (and per FLoRG variant) so that a bad key fails at load time."""
    for task in study.tasks:
        for row in study.rows.values():
            run_config(study, "tune", task, row, study.grid(row)[0], study.tune_seeds[0])
        if study.florg_best and task in study.florg_best["tasks"]:
            for v in study.florg_best["variants"].values():
                run_config(study, "florg-best", task, study.rows.get("florg") or _florg_row(), study.lr_grid[0],
                           study.florg_best["seeds"][0], v["set"])


def _florg_row() -> StudyRow:
    return StudyRow("florg", "florg", "FLoRG")


# --------------------------------------------------------------------------------- results


def _read_rows(path: Path) -> list[dict[str, Any]]:
    p = path / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _status(path: Path) -> str | None:
    p = path / "status.json"
    return json.loads(p.read_text()).get("status") if p.is_file() else None


def result_path(study: Study, spec: StudySpec) -> Path:
    return study.results_dir / "runs" / spec.rel


def _done(study: Study, spec: StudySpec) -> str | None:
    """'complete' / 'failed' when the run's copy exists in the results folder, else None."""
    status = _status(result_path(study, spec))
    return status if status in ("complete", "failed") else None


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
    from florg.config import load_config

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


def phase_results(study: Study, specs: Sequence[StudySpec]) -> dict[str, dict[str, Any]]:
    """``{spec.rel: {"status", "rows", "spec"}}`` for the planned runs that are done."""
    out = {}
    for spec in specs:
        status = _done(study, spec)
        if status:
            out[spec.rel] = {"status": status, "rows": _read_rows(result_path(study, spec)), "spec": spec}
    return out


# -------------------------------------------------------------------------------- selection


def _metric_info(cfg: RunConfig):  # noqa: ANN202
    from .report import MetricInfo

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
    from .stats import final_value, last_k_mean

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
    row = study.rows.get("florg") or _florg_row()
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
    info = _metric_info(_build_config(study, [study.tasks[task]], f"task '{task}'"))
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
    higher = _metric_info(_build_config(study, [study.tasks[task]], f"task '{task}'")).higher_is_better
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


# ----------------------------------------------------------------------------------- running


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
        import threading

        import psutil

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
    from florg.fl import simulation
    from florg.run.rundir import RunDir

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
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed run must not stop the study
            error = f"{type(exc).__name__}: {exc}"
            if _status(path) != "failed":
                RunDir(path).set_status("failed", error=error)
    timing = {"wall_seconds": time.perf_counter() - t0, "cpu_seconds_self": cpu.self_seconds,
              "cpu_seconds_children": cpu.children_seconds, "loadavg_start": list(load0),
              "loadavg_end": list(os.getloadavg()), "cpus": os.cpu_count(), "error": error}
    _copy_results(study, spec, path, timing)
    return timing


def _lock(study: Study, spec: StudySpec) -> Path | None:
    """Claim ``spec`` for this process (a lock file next to its run directory); None if another live
    process holds it. A lock left by a process that no longer exists is taken over."""
    import psutil

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
        todo = [s for s in specs if s.rel not in tried and not (_done(study, s) == "complete" or (
            _done(study, s) == "failed" and not retry_failed))]
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
            if lock is None or _done(study, spec) == "complete":
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
    left = sum(1 for s in specs if not _done(study, s))
    return {"phase": phase, "planned": len(specs), "ran": ran, "left": left, "failed": failed}


# ----------------------------------------------------------------------------------- reports


def write_reports(study: Study) -> list[Path]:
    """Regenerate everything in ``results_dir`` from the copied runs (see :mod:`florg.run.study_report`)."""
    from .study_report import write_study_reports

    return write_study_reports(study)


# --------------------------------------------------------------------------------- the plan


def planned_counts(study: Study) -> dict[str, int]:
    """Runs per phase, counted from the study file alone (no selection needed)."""
    fb = study.florg_best
    n_fb = (len(fb["tasks"]) * len(fb["variants"]) * len(fb["lr_grid"]) * len(fb["seeds"])) if fb else 0
    # the grids as extended so far (an extension is planned once the grid before it is done)
    n_tune = sum(len(row_tuning(study, task, r, None, with_configs=False)["grid"]) * len(study.tune_seeds)
                 for task in study.tasks for r in study.rows.values() if r.tuned)
    n_final = len(study.tasks) * sum(1 if r.same_training_as else len(study.final_seeds) for r in study.final_rows())
    return {"florg-best": n_fb, "tune": n_tune, "final": n_final}


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

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

This module reads and checks the study file (:func:`load_study`) and builds each run's config
(:func:`run_config`); the selection on validation and the plan of each phase are in
:mod:`florg.study.selection`, running the phases in :mod:`florg.study.execution`, the generated
results folder in :mod:`florg.study.report`.
"""

from __future__ import annotations

import itertools
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from florg.config import ConfigError, RunConfig, read_toml

__all__ = [
    "COPIED",
    "PHASES",
    "PHASE_EVAL",
    "Study",
    "StudyError",
    "StudyRow",
    "StudySpec",
    "build_config",
    "florg_row",
    "load_study",
    "lr_tag",
    "point_tag",
    "run_config",
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
    # lazy: florg.cli.main imports this module: keeps florg --help under 1 s (torch)
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


def build_config(study: Study, settings: Sequence[Mapping[str, Any]], where: str) -> RunConfig:
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
    # lazy: florg.cli.main imports this module: keeps florg --help under 1 s (torch)
    from florg.methods import get_method

    layers: list[Mapping[str, Any]] = [study.tasks[task], {"method.name": row.method}]
    if variant:
        layers.append(variant)
    layers += [row.settings, dict(chosen or {}), {"train.lr": lr, "seed": seed}, PHASE_EVAL[phase]]
    cfg = build_config(study, layers, f"task '{task}', row '{row.label}'")
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
                run_config(study, "florg-best", task, study.rows.get("florg") or florg_row(), study.lr_grid[0],
                           study.florg_best["seeds"][0], v["set"])


def florg_row() -> StudyRow:
    return StudyRow("florg", "florg", "FLoRG")



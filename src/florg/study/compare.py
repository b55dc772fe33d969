"""``florg compare``: every method on one configuration, into one compare directory.

All runs share one config: the same data partition (it follows the seed), seeds, local steps,
batch size, learning-rate schedule, rounds, adapted modules and head handling. Only
``method.name`` (and, for a named variant such as the FLoRG ablation, the options the variant sets)
differ between rows. The rows, their order and display names come from the method registry
(:func:`florg.methods.registry.compare_rows`).

Layout of a compare directory::

    <dir>/compare.json                 the shared config, methods and seeds (a resumed compare must match)
    <dir>/runs/<method>-seed<s>/       one ordinary run directory per method and seed
    <dir>/results.md                   the tables (paper layout), rewritten after every run
    <dir>/summary.json                 the same numbers, machine-readable
    <dir>/plots/<metric>_vs_round.png  the task's primary metric, mean ± std over seeds, one line per method
    <dir>/plots/<metric>_vs_bytes.png  the same against cumulative MB (linear, from round 0)
    <dir>/plots/loss_vs_round.png      the test loss

The score is the task family's primary metric: accuracy for classification (higher is better),
the held-out loss for instruction tuning (lower is better; plots ``loss_vs_round.png``, ...).

Resume: running the same compare again skips every run whose ``status.json`` says
``complete``; a run that was cut short is started again from scratch.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florg.config import ConfigError, RunConfig, apply_overrides, validate
from florg.methods import get_method
from florg.methods.registry import METHODS, compare_rows
from florg.run.plots import Series, plot_rows
from florg.run.rundir import RunDir

from .stats import bytes_to_target as _b2t
from .tables import MetricInfo, RowRuns, jsonable, majority_rate, markdown_tables, summarise_rows

__all__ = [
    "ABLATIONS",
    "COMPARE_DEFAULTS",
    "DISPLAY",
    "METHOD_ORDER",
    "RunSpec",
    "bytes_to_target",
    "compare_config",
    "parse_methods",
    "plan_runs",
    "run_compare",
    "summarise",
]


def _rows() -> dict[str, Any]:
    return {row.label: row for row in compare_rows()}


#: the rows in table order (the registry's methods and variants; ablation rows last)
METHOD_ORDER: list[str] = list(_rows())
#: label -> the name in tables and plots
DISPLAY: dict[str, str] = {label: row.display_name for label, row in _rows().items()}
#: the ablation rows (FLoRG without alignment)
ABLATIONS: list[str] = [label for label, row in _rows().items() if row.ablation]

#: the default compare configuration (identical to configs/compare.toml; a test keeps them equal).
#: The paper's setting (20 clients, r = 4, Dirichlet 0.5) sized to finish 8 runs x 1 seed in about
#: 20 minutes on a 2-core CPU.
COMPARE_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "out_dir": "runs",
    "model": {"name": "minilm", "max_length": 32},
    "data": {"task": "wordnet", "num_clients": 20, "partition": "dirichlet", "alpha": 0.5,
             "max_train_examples": 4000, "max_test_examples": 300},
    "method": {"rank": 4, "alpha": 16.0, "weighting": "examples", "train_head": True,
               "florg": {"procrustes": "paper"}, "federa": {"mode": "product_svd"},
               "fedsa-lora": {"personal_eval_examples": 64}},
    "train": {"rounds": 5, "local_steps": 8, "batch_size": 16, "lr": 5e-3, "lr_schedule": "constant",
              "optimizer": "adamw", "reset_optimizer": True},
    "federation": {"fraction_train": 1.0, "min_train_nodes": 2, "min_available_nodes": 2},
}

Log = Callable[[str], None]

#: metrics in [0, 1] shown as percentages in the tables
PERCENT_METRICS = frozenset({"accuracy", "f1", "exact_match"})


def compare_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The default compare config (:data:`COMPARE_DEFAULTS`) with ``key=value`` overrides."""
    cfg = RunConfig.from_dict(json.loads(json.dumps(COMPARE_DEFAULTS)))
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    return cfg


def parse_methods(text: str | Sequence[str] | None) -> list[str]:
    """``"fedit,florg"`` -> labels in table order; empty = all of :data:`METHOD_ORDER`."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return list(METHOD_ORDER)
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in items if t not in METHOD_ORDER]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; valid: {', '.join(METHOD_ORDER)}")
    return [m for m in METHOD_ORDER if m in items]


@dataclass
class RunSpec:
    label: str
    seed: int
    cfg: RunConfig

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


def _apply_row(cfg: RunConfig, label: str) -> None:
    """Set ``method.name`` and the row's own option values (a variant's) on ``cfg``."""
    row = _rows()[label]
    cfg.method.name = row.method
    for key, value in row.shared.items():
        setattr(cfg.method, key, value)
    for key, value in row.options.items():
        setattr(cfg.method.options(row.method), key, value)


def plan_runs(base: RunConfig, compare_dir: Path, methods: Sequence[str], seeds: int) -> list[RunSpec]:
    """One run per (seed, method), seed-major, each validated by its method before anything runs."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    specs = []
    for i in range(seeds):
        for label in methods:
            cfg = RunConfig.from_dict(base.to_dict())
            _apply_row(cfg, label)
            cfg.seed = base.seed + i
            cfg.out_dir = str(compare_dir / "runs")
            cfg.name = f"{label}-seed{cfg.seed}"
            get_method(cfg)  # ConfigError for settings the method cannot honour, before any training
            specs.append(RunSpec(label, cfg.seed, cfg))
    return specs


def _shared(cfg: RunConfig) -> dict[str, Any]:
    """The part of a config that every run of a compare shares."""
    d = cfg.to_dict()
    d.pop("out_dir", None)
    d.pop("name", None)
    d["method"].pop("name", None)
    for row in _rows().values():  # the options that rows set differ between runs
        for key in row.options:
            d["method"].get(row.method, {}).pop(key, None)
        for key in row.shared:
            d["method"].pop(key, None)
    return d


def _check_compare_json(compare_dir: Path, base: RunConfig, methods: Sequence[str], seeds: int) -> None:
    path = compare_dir / "compare.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("config") != _shared(base):
            raise ConfigError(
                f"compare directory '{compare_dir}' holds a compare with a different configuration; "
                "use another --dir (or delete it) to start a new comparison"
            )
        methods = [m for m in METHOD_ORDER if m in set(old.get("methods", [])) | set(methods)]
        seeds = max(seeds, int(old.get("seeds", 1)))
    compare_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": _shared(base), "base_seed": base.seed, "methods": list(methods),
                                "seeds": seeds}, indent=2, sort_keys=True))


def run_compare(
    base: RunConfig,
    compare_dir: str | Path,
    methods: Sequence[str] | None = None,
    seeds: int = 1,
    target_fraction: float = 0.95,
    log: Log = print,
    reporter: Callable[[RunSpec], Callable[[dict[str, Any]], None]] | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a comparison and write its tables and plots; returns :func:`summarise`'s dict."""
    # lazy: looked up per call: tests/test_compare.py patches florg.fl.simulation.run_simulation_engine
    from florg.fl.simulation import RunInterrupted, run_simulation_engine

    if not 0.0 < target_fraction <= 1.0:
        raise ConfigError(f"--target-fraction must be in (0, 1], got {target_fraction}")
    compare_dir = Path(compare_dir)
    methods = list(methods or METHOD_ORDER)
    specs = plan_runs(base, compare_dir, methods, seeds)
    _check_compare_json(compare_dir, base, methods, seeds)
    log(f"compare: {len(methods)} methods x {seeds} seed(s) = {len(specs)} runs into {compare_dir}")
    durations: list[float] = []
    failed: list[str] = []
    for i, spec in enumerate(specs, 1):
        path = compare_dir / "runs" / spec.name
        status = _status(path)
        if status == "complete":
            log(f"[{i}/{len(specs)}] {spec.name}: complete, skipped")
            continue
        if path.exists():
            log(f"[{i}/{len(specs)}] {spec.name}: incomplete ({status or 'no status'}), starting it again")
            shutil.rmtree(path)
        eta = ""
        if durations:
            left = sum(1 for s in specs[i - 1:] if _status(compare_dir / "runs" / s.name) != "complete")
            eta = f" (about {left * sum(durations) / len(durations) / 60:.1f} min left)"
        log(f"[{i}/{len(specs)}] {spec.name}: {DISPLAY[spec.label]}, seed {spec.seed}, "
            f"{spec.cfg.train.rounds} rounds{eta}")
        t0 = time.perf_counter()
        try:
            run_simulation_engine(spec.cfg, RunDir.create(spec.cfg),
                                  reporter=reporter(spec) if reporter else (lambda row: None), verbose=verbose)
        except (KeyboardInterrupt, RunInterrupted):  # Ctrl-C stops the comparison (re-running resumes it)
            raise
        except Exception as exc:  # noqa: BLE001 - one failed method must not stop the comparison
            failed.append(spec.name)
            log(f"[{i}/{len(specs)}] {spec.name}: FAILED: {type(exc).__name__}: {exc}")
        durations.append(time.perf_counter() - t0)
        log(f"[{i}/{len(specs)}] {spec.name}: done in {durations[-1]:.0f} s")
        summarise(compare_dir, methods, seeds, target_fraction, base_seed=base.seed, base=base)
    result = summarise(compare_dir, methods, seeds, target_fraction, base_seed=base.seed, base=base)
    result["failed"] = failed
    return result


def _status(path: Path) -> str | None:
    p = path / "status.json"
    return json.loads(p.read_text()).get("status") if p.is_file() else None


# --------------------------------------------------------------------------------- summaries


def bytes_to_target(rows: Sequence[dict[str, Any]], target: float, key: str = "test_accuracy",
                    higher_is_better: bool = True) -> int | None:
    """Cumulative bytes (up + down) when ``key`` first reaches ``target`` (None: never); see :mod:`florg.study.stats`."""
    return _b2t(rows, key, target, higher_is_better)


def _headline(method: str) -> str:
    return str(getattr(METHODS[method], "headline", "global"))


def summarise(
    compare_dir: str | Path,
    methods: Sequence[str],
    seeds: int,
    target_fraction: float = 0.95,
    base_seed: int = 0,
    base: RunConfig | None = None,
) -> dict[str, Any]:
    """Read the complete runs of a compare directory; write ``results.md``, ``summary.json`` and plots.

    The numbers are those of :func:`florg.study.tables.summarise_rows` (the task's own primary metric,
    mean ± std, 95 % t interval, last-3-rounds mean, paired differences against FLoRG, bytes to target).
    """
    compare_dir = Path(compare_dir)
    rows_by_label = _rows()
    info = MetricInfo.of_task(base.data.task) if base is not None else MetricInfo(("accuracy", "loss"))
    rows: list[RowRuns] = []
    majority = None
    for label in methods:
        runs = {}
        for i in range(seeds):
            path = compare_dir / "runs" / f"{label}-seed{base_seed + i}"
            if _status(path) == "complete":
                data = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]
                if data:
                    runs[base_seed + i] = data
                if majority is None and (path / "partitions.json").is_file():
                    majority = majority_rate(json.loads((path / "partitions.json").read_text()))
        row = rows_by_label[label]
        rows.append(RowRuns(label, DISPLAY[label], row.method, runs, headline=_headline(row.method),
                            ablation=row.ablation, expected_seeds=seeds))
    summary = summarise_rows(rows, info, reference="florg" if "florg" in methods else None,
                             target_fraction=target_fraction, majority=majority if info.higher_is_better else None)
    summary.update(methods=list(methods), seeds=seeds)
    compare_dir.mkdir(parents=True, exist_ok=True)
    (compare_dir / "summary.json").write_text(json.dumps(jsonable(summary), indent=2, sort_keys=True))
    (compare_dir / "results.md").write_text(_markdown(summary, base, info))
    series = []
    for r in rows:
        if r.runs:
            key = r.key(info)
            extra = f"test_{info.primary}" if key != f"test_{info.primary}" else None
            series.append(Series(r.display + (" (personalised)" if extra else ""), list(r.runs.values()), key, extra,
                                 f"{r.display} (global model)", {"linestyle": ":"} if r.ablation else {}))
    if series:
        title = f"{base.model.name} on {base.data.task}" if base is not None else ""
        plot_rows(series, compare_dir / "plots", metric=info.primary, title=title)
    return summary


def _pm(info: Any, s: dict[str, Any]) -> str:
    return info.fmt(s["mean"]) + (f" ± {info.fmt(s['std'])}" if s["n"] > 1 else "")


def _markdown(summary: dict[str, Any], base: RunConfig | None, info: Any) -> str:
    per = summary["rows"]
    methods = [m for m in summary["methods"] if not per[m]["ablation"]]
    model = base.model.name if base is not None else "?"
    task = base.data.task if base is not None else "?"
    seeds = summary["seeds"]
    lines = [f"# Method comparison: {model} on {task}", ""]
    if base is not None:
        lines += [
            f"{base.data.num_clients} clients, {base.data.partition} partition (alpha = {base.data.alpha}), r = "
            f"{base.method.rank}, alpha = {base.method.alpha}, {base.train.rounds} rounds x {base.train.local_steps} "
            f"local steps (batch {base.train.batch_size}, {base.train.optimizer}, lr {base.train.lr:g}, "
            f"{base.train.lr_schedule}), weighting '{base.method.weighting}', head "
            f"{'trained' if base.method.train_head else 'frozen'}; seeds {base.seed}..{base.seed + seeds - 1}. "
            "One shared setting for every method (no tuning; `florg study` tunes each method on a validation split).",
            "",
        ]
    lines += [f"## Final {info.unit}, mean ± std over seeds", "",
              "| Base model | Dataset | " + " | ".join(DISPLAY[m] for m in methods) + " |",
              "|" + "---|" * (len(methods) + 2)]
    best = summary.get("best_final")
    cells = []
    for m in methods:
        e = per[m]
        if "final" not in e:
            cells.append("–")
            continue
        f = e["final"]
        text = _pm(info, f)
        if e["headline"] == "personal":
            text += " (personalised)"
        cells.append(f"**{text}**" if best is not None and e["headline"] == "global" and f["mean"] == best else text)
    lines += [f"| {model} | {task} | " + " | ".join(cells) + " |", ""]
    lines += markdown_tables(summary, info)
    for label in [m for m in summary["methods"] if per[m]["ablation"] and "final" in per[m]]:
        row = _rows()[label]
        w, wo = per.get(row.method, {}).get("final"), per[label]["final"]
        lines += [f"## Ablation: {DISPLAY[label]} (final {info.unit})", "", f"| Base | Setting | {task} |", "|---|---|---|"]
        if w:
            lines.append(f"| {model} | {DISPLAY[row.method]} | {_pm(info, w)} |")
        lines.append(f"| {model} | {DISPLAY[label]} | {_pm(info, wo)} |")
        if w:
            lines.append(f"| | difference | {info.fmt(w['mean'] - wo['mean'])} |")
        lines.append("")
    lines += [f"Plots: plots/{info.primary}_vs_round.png, plots/{info.primary}_vs_bytes.png (linear MB from round 0)"
              + (", plots/loss_vs_round.png" if info.primary != "loss" else "") + "; mean ± std over seeds.", ""]
    return "\n".join(lines)

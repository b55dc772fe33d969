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
    <dir>/plots/accuracy_vs_round.png  mean over seeds, one line per method
    <dir>/plots/accuracy_vs_bytes.png  accuracy vs cumulative bytes (log x)

The score is the task family's primary metric: accuracy for classification (higher is better),
the held-out loss for instruction tuning (lower is better; plots ``loss_vs_round.png``, ...).

Resume: running the same compare again skips every run whose ``status.json`` says
``complete``; a run that was cut short is started again from scratch.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from florg.config import ConfigError, RunConfig

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
    from florg.methods.registry import compare_rows

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
    from florg.config import apply_overrides, validate

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
    from florg.methods import get_method

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
    from florg.fl.simulation import run_simulation_engine
    from florg.run.rundir import RunDir

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
        except KeyboardInterrupt:
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


def bytes_to_target(rows: Sequence[dict[str, Any]], target: float, metric: str = "accuracy",
                    higher_is_better: bool = True) -> int | None:
    """Cumulative bytes (up + down) when the global ``test_<metric>`` first reaches ``target`` (None: never):
    at or above it when higher is better (accuracy), at or below it otherwise (loss)."""
    key = f"test_{metric}"
    for row in rows:
        if key not in row:
            continue
        if (row[key] >= target) if higher_is_better else (row[key] <= target):
            return int(row.get("bytes_total_cum", 0))
    return None


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _pm(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if len(values) > 1 else "")


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "not reached"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return str(n)


def _mean_rows(runs: Sequence[Sequence[dict[str, Any]]], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Per-round mean of ``test_<metric>`` and cumulative bytes over seeds (rounds present in every run)."""
    rounds = min(len(r) for r in runs)
    key = f"test_{metric}"
    out = []
    for i in range(rounds):
        rows = [r[i] for r in runs]
        out.append({"round": rows[0]["round"],
                    key: sum(r[key] for r in rows) / len(rows),
                    "bytes_total_cum": sum(r.get("bytes_total_cum", 0) for r in rows) / len(rows)})
    return out


def summarise(
    compare_dir: str | Path,
    methods: Sequence[str],
    seeds: int,
    target_fraction: float = 0.95,
    base_seed: int = 0,
    base: RunConfig | None = None,
) -> dict[str, Any]:
    """Read the complete runs of a compare directory; write ``results.md``, ``summary.json`` and plots.

    The score is the task family's primary metric (``accuracy`` for classification, ``loss`` for
    instruction tuning), named in the keys (``final_<metric>``, ``target_<metric>``, ...). When lower is
    better, the best run is the lowest and the bytes-to-target threshold is ``best / target_fraction``.
    """
    compare_dir = Path(compare_dir)
    metric, higher = _metric(base)
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for label in methods:
        for i in range(seeds):
            path = compare_dir / "runs" / f"{label}-seed{base_seed + i}"
            if _status(path) == "complete":
                rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]
                if rows:
                    runs.setdefault(label, []).append(rows)
    per: dict[str, dict[str, Any]] = {}
    for label, rr in runs.items():
        finals = [r[-1][f"test_{metric}"] for r in rr]
        personal = [r[-1][f"personal_{metric}"] for r in rr if f"personal_{metric}" in r[-1]]
        trained = [[x for x in r if x.get("round", 0) > 0] for r in rr]
        per[label] = {
            "seeds": len(rr),
            f"final_{metric}": finals,
            f"final_{metric}_mean": _mean_std(finals)[0],
            f"final_{metric}_std": _mean_std(finals)[1],
            f"personal_{metric}": personal,
            "bytes_total": [r[-1].get("bytes_total_cum", 0) for r in rr],
            "bytes_per_round": _mean_std([sum(x.get("bytes_up", 0) + x.get("bytes_down", 0) for x in t) / max(len(t), 1)
                                          for t in trained])[0],
            "bytes_up_per_round": _mean_std([sum(x.get("bytes_up", 0) for x in t) / max(len(t), 1) for t in trained])[0],
            "bytes_down_per_round": _mean_std([sum(x.get("bytes_down", 0) for x in t) / max(len(t), 1)
                                               for t in trained])[0],
            "sent_rel_error": _mean_std([sum(x.get("sent_rel_error_max", 0.0) for x in t) / max(len(t), 1)
                                         for t in trained])[0],
            "agg_rel_error": _mean_std([sum(x.get("agg_rel_error_max", 0.0) for x in t) / max(len(t), 1)
                                        for t in trained])[0],
        }
    main = [m for m in methods if m not in ABLATIONS and m in per]
    best = (max if higher else min)((per[m][f"final_{metric}_mean"] for m in main), default=None)
    target = (best * target_fraction if higher else best / target_fraction) if best is not None else None
    for label, rr in runs.items():
        hits = [bytes_to_target(r, target, metric, higher) for r in rr] if target is not None else []
        reached = [h for h in hits if h is not None]
        per[label]["bytes_to_target"] = hits
        per[label]["bytes_to_target_mean"] = (sum(reached) / len(reached)) if reached else None
    ref = per.get("florg", {}).get("bytes_to_target_mean")
    summary = {
        "methods": list(methods),
        "seeds": seeds,
        "target_fraction": target_fraction,
        "metric": metric,
        "higher_is_better": higher,
        f"best_final_{metric}": best,
        f"target_{metric}": target,
        "per_method": per,
    }
    compare_dir.mkdir(parents=True, exist_ok=True)
    (compare_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    (compare_dir / "results.md").write_text(_markdown(summary, base, ref))
    if runs:
        from florg.run.plots import plot_runs

        title = f"{base.model.name} on {base.data.task}" if base is not None else ""
        plot_runs({DISPLAY[m]: _mean_rows(runs[m], metric) for m in methods if m in runs}, compare_dir / "plots",
                  title=title, metric=metric)
    return summary


def _metric(base: RunConfig | None) -> tuple[str, bool]:
    """``(primary metric, higher_is_better)`` of the task family of ``base`` (accuracy without a config)."""
    if base is None:
        return "accuracy", True
    from florg.tasks import family_class

    cls = family_class(base.data.task)
    return cls.metrics[0], bool(cls.higher_is_better)


def _markdown(summary: dict[str, Any], base: RunConfig | None, ref: float | None) -> str:
    per = summary["per_method"]
    methods = [m for m in summary["methods"] if m not in ABLATIONS]
    model = base.model.name if base is not None else "?"
    task = base.data.task if base is not None else "?"
    seeds = summary["seeds"]
    metric, higher = summary.get("metric", "accuracy"), summary.get("higher_is_better", True)
    scale, digits, unit = (100.0, 2, " (%)") if metric in PERCENT_METRICS else (1.0, 4, "")
    pct = " %" if metric in PERCENT_METRICS else ""
    words = metric.replace("_", " ")
    fin = f"final_{metric}"
    best = (max if higher else min)((per[m][f"{fin}_mean"] for m in methods if m in per), default=None)
    lines = [f"# Method comparison: {model} on {task}", ""]
    if base is not None:
        lines += [
            f"{base.data.num_clients} clients, {base.data.partition} partition (alpha = {base.data.alpha}), r = "
            f"{base.method.rank}, alpha = {base.method.alpha}, {base.train.rounds} rounds x {base.train.local_steps} "
            f"local steps (batch {base.train.batch_size}, {base.train.optimizer}, lr {base.train.lr:g}, "
            f"{base.train.lr_schedule}), weighting '{base.method.weighting}', head "
            f"{'FedAvg-ed by every method' if base.method.train_head else 'frozen'}; "
            f"seeds {base.seed}..{base.seed + seeds - 1}. FeDeRA mode: {base.method.federa.mode}.",
            "",
        ]
    lines += [f"## Final global test {words}{unit}, mean ± std over seeds ({'higher' if higher else 'lower'} is better)",
              ""]
    header = "| Base model | Dataset | " + " | ".join(DISPLAY[m] for m in methods) + " |"
    lines += [header, "|" + "---|" * (len(methods) + 2)]
    cells = []
    for m in methods:
        if m not in per:
            cells.append("–")
            continue
        text = _pm(per[m][fin], scale, digits)
        cells.append(f"**{text}**" if best is not None and per[m][f"{fin}_mean"] == best else text)
    lines += [f"| {model} | {task} | " + " | ".join(cells) + " |", ""]
    done = {m: per[m]["seeds"] for m in summary["methods"] if m in per}
    if any(n < seeds for n in done.values()) or len(done) < len(summary["methods"]):
        counts = ", ".join(f"{DISPLAY[m]} {done.get(m, 0)}/{seeds}" for m in summary["methods"])
        lines += [f"Complete runs per method: {counts}.", ""]
    if "fedsa-lora" in per:
        reweighted = " on the test split reweighted to the client's label distribution," if metric == "accuracy" else ""
        lines += [
            f"FedSA-LoRA keeps B local: its global {words} is that of the named global model (A_bar with "
            "B_bar, the example-weighted mean of the round's B_n, uploaded for evaluation only and not counted "
            f"as protocol traffic). Its personalised {words} (each client's own B_n with A_bar,{reweighted} "
            f"example-weighted over clients): {_pm(per['fedsa-lora'][f'personal_{metric}'], scale, digits)}{pct}.",
            "",
        ]
    target = summary.get(f"target_{metric}")
    lines += ["## Communication", ""]
    if target is not None:
        rule = (f"{summary['target_fraction']:.0%} of the best final {words}" if higher else
                f"the best final {words} / {summary['target_fraction']:g}")
        shown = f"{target * 100:.2f} %" if metric in PERCENT_METRICS else f"{target:.4f}"
        lines += [f"Target: {rule} = {shown}. "
                  "Bytes to target = cumulative Flower payload bytes (uplink + downlink, all clients, adapter + "
                  f"head) when the global {words} first reaches the target (mean over the seeds that reach it).", ""]
    lines += ["| Method | bytes to target | × FLoRG | seeds reaching | bytes / round (up + down) | up / round | "
              "down / round | total bytes | agg. error | sent error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in summary["methods"]:
        if m not in per:
            continue
        d = per[m]
        b2t = d["bytes_to_target_mean"]
        ratio = f"{b2t / ref:.2f}×" if (b2t is not None and ref) else "–"
        reached = sum(h is not None for h in d["bytes_to_target"])
        total = sum(d["bytes_total"]) / len(d["bytes_total"])
        lines.append(f"| {DISPLAY[m]} | {_fmt_bytes(b2t)} | {ratio} | {reached}/{d['seeds']} | "
                     f"{_fmt_bytes(d['bytes_per_round'])} | {_fmt_bytes(d['bytes_up_per_round'])} | "
                     f"{_fmt_bytes(d['bytes_down_per_round'])} | {_fmt_bytes(total)} | {d['agg_rel_error']:.2e} | "
                     f"{d['sent_rel_error']:.2e} |")
    lines += ["", "agg. error / sent error: relative Frobenius error of the new global update against the weighted "
              "mean of the client updates, before / after any rank-r truncation (max over layers, mean over rounds).",
              ""]
    for label in [a for a in ABLATIONS if a in per]:
        row = _rows()[label]
        w = per.get(row.method, {}).get(fin, [])
        wo = per[label][fin]
        lines += [f"## Ablation: {DISPLAY[label]} (final {words}{unit.replace(' (', ', ').rstrip(')')})", "",
                  f"| Base | Setting | {task} |", "|---|---|---|",
                  f"| {model} | {DISPLAY[row.method]} | {_pm(w, scale, digits)} |",
                  f"| {model} | {DISPLAY[label]} | {_pm(wo, scale, digits)} |"]
        if w and wo:
            drop = (_mean_std(w)[0] - _mean_std(wo)[0]) * (1 if higher else -1)
            lines.append(f"| | drop | {drop * scale:.{digits}f} |")
        lines.append("")
    lines += [f"Plots: plots/{metric}_vs_round.png, plots/{metric}_vs_bytes.png (mean over seeds).", ""]
    return "\n".join(lines)

"""Tables of a comparison: one row per method (or variant), the runs of its seeds, the task's own metric.

Shared by ``florg compare`` and ``florg study``. Input: :class:`RowRuns` (a row's runs by seed,
``metrics.jsonl`` rows) and the task's :class:`MetricInfo` (primary metric, direction). Output:
:func:`summarise_rows` (a JSON-able dict) and :func:`markdown_tables` (the tables of results.md).

Per row, over its seeds (:mod:`florg.study.stats` has the formulas):

* the **headline metric** of the row: ``test_<primary>`` (the global model on the test split), or
  ``personal_accuracy`` for a method whose own metric is personalised (FedSA-LoRA; its constructed
  global model's ``test_<primary>`` is reported beside it);
* its value in the **final round** and the **mean of the last 3 rounds**: mean ± std, 95 % t interval;
* the **paired difference** against the reference row (FLoRG) on the seeds both have, with the
  paired t-test (headline) and the Wilcoxon signed-rank p-value;
* **bytes to target**: cumulative bytes (uplink + downlink, all clients) when the headline metric
  first reaches the target (``target_fraction`` x the best mean final value among rows with a
  global headline; for a lower-is-better metric the best divided by ``target_fraction``), with its
  median, min and max over the seeds that reach it;
* bytes per round (up / down), and the aggregation diagnostics when the rows carry them
  (``round_rel_error``: the update actually sent against the exact weighted mean of the client
  updates; ``agg_rel_error`` / ``sent_rel_error``);
* for classification, the seeds whose final accuracy stays within 2 points of the majority-class
  rate ("stuck").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .stats import bytes_to_target, final_value, last_k_mean, paired_test, summarise_values

__all__ = ["MetricInfo", "RowRuns", "jsonable", "majority_rate", "markdown_tables", "summarise_rows"]

Rows = list[dict[str, Any]]
#: a final value within this of the majority-class rate counts as "stuck at the majority class"
STUCK_MARGIN = 0.02


@dataclass(frozen=True)
class MetricInfo:
    """The task family's metrics: the primary one first, and whether larger is better."""

    metrics: tuple[str, ...]
    higher_is_better: bool = True

    @property
    def primary(self) -> str:
        return self.metrics[0]

    @classmethod
    def of_task(cls, task: str) -> MetricInfo:
        # lazy: florg.cli.main imports this module: keeps florg --help under 1 s (torch, transformers)
        from florg.tasks import family_class

        fam = family_class(task)
        return cls(tuple(fam.metrics), bool(fam.higher_is_better))

    def percent(self) -> bool:
        """Whether the metric is a rate shown in percent (accuracy, F1, exact match), not a loss/perplexity."""
        return self.higher_is_better

    def fmt(self, value: float | None, digits: int = 2) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{value * 100:.{digits}f}" if self.percent() else f"{value:.{digits + 2}f}"

    @property
    def unit(self) -> str:
        return f"{self.primary} (%)" if self.percent() else self.primary


@dataclass
class RowRuns:
    """One row of a comparison: its identity and its complete runs by seed."""

    label: str
    display: str
    method: str
    runs: dict[int, Rows]
    headline: str = "global"  # or "personal" (the clients' own models: personal_<primary>)
    ablation: bool = False
    note: str = ""
    expected_seeds: int = 0  # how many seeds the plan has (0: as many as there are runs)
    settings: dict[str, Any] = field(default_factory=dict)  # e.g. the selected lr

    def key(self, info: MetricInfo) -> str:
        return f"personal_{info.primary}" if self.headline == "personal" else f"test_{info.primary}"


def majority_rate(partitions: Sequence[Mapping[str, Any]]) -> float | None:
    """The largest class share of the training data (``partitions.json``: per-client ``label_counts``).

    The test and validation splits of the embedded tasks are stratified hold-outs, so this is also
    the accuracy of a model that always predicts the majority class.
    """
    totals: list[int] = []
    for part in partitions:
        counts = part.get("label_counts")
        if not counts:
            return None
        if len(totals) < len(counts):
            totals += [0] * (len(counts) - len(totals))
        for i, n in enumerate(counts):
            totals[i] += int(n)
    return max(totals) / sum(totals) if totals and sum(totals) else None


def _mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _trained(rows: Rows) -> Rows:
    return [r for r in rows if int(r.get("round", 0)) > 0]


def _per_round(rows: Rows, key: str) -> float:
    t = _trained(rows)
    return math.fsum(float(r.get(key, 0) or 0) for r in t) / len(t) if t else 0.0


def _diag(runs: Mapping[int, Rows], key: str) -> float | None:
    vals = [float(r[key]) for rows in runs.values() for r in _trained(rows) if r.get(key) is not None]
    return _mean(vals)


def summarise_rows(rows: Sequence[RowRuns], info: MetricInfo, reference: str | None = "florg",
                   target_fraction: float = 0.95, majority: float | None = None) -> dict[str, Any]:
    """The per-row numbers of a comparison (see the module docstring); rows without runs are listed as such."""
    if not 0.0 < target_fraction <= 1.0:
        raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
    per: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row.key(info)
        runs = {s: r for s, r in row.runs.items() if any(key in x for x in r)}
        entry: dict[str, Any] = {"label": row.label, "display": row.display, "method": row.method,
                                 "headline": row.headline, "key": key, "seeds": sorted(runs),
                                 "expected_seeds": row.expected_seeds or len(runs), "ablation": row.ablation,
                                 "note": row.note, "settings": row.settings}
        if runs:
            finals = {s: final_value(r, key) for s, r in runs.items()}
            last3 = {s: last_k_mean(r, key, 3) for s, r in runs.items()}
            entry.update(final_by_seed=finals, last3_by_seed=last3,
                         final=summarise_values(list(finals.values())).to_dict(),
                         last3=summarise_values(list(last3.values())).to_dict())
            gkey = f"test_{info.primary}"
            if key != gkey:
                gf = {s: final_value(r, gkey) for s, r in runs.items() if any(gkey in x for x in r)}
                if gf:
                    entry["global_final_by_seed"] = gf
                    entry["global_final"] = summarise_values(list(gf.values())).to_dict()
            entry.update(
                bytes_per_round=_mean([_per_round(r, "bytes_up") + _per_round(r, "bytes_down") for r in runs.values()]),
                bytes_up_per_round=_mean([_per_round(r, "bytes_up") for r in runs.values()]),
                bytes_down_per_round=_mean([_per_round(r, "bytes_down") for r in runs.values()]),
                bytes_total=_mean([float(r[-1].get("bytes_total_cum", 0)) for r in runs.values()]),
                round_rel_error=_diag(runs, "round_rel_error_mean"),
                round_rel_error_max=_diag(runs, "round_rel_error_max"),
                agg_rel_error=_diag(runs, "agg_rel_error_max"),
                sent_rel_error=_diag(runs, "sent_rel_error_max"),
            )
            broken = sorted(s for s, r in runs.items() if any(x.get("failed") for x in r))
            if broken:
                entry["seeds_with_failed_rounds"] = broken
            if majority is not None and info.higher_is_better and row.headline == "global":
                entry["stuck_seeds"] = sorted(s for s, v in finals.items() if v <= majority + STUCK_MARGIN)
        per[row.label] = entry
    by_label = {row.label: row for row in rows}
    global_rows = [e for e in per.values() if "final" in e and e["headline"] == "global" and not e["ablation"]]
    best = None
    if global_rows:
        means = [e["final"]["mean"] for e in global_rows]
        best = max(means) if info.higher_is_better else min(means)
    target = None if best is None else (best * target_fraction if info.higher_is_better else best / target_fraction)
    for label, entry in per.items():
        if "final" not in entry:
            continue
        runs = by_label[label].runs
        if target is not None:
            hits = {s: bytes_to_target(runs[s], entry["key"], target, info.higher_is_better) for s in entry["seeds"]}
            reached = sorted(v for v in hits.values() if v is not None)
            entry["bytes_to_target"] = {
                "by_seed": hits, "reached": len(reached), "of": len(hits),
                "median": _median(reached), "min": reached[0] if reached else None,
                "max": reached[-1] if reached else None, "mean": _mean(reached),
            }
        if reference and reference in per and label != reference and "final" in per[reference]:
            ref = per[reference]
            for what in ("final", "last3"):
                res = paired_test(entry[f"{what}_by_seed"], ref[f"{what}_by_seed"])
                entry[f"vs_{reference}_{what}"] = res.to_dict() if res else None
    return {"metric": info.primary, "metrics": list(info.metrics), "higher_is_better": info.higher_is_better,
            "reference": reference, "target_fraction": target_fraction, "best_final": best, "target": target,
            "majority_rate": majority, "rows": per, "order": [row.label for row in rows]}


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN as None (strict JSON) and every key a string."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _median(values: Sequence[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    n = len(v)
    return float(v[n // 2]) if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2.0


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "not reached"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return str(n)


def _pm(info: MetricInfo, s: Mapping[str, Any] | None) -> str:
    if not s:
        return "–"
    return info.fmt(s["mean"]) + (f" ± {info.fmt(s['std'])}" if s["n"] > 1 else "")


def _ci(info: MetricInfo, s: Mapping[str, Any] | None) -> str:
    if not s or s["n"] < 2:
        return "–"
    return f"[{info.fmt(s['ci_low'])}, {info.fmt(s['ci_high'])}]"


def _p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "–"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _diff(info: MetricInfo, res: Mapping[str, Any] | None) -> str:
    if not res:
        return "–"
    scale = 100.0 if info.percent() else 1.0
    digits = 2 if info.percent() else 4
    txt = f"{res['mean'] * scale:+.{digits}f}"
    if len(res["differences"]) > 1:
        txt += f" [{res['ci_low'] * scale:+.{digits}f}, {res['ci_high'] * scale:+.{digits}f}]"
    return txt


def markdown_tables(summary: Mapping[str, Any], info: MetricInfo) -> list[str]:
    """The tables of a comparison (markdown lines): headline metric, paired differences, communication."""
    per = summary["rows"]
    order = [label for label in summary["order"] if label in per]
    ref = summary.get("reference")
    metric = info.unit
    better = "higher is better" if info.higher_is_better else "lower is better"
    lines = [f"### Final {info.primary} and mean of the last 3 rounds ({better})", "",
             f"Mean ± std over seeds, 95 % t interval of the mean in brackets; {metric}.", "",
             "| Row | seeds | final | 95 % CI | last 3 rounds | 95 % CI | min – max (final) | notes |",
             "|---|---|---|---|---|---|---|---|"]
    best = summary.get("best_final")
    for label in order:
        e = per[label]
        if "final" not in e:
            lines.append(f"| {e['display']} | 0/{e['expected_seeds']} | – | – | – | – | – | no complete run yet |")
            continue
        f, l3 = e["final"], e["last3"]
        final = _pm(info, f)
        if best is not None and e["headline"] == "global" and not e["ablation"] and f["mean"] == best:
            final = f"**{final}**"
        notes = []
        if e["headline"] == "personal":
            notes.append(f"personalised ({e['key']}); constructed global model: {_pm(info, e.get('global_final'))}")
        if e.get("seeds_with_failed_rounds"):
            notes.append("a round without any valid client reply (the model did not move): seed(s) "
                         f"{', '.join(map(str, e['seeds_with_failed_rounds']))}")
        if e.get("stuck_seeds"):
            notes.append(f"stuck at the majority class: seed(s) {', '.join(map(str, e['stuck_seeds']))}")
        if e.get("note"):
            notes.append(e["note"])
        lines.append(f"| {e['display']} | {len(e['seeds'])}/{e['expected_seeds']} | {final} | {_ci(info, f)} | "
                     f"{_pm(info, l3)} | {_ci(info, l3)} | {info.fmt(f['min'])} – {info.fmt(f['max'])} | "
                     f"{'; '.join(notes)} |")
    lines.append("")
    if summary.get("majority_rate") is not None:
        lines += [f"Majority-class rate: {summary['majority_rate'] * 100:.2f} % (a run whose final accuracy is "
                  f"within {STUCK_MARGIN * 100:.0f} points of it counts as stuck).", ""]
    if ref and ref in per and "final" in per[ref]:
        unit = "points" if info.percent() else info.primary
        lines += [f"### Paired by seed: row − {per[ref]['display']}", "",
                  f"Mean difference in {unit} with its 95 % t interval, and per seed (in seed order); p: two-sided "
                  "paired t-test (the headline test) and Wilcoxon signed-rank test, on the seeds both rows have.", "",
                  "| Row | seeds | Δ final | p (t) | p (Wilcoxon) | Δ final per seed | Δ last 3 | p (t) | p (Wilcoxon) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label in order:
            e = per[label]
            if label == ref or "final" not in e:
                continue
            a, b = e.get(f"vs_{ref}_final"), e.get(f"vs_{ref}_last3")
            n = len(a["seeds"]) if a else 0
            scale, digits = (100.0, 1) if info.percent() else (1.0, 3)
            per_seed = ", ".join(f"{d * scale:+.{digits}f}" for d in a["differences"]) if a else "–"
            lines.append(f"| {e['display']} | {n} | {_diff(info, a)} | {_p(a['p_t'] if a else None)} | "
                         f"{_p(a['p_wilcoxon'] if a else None)} | {per_seed} | {_diff(info, b)} | "
                         f"{_p(b['p_t'] if b else None)} | {_p(b['p_wilcoxon'] if b else None)} |")
        lines.append("")
    target = summary.get("target")
    lines += ["### Communication", ""]
    if target is not None:
        how = (f"{summary['target_fraction']:.0%} of the best mean final value" if info.higher_is_better
               else f"the best mean final value / {summary['target_fraction']:g}")
        lines += [f"Target: {how} = {info.fmt(target)}{' %' if info.percent() else ''}. Bytes to target: cumulative "
                  "bytes (uplink + downlink, all clients) when the row's headline metric first reaches the target; "
                  "median and range over the seeds that reach it.", ""]
    ref_b2t = per.get(ref, {}).get("bytes_to_target", {}).get("median") if ref else None
    has_round = any(per[m].get("round_rel_error") is not None for m in order)
    head = ("| Row | bytes to target (median) | min – max | × ref | seeds reaching | bytes / round | up / round | "
            "down / round | total |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if has_round:
        head += " round rel. error (mean / max over layers) |"
        sep += "---|"
    lines += [head, sep]
    for label in order:
        e = per[label]
        if "final" not in e:
            continue
        b = e.get("bytes_to_target") or {}
        med = b.get("median")
        ratio = f"{med / ref_b2t:.2f}×" if (med is not None and ref_b2t) else "–"
        rng = f"{fmt_bytes(b['min'])} – {fmt_bytes(b['max'])}" if b.get("reached") else "–"
        line = (f"| {e['display']} | {fmt_bytes(med)} | {rng} | {ratio} | {b.get('reached', 0)}/{b.get('of', 0)} | "
                f"{fmt_bytes(e['bytes_per_round'])} | {fmt_bytes(e['bytes_up_per_round'])} | "
                f"{fmt_bytes(e['bytes_down_per_round'])} | {fmt_bytes(e['bytes_total'])} |")
        if has_round:
            rr, rm = e.get("round_rel_error"), e.get("round_rel_error_max")
            line += f" {rr:.3f} / {rm:.3f} |" if rr is not None and rm is not None else " – |"
        lines.append(line)
    lines.append("")
    if has_round:
        lines += ["Round rel. error: ‖update sent − exact weighted mean of the client updates‖ / ‖exact mean update‖ "
                  "per adapted layer, mean over rounds and seeds.", ""]
    return lines

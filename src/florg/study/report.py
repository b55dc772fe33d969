"""The generated part of a study's results folder, rebuilt from the copied runs after every run.

Layout of ``results_dir`` (besides the hand-written ``README.md``)::

    results.md                 progress per phase, the choices made, links
    selection.json             the florg-best and lr grids, every validation score, the chosen values
    tuning.md                  the same as tables
    <task>/results.md          the final comparison (tables of florg.study.tables)
    <task>/summary.json        its numbers
    <task>/plots/*.png         <metric> vs round, <metric> vs cumulative MB (linear, from round 0), loss
    runs/<task>/<phase>/<row>/lr<lr>-seed<seed>/   each run's small files (see florg.study.execution)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .selection import final_specs, florg_best_specs, phase_results, select_florg_best, select_lrs, tune_specs
from .spec import Study, build_config, lr_tag
from .tables import MetricInfo, RowRuns, jsonable, majority_rate, markdown_tables, summarise_rows

__all__ = ["write_study_reports"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "cfg") and hasattr(obj, "rel"):  # a StudySpec
        return obj.rel
    return jsonable(obj)


def _fmt_score(info: MetricInfo, cell: dict[str, Any]) -> str:
    if cell.get("failed"):
        return "failed"
    if not cell.get("complete"):
        n = sum(v is not None for v in cell.get("scores", {}).values())
        return f"({n} done)" if n else "–"
    return info.fmt(cell["mean"])


def _tuning_md(study: Study, fb: dict[str, Any] | None, lrs: dict[str, dict[str, Any]]) -> str:
    lines = [f"# {study.title}: tuning on the validation split", "",
             f"Score: the validation {('final-round value' if study.select == 'final' else 'mean of the last 3 rounds')} "
             f"of the row's headline metric, mean over the tuning seeds {study.tune_seeds}; the test split is never "
             "read. Bold: chosen.", ""]
    if fb:
        info = MetricInfo.of_task(_task_of(study, fb["tasks"][0]))
        lines += ["## FLoRG sub-study (phase florg-best)", "",
                  f"Seeds {fb['seeds']}, tasks {', '.join(fb['tasks'])}. A variant's score: the mean over tasks of its "
                  "best lr's score. " + (f"Chosen: **{fb['chosen']}**." if fb["chosen"] else
                                         f"Not complete yet ({fb['runs_done']}/{fb['runs_planned']} runs)."), ""]
        for task in fb["tasks"]:
            lines += [f"### {task}", "", "| Variant | settings | " + " | ".join(lr_tag(lr) for lr in fb["lr_grid"])
                      + " | best lr | variant score |", "|---|---|" + "---|" * (len(fb["lr_grid"]) + 2)]
            for name, v in fb["variants"].items():
                cells = fb["grid"][task][name]
                best = fb["best_lr"][task][name]
                txt = [(f"**{_fmt_score(info, cells[lr])}**" if lr == best else _fmt_score(info, cells[lr]))
                       for lr in fb["lr_grid"]]
                settings = ", ".join(f"{k} = {json.dumps(x)}" for k, x in v["set"].items()) or "(study base)"
                score = fb["variant_scores"].get(name)
                label = f"**{name}**" if name == fb["chosen"] else name
                lines.append(f"| {label} | {settings} | " + " | ".join(txt) + f" | {best if best is not None else '–'} | "
                             f"{info.fmt(score) if score is not None else '–'} |")
            lines.append("")
    lines += ["## Learning rate per row (phase tune)", ""]
    edges: list[str] = []
    extended: list[str] = []
    for task, per in lrs.items():
        info = MetricInfo.of_task(_task_of(study, task))
        grid = sorted({lr for e in per.values() for lr in e["grid"]})
        lines += [f"### {task}", "", "| Row | selected on | " + " | ".join(lr_tag(lr) for lr in grid) + " | chosen lr |",
                  "|---|---|" + "---|" * (len(grid) + 1)]
        for label, e in per.items():
            row = study.rows[label]
            if row.subrows:
                pick = (f"{e['chosen']:g} at {study.rows[e['from']].display}" if e["chosen"] is not None
                        else "– (sweep points not all chosen)")
                lines.append(f"| **{row.display}**: best of its sweep points below | – | " + " | ".join("" for _ in grid)
                             + f" | {pick} |")
                continue
            if "from" in e:
                lines.append(f"| {row.display} | – | " + " | ".join("" for _ in grid) +
                             f" | {'–' if e['chosen'] is None else format(e['chosen'], 'g')} (that of "
                             f"{study.rows[e['from']].display}) |")
                continue
            cells = [("" if lr not in e["cells"] else (f"**{_fmt_score(info, e['cells'][lr])}**" if lr == e["chosen"]
                                                       else _fmt_score(info, e["cells"][lr]))) for lr in grid]
            chosen = "–" if e["chosen"] is None else f"{e['chosen']:g}"
            if e.get("extended"):
                extended.append(f"{row.display} on {task} (+{', '.join(format(lr, 'g') for lr in e['extended'])})")
            if e["chosen"] is not None and len(e["grid"]) > 1 and e["chosen"] in (min(e["grid"]), max(e["grid"])):
                chosen += " (grid edge)"
                edges.append(f"{row.display} on {task}")
            lines.append(f"| {row.display} | {e['key'] or '–'} | " + " | ".join(cells) + f" | {chosen} |")
        lines.append("")
    if extended:
        lines += [f"Grid extended past the edge where the row's best lr lay (the grid's own step; at most "
                  f"{study.extend_grid} point(s) per row and task, `study.extend_grid`): {'; '.join(extended)}.", ""]
    if edges:
        lines += [f"Chosen at an edge of the grid (the best lr may lie outside it): {', '.join(edges)}.", ""]
    return "\n".join(lines)


def _task_of(study: Study, task: str) -> str:
    return str(study.tasks[task].get("data.task", study.base.get("data", {}).get("task", "wordnet")))


def _final_rows(study: Study, task: str, specs: list[Any], done: dict[str, Any],
                lrs: dict[str, Any]) -> tuple[list[RowRuns], float | None, list[str]]:
    rows: list[RowRuns] = []
    majority = None
    notes = []
    by_row: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for spec in specs:
        if spec.task != task or spec.rel not in done or done[spec.rel]["status"] != "complete":
            continue
        by_row.setdefault(spec.group, {})[spec.seed] = done[spec.rel]["rows"]
        if majority is None:
            part = study.results_dir / "runs" / spec.rel / "partitions.json"
            if part.is_file():
                majority = majority_rate(json.loads(part.read_text()))
    for row in study.final_rows():
        label = row.label
        runs = by_row.get(label, {})
        note = ""
        if row.same_training_as:
            src = by_row.get(row.same_training_as, {})
            probe = next(iter(runs.items()), None)
            if probe is not None and src:
                seed, probe_rows = probe
                note = _probe_note(study, row, seed, probe_rows, src.get(seed))
                runs = {s: _with_bytes(r, probe_rows) for s, r in src.items()}
                notes.append(f"{row.display}: {note}")
            else:
                runs = {}
        rows.append(RowRuns(label=label, display=row.display, method=row.method, runs=runs, headline=row.headline,
                            ablation=row.ablation, note=note, expected_seeds=len(study.final_seeds),
                            settings={"lr": lrs[label]["chosen"], **lrs[label].get("settings", {})}))
    return rows, majority, notes


def _with_bytes(rows: list[dict[str, Any]], probe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the byte counters of ``probe`` (same rounds): a row that trains identically to another."""
    by_round = {int(r["round"]): r for r in probe}
    out = []
    for r in rows:
        p = by_round.get(int(r["round"]), {})
        new = dict(r)
        for k in [k for k in p if k.startswith("bytes_")]:
            new[k] = p[k]
        out.append(new)
    return out


def _probe_note(study: Study, row: Any, seed: int, probe: list[dict[str, Any]], src: list[dict[str, Any]] | None) -> str:
    src_name = study.rows[row.same_training_as].display
    text = f"trains as {src_name}: its metrics are {src_name}'s; bytes measured on seed {seed}"
    if src:
        keys = sorted({k for r in probe for k in r if k.startswith(("test_", "personal_"))})
        diffs = [abs(float(a[k]) - float(b[k])) for a, b in zip(probe, src, strict=False) for k in keys if k in a and k in b]
        if diffs:
            text += f" (its own run differs from {src_name}'s by at most {max(diffs):.1e})"
    return text


def _final_md(study: Study, task: str, summary: dict[str, Any], info: MetricInfo, notes: list[str],
              base_cfg: Any) -> str:
    b = base_cfg
    lines = [f"# {study.title}: {task}", "",
             f"{b.model.name} on `{b.data.task}`"
             + (f" (classes: {', '.join(b.data.classes)})" if b.data.classes else "")
             + f", {b.data.num_clients} clients, {b.data.partition} partition (α = {b.data.alpha}), r = {b.method.rank}, "
             f"α = {b.method.alpha}, {b.train.rounds} rounds × "
             + (f"{b.train.local_epochs} local epoch(s)" if b.train.local_epochs else f"{b.train.local_steps} local steps")
             + " (batch "
             f"{b.train.batch_size}, {b.train.optimizer}), weighting '{b.method.weighting}'; test split "
             f"{b.data.max_test_examples or 'all'} examples, validation {b.data.validation_fraction:.0%} of the training "
             f"data held out. Final seeds {study.final_seeds}; each row at its lr chosen on validation "
             "([tuning.md](../tuning.md)).", "",
             "| Row | lr | other settings chosen on validation |", "|---|---|---|"]
    for label in summary["order"]:
        e = summary["rows"][label]
        lr = e["settings"].get("lr")
        other = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                          for k, v in e["settings"].items() if k != "lr") or "–"
        lines.append(f"| {e['display']} | {lr if lr is not None else '–'} | {other} |")
    lines.append("")
    lines += markdown_tables(summary, info)
    if notes:
        lines += ["Derived rows: " + " ".join(notes), ""]
    lines += [f"Plots: [{info.primary} vs round](plots/{info.primary}_vs_round.png), "
              f"[{info.primary} vs cumulative MB](plots/{info.primary}_vs_bytes.png)"
              + (", [test loss vs round](plots/loss_vs_round.png)" if info.primary != "loss" else "") + ".", ""]
    return "\n".join(lines)


def write_study_reports(study: Study) -> list[Path]:
    """Rebuild results.md, selection.json, tuning.md and every task's final tables and plots."""
    # lazy: florg.cli.main imports this module: keeps florg --help under 1 s (matplotlib)
    from florg.run.plots import Series, plot_rows

    out = study.results_dir
    written: list[Path] = []
    fb = select_florg_best(study)
    lrs = select_lrs(study, fb)
    selection = {"select": study.select, "tune_seeds": study.tune_seeds, "final_seeds": study.final_seeds,
                 "florg_best": fb, "lr": lrs}
    written.append(_write(out / "selection.json", json.dumps(_jsonable(selection), indent=2, sort_keys=True)))
    written.append(_write(out / "tuning.md", _tuning_md(study, fb, lrs)))
    specs_fb = florg_best_specs(study)
    specs_tune = tune_specs(study, fb, strict=False)
    specs_final = final_specs(study, fb, lrs, strict=False)
    progress = []
    for name, specs in (("florg-best", specs_fb), ("tune", specs_tune), ("final", specs_final)):
        done = phase_results(study, specs)
        failed = sum(1 for d in done.values() if d["status"] == "failed")
        progress.append((name, len(specs), len(done), failed))
    done_final = phase_results(study, specs_final)
    task_links = []
    for task in study.tasks:
        base_cfg = build_config(study, [study.tasks[task]], f"task '{task}'")
        info = MetricInfo.of_task(base_cfg.data.task)
        rows, majority, notes = _final_rows(study, task, specs_final, done_final, lrs[task])
        if not any(r.runs for r in rows):
            continue
        summary = summarise_rows(rows, info, reference=study.reference, target_fraction=study.target_fraction,
                                 majority=majority)
        written.append(_write(out / task / "summary.json", json.dumps(_jsonable(summary), indent=2, sort_keys=True)))
        written.append(_write(out / task / "results.md", _final_md(study, task, summary, info, notes, base_cfg)))
        series = []
        for r in rows:
            if not r.runs or (r.label in study.rows and study.rows[r.label].same_training_as):
                continue
            key = r.key(info)
            extra = f"test_{info.primary}" if key != f"test_{info.primary}" else None
            series.append(Series(r.display + (" (personalised)" if extra else ""), list(r.runs.values()), key, extra,
                                 f"{r.display} (global model)", {"linestyle": ":"} if r.ablation else {}))
        title = f"{base_cfg.model.name} on {task}, {len(study.final_seeds)} seeds"
        written += plot_rows(series, out / task / "plots", metric=info.primary, title=title)
        task_links.append(f"* [{task}]({task}/results.md)")
    lines = [f"# {study.title}", "", f"Study file: `{study.path}`. Generated after every run; the reading is in "
             "[README.md](README.md).", "", "| Phase | runs planned | done | failed |", "|---|---|---|---|"]
    for name, n, d, f in progress:
        lines.append(f"| {name} | {n} | {d} | {f} |")
    lines += ["", "Planned counts of later phases grow once earlier phases have chosen their settings.", ""]
    if fb:
        chosen = "not yet"
        if fb["chosen"]:
            settings = ", ".join(f"{k} = {json.dumps(v)}" for k, v in fb["chosen_settings"].items()) or "the base"
            chosen = f"**{fb['chosen']}** ({settings})"
        lines += [f"FLoRG settings chosen on validation: {chosen}, applied to {', '.join(fb['apply_to'])}.", ""]
    lines += ["Tuning tables: [tuning.md](tuning.md) (machine-readable: selection.json).", "", "Final comparisons:", ""]
    lines += task_links or ["(no final run yet)"]
    lines.append("")
    written.append(_write(out / "results.md", "\n".join(lines)))
    return written

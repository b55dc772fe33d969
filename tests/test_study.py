"""``florg study`` without Flower: planning, selection on validation only, resume, reports, the CLI."""

import json
import math
import shutil
from pathlib import Path

import pytest

import florg.fl.simulation as simulation
from florg.fl.server_app import evaluated_splits
from florg.study.execution import measured_costs, run_phase
from florg.study.selection import (
    done_counts,
    plan_phase,
    planned_counts,
    recorded_status,
    select_florg_best,
    select_lrs,
    validation_score,
)
from florg.study.spec import StudyError, load_study
from florg.study.tables import MetricInfo, RowRuns, markdown_tables, summarise_rows

ROOT = Path(__file__).resolve().parents[1]

# Fake runs: the validation split prefers lr 0.002 and the test split lr 0.01 (their rankings disagree),
# so a selection that read the test split would choose differently.
VAL_BEST, TEST_BEST = 0.002, 0.01


def _study_file(tmp_path: Path, extra: str = "", rows: str = '["florg", "fedit", "florg-noalign", "fedit-copy"]') -> Path:
    text = f"""
[study]
title = "test study"
runs_dir = "{tmp_path / 'runs'}"
results_dir = "{tmp_path / 'results'}"
tasks = ["four", "six"]
rows = {rows}
lr_grid = [0.002, 0.01]
tune_seeds = [100]
final_seeds = [0, 1, 2]
select = "final"

[base]
seed = 0
[base.model]
name = "minilm"
[base.data]
task = "wordnet"
num_clients = 4
validation_fraction = 0.2
[base.train]
rounds = 4
[base.federation]
min_train_nodes = 2
min_available_nodes = 2

[tasks.four]
"data.task" = "wordnet"
[tasks.six]
"data.classes" = ["noun.animal", "noun.plant", "noun.food", "noun.artifact", "noun.person", "noun.act"]

[rows.florg-noalign]
lr_from = "florg"
[rows.fedit-copy]
method = "fedit"
display = "FedIT again"
same_training_as = "fedit"
{extra}
"""
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


FLORG_BEST = """
[florg_best]
tasks = ["four"]
seeds = [100, 101]
apply_to = ["florg", "florg-noalign"]
[florg_best.variants.paper]
description = "the defaults"
[florg_best.variants.top-r]
"method.florg.procrustes" = "top-r"
"""


def _value(cfg, kind: str, r: int) -> float:
    """A deterministic fake accuracy: peaks at VAL_BEST on validation, at TEST_BEST on test."""
    lr, seed = cfg.train.lr, cfg.seed
    best = VAL_BEST if kind == "val" else TEST_BEST
    quality = 0.9 - 0.1 * abs(math.log10(lr / best))
    quality += {"florg": 0.0, "fedit": -0.05}.get(cfg.method.name, 0.0)
    if cfg.method.name == "florg" and cfg.method.florg.procrustes == "top-r":
        quality += 0.02
    quality += 0.003 * (seed % 7)
    return 0.25 + (quality - 0.25) * r / cfg.train.rounds


def _fake_engine(calls, fail=(), interrupt_at=None, no_replies=(), crash=(), terminate_at=None):
    def fake(cfg, run_dir, reporter=None, verbose=False, **kw):
        stalled = any(f in str(run_dir.path) for f in no_replies)  # every reply rejected: the model never moves
        calls.append(str(run_dir.path))
        if any(f in str(run_dir.path) for f in fail):
            run_dir.set_status("failed", error="boom")
            raise RuntimeError("boom")
        if any(f in str(run_dir.path) for f in crash):  # fails before it could record its status
            raise RuntimeError("crash")
        if terminate_at is not None and len(calls) == terminate_at:
            raise simulation.RunInterrupted("the run was interrupted (SIGTERM)")
        run_dir.write_json("partitions.json", [{"label_counts": [30, 10, 10, 10]}, {"label_counts": [30, 10, 0, 10]}])
        cum = 0
        for r in range(cfg.train.rounds + 1):
            if interrupt_at is not None and len(calls) == interrupt_at and r == 2:
                raise KeyboardInterrupt  # the process is killed in the middle of this run
            test_now, val_now = evaluated_splits(cfg, r)
            per_round = 1000 if cfg.method.name == "florg" else 2000
            cum += per_round if r else 0
            row = {"round": r, "bytes_up": per_round // 2 if r else 0, "bytes_down": per_round // 2 if r else 0,
                   "bytes_total_cum": cum}
            if test_now:
                row.update(test_accuracy=_value(cfg, "test", r), test_loss=2.0 - _value(cfg, "test", r))
            if val_now:
                row.update(val_accuracy=_value(cfg, "val", r), val_loss=2.0 - _value(cfg, "val", r))
            if r and stalled:
                row.update(failed=True, participants=0)
            if r:
                row["round_rel_error_mean"] = 0.1 if cfg.method.name == "fedit" else 1e-15
                row["round_rel_error_max"] = 0.2 if cfg.method.name == "fedit" else 2e-15
            run_dir.append_metrics(row)
        (run_dir.path / "summary.json").write_text("{}")
        run_dir.set_status("complete", rounds=cfg.train.rounds)
        return {}

    return fake


def test_evaluated_splits():
    from florg.config import RunConfig

    cfg = RunConfig.from_dict({"train": {"rounds": 5}, "eval": {"test_rounds": "first-last", "validation_rounds": "last3"}})
    assert [evaluated_splits(cfg, r) for r in range(6)] == [(True, False), (False, False), (False, False),
                                                             (False, True), (False, True), (True, True)]
    cfg = RunConfig.from_dict({"train": {"rounds": 2}, "eval": {"validation_rounds": "none"}})
    assert [evaluated_splits(cfg, r) for r in range(3)] == [(True, False)] * 3


def test_shipped_study_files_load_and_count():
    files = sorted((ROOT / "configs" / "studies").glob("*.toml"))
    assert files
    for path in files:
        study = load_study(path)
        counts = planned_counts(study)
        assert counts["final"] >= len(study.final_seeds) * len(study.tasks) and counts["tune"] > 0
        # a pilot; the tuning-only studies
        assert len(study.final_seeds) >= 5 or path.stem in ("pilot", "mechanism", "mechanism-remedy")


def test_bad_study_files_name_the_field(tmp_path):
    path = _study_file(tmp_path)
    with pytest.raises(StudyError, match="study.final_seeds: must not share seeds with study.tune_seeds"):
        load_study(path, ["study.final_seeds=[100, 1]"])
    with pytest.raises(StudyError, match="'fedavg' is neither a registry row"):
        load_study(path, ['study.rows=["florg", "fedavg"]'])
    with pytest.raises(StudyError, match="study.lr_grid"):
        load_study(path, ["study.lr_grid=[-1.0]"])
    with pytest.raises(StudyError, match="row 'florg'.*train.lr_schedule"):
        load_study(_study_file(tmp_path, '[rows.florg]\nset = { "train.lr_schedule" = "linear" }'))


def test_phases_select_on_validation_never_on_test(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls))
    study = load_study(_study_file(tmp_path, FLORG_BEST))
    assert planned_counts(study) == {"florg-best": 1 * 2 * 2 * 2, "tune": 2 * 2 * 2 * 1, "final": 2 * (3 * 3 + 1)}
    with pytest.raises(StudyError, match="phase florg-best"):
        plan_phase(study, "tune")
    res = run_phase(study, "florg-best", log=lambda m: None)
    assert res["ran"] == 8 and res["left"] == 0
    fb = select_florg_best(study)
    assert fb["chosen"] == "top-r" and fb["best_lr"]["four"] == {"paper": VAL_BEST, "top-r": VAL_BEST}
    # tuning runs carry val_* only in their last 3 rounds and test_* only at rounds 0 and 4
    run_phase(study, "tune", log=lambda m: None)
    lrs = select_lrs(study, fb)
    for task in ("four", "six"):
        assert lrs[task]["florg"]["chosen"] == VAL_BEST and lrs[task]["fedit"]["chosen"] == VAL_BEST
        assert lrs[task]["florg-noalign"]["chosen"] == VAL_BEST and lrs[task]["florg-noalign"]["from"] == "florg"
    tune_run = next((tmp_path / "results" / "runs" / "four" / "tune" / "florg").glob("*/metrics.jsonl"))
    rows = [json.loads(x) for x in tune_run.read_text().splitlines()]
    assert [r["round"] for r in rows if "val_accuracy" in r] == [2, 3, 4]
    # the test split of a tuning run would have chosen the other lr: the selection did not read it
    by_lr = {}
    for p in (tmp_path / "results" / "runs" / "four" / "tune" / "fedit").glob("*/metrics.jsonl"):
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        by_lr[p.parent.name] = rows[-1]["test_accuracy"]
    assert max(by_lr, key=by_lr.get).startswith(f"lr{TEST_BEST:g}")
    with pytest.raises(ValueError, match="validation keys only"):
        validation_score(rows, "test_accuracy", "final")
    # the florg rows of the final phase run with the chosen variant
    final = plan_phase(study, "final")
    florg_final = [s for s in final if s.group in ("florg", "florg-noalign")]
    assert {s.cfg.method.florg.procrustes for s in florg_final if s.group == "florg"} == {"top-r"}
    assert {s.cfg.method.florg.procrustes for s in florg_final if s.group == "florg-noalign"} == {"none"}
    assert all(s.cfg.eval.validation_rounds == "none" and s.cfg.eval.test_rounds == "all" for s in final)
    assert len([s for s in final if s.group == "fedit-copy"]) == 2  # one bytes run per task
    run_phase(study, "final", log=lambda m: None)
    out = tmp_path / "results"
    summary = json.loads((out / "four" / "summary.json").read_text())
    florg, fedit = summary["rows"]["florg"], summary["rows"]["fedit"]
    assert florg["seeds"] == [0, 1, 2] and fedit["settings"]["lr"] == VAL_BEST
    # paired by seed: FedIT - FLoRG = -0.05 - 0.02 on every seed
    assert fedit["vs_florg_final"]["differences"] == pytest.approx([-0.07] * 3)
    copy = summary["rows"]["fedit-copy"]
    assert copy["final_by_seed"] == fedit["final_by_seed"] and "trains as FedIT" in copy["note"]
    md = (out / "four" / "results.md").read_text()
    assert "| FedIT | 3/3 |" in md and "Paired by seed: row − FLoRG" in md and "round rel. error" in md
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png", "loss_vs_round.png"):
        assert (out / "four" / "plots" / name).stat().st_size > 1000
    sel = json.loads((out / "selection.json").read_text())
    assert sel["florg_best"]["chosen"] == "top-r" and sel["lr"]["six"]["fedit"]["chosen"] == VAL_BEST
    assert "**top-r**" in (out / "tuning.md").read_text()
    assert "| final | 20 | 20 | 0 |" in (out / "results.md").read_text()
    costs = measured_costs(study)
    assert costs["final"]["runs"] == 20 and costs["final"]["wall"] > 0


def test_resume_after_a_kill_and_failed_runs(tmp_path, monkeypatch):
    calls = []
    study = load_study(_study_file(tmp_path))
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls, interrupt_at=3))
    logs = []
    res = run_phase(study, "tune", log=logs.append, max_minutes=0)  # in pieces: no time left, no run starts
    assert calls == [] and res["left"] == 8 and any("time is up" in m for m in logs)
    with pytest.raises(KeyboardInterrupt):
        run_phase(study, "tune", log=lambda m: None)
    interrupted = Path(calls[-1])
    assert json.loads((interrupted / "status.json").read_text())["status"] == "running"
    done_before = sorted(p.parent.name for p in (tmp_path / "results").glob("runs/*/tune/*/*/status.json"))
    assert len(done_before) == 2  # the two runs before the kill were copied; the one in flight was not
    calls.clear()
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls, fail=("six/tune/fedit/lr0.01",)))
    logs = []
    res = run_phase(study, "tune", log=logs.append)
    assert len(calls) == 8 - 2 and str(interrupted) == calls[0]  # the interrupted run starts again, first
    assert res["failed"] == ["six/tune/fedit/lr0.01-seed100"] and res["left"] == 0
    assert any("FAILED" in m for m in logs) and any("about" in m and "min left" in m for m in logs)
    # a failed run is recorded and not retried; the setting that failed is never chosen
    calls.clear()
    run_phase(study, "tune", log=lambda m: None)
    assert calls == []
    lrs = select_lrs(study)
    assert lrs["six"]["fedit"]["cells"][0.01]["failed"] and lrs["six"]["fedit"]["chosen"] == VAL_BEST
    run_phase(study, "tune", log=lambda m: None, retry_failed=True)
    assert len(calls) == 1
    # a run that crashes before recording its status is recorded as failed by the study, with the error
    calls.clear()
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls, crash=("six/tune/fedit/lr0.01",)))
    res = run_phase(study, "tune", log=lambda m: None, retry_failed=True)
    status = json.loads((Path(calls[0]) / "status.json").read_text())
    assert res["failed"] == ["six/tune/fedit/lr0.01-seed100"] and status["status"] == "failed"
    assert status["error"] == "RuntimeError: crash"
    # SIGTERM (RunInterrupted) stops the study like Ctrl-C: the run is not recorded as failed
    calls.clear()
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls, terminate_at=1))
    with pytest.raises(simulation.RunInterrupted):
        run_phase(study, "tune", log=lambda m: None, retry_failed=True)
    assert recorded_status(Path(calls[0])) != "failed"
    # the study file changed under recorded runs: refused before anything runs
    calls.clear()
    changed = load_study(_study_file(tmp_path, '[rows.fedit]\nset = { "train.local_steps" = 3 }'))
    with pytest.raises(StudyError, match="different config .*train.local_steps"):
        run_phase(changed, "tune", log=lambda m: None)
    assert calls == []


def test_tables_for_a_lower_is_better_metric():
    info = MetricInfo(("loss", "perplexity"), higher_is_better=False)

    def run(losses):
        return [{"round": i, "test_loss": v, "bytes_up": 50 if i else 0, "bytes_down": 50 if i else 0,
                 "bytes_total_cum": 100 * i} for i, v in enumerate(losses)]

    rows = [
        RowRuns("florg", "FLoRG", "florg", {0: run([3.0, 2.0, 1.5, 1.2]), 1: run([3.0, 2.2, 1.6, 1.3])}),
        RowRuns("fedit", "FedIT", "fedit", {0: run([3.0, 2.5, 2.0, 1.8]), 1: run([3.0, 2.4, 2.1, 1.7])}),
    ]
    summary = summarise_rows(rows, info, reference="florg", target_fraction=0.8)
    per = summary["rows"]
    assert summary["best_final"] == pytest.approx(1.25)  # the smallest mean final loss
    assert summary["target"] == pytest.approx(1.25 / 0.8)  # lower is better: best / fraction
    assert per["florg"]["final"]["mean"] == pytest.approx(1.25)
    assert per["florg"]["last3"]["mean"] == pytest.approx((2.0 + 1.5 + 1.2 + 2.2 + 1.6 + 1.3) / 6)
    # FLoRG reaches loss <= 1.5625 in round 2 on seed 0 (1.5) and in round 3 on seed 1 (1.3); FedIT never
    assert per["florg"]["bytes_to_target"]["by_seed"] == {0: 200, 1: 300}
    assert per["fedit"]["bytes_to_target"]["reached"] == 0
    assert per["fedit"]["vs_florg_final"]["differences"] == pytest.approx([0.6, 0.4])
    md = "\n".join(markdown_tables(summary, info))
    assert "lower is better" in md and "| FLoRG | 2/2 | **1.2500 ± 0.0707** |" in md
    assert "without any valid client reply" not in md
    rows[1].runs[1][2]["failed"] = True  # FedIT seed 1: no valid reply in round 2
    md = "\n".join(markdown_tables(summarise_rows(rows, info, reference="florg", target_fraction=0.8), info))
    assert "a round without any valid client reply (the model did not move): seed(s) 1" in md
    assert "%" not in md.split("### Communication")[0].replace("95 %", "")
    assert "| FedIT | 2 | +0.5000 [" in md and "| +0.600, +0.400 |" in md


def test_the_pilot_runs_the_protocol_of_the_study():
    import tomllib

    study = tomllib.loads((ROOT / "configs" / "studies" / "h12.toml").read_text())
    pilot = tomllib.loads((ROOT / "configs" / "studies" / "pilot.toml").read_text())
    assert pilot["base"] == study["base"] and pilot["tasks"] == study["tasks"]
    assert study["base"]["data"]["max_test_examples"] >= 2000 and study["base"]["data"]["validation_fraction"] > 0
    assert len(study["study"]["final_seeds"]) >= 5


def test_cli_study_plan_run_report(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from florg.cli.main import app

    calls = []
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls))
    path = str(_study_file(tmp_path))
    runner = CliRunner()
    res = runner.invoke(app, ["study", "plan", path])
    assert res.exit_code == 0 and "no run recorded yet" in res.output and "112" not in res.output
    res = runner.invoke(app, ["study", "run", path, "--phase", "tune", "--task", "four"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 4 and "[tune 4/4] four/tune/fedit/lr0.01-seed100" in res.output
    assert "results: " in res.output and (tmp_path / "results" / "tuning.md").is_file()
    # a recorded run the study no longer plans (a dropped grid point) counts for the cost, not as done
    study = load_study(path)
    recorded = sorted((tmp_path / "results").glob("runs/four/tune/fedit/*"))[0]
    shutil.copytree(recorded, recorded.with_name("lr0.5-seed100"))
    assert done_counts(study)["tune"] == 4 and measured_costs(study)["tune"]["runs"] == 5
    res = runner.invoke(app, ["study", "plan", path, "--seconds-per-run", "60"])
    assert res.exit_code == 0 and "projected time left" in res.output
    res = runner.invoke(app, ["study", "run", path, "--phase", "florg-best"])
    assert res.exit_code == 2 and "no [florg_best] section" in res.output
    res = runner.invoke(app, ["study", "run", path, "--phase", "sweep"])
    assert res.exit_code == 2 and "'sweep' is not one of florg-best, tune, final, all" in res.output
    res = runner.invoke(app, ["study", "report", path])
    assert res.exit_code == 0 and "files written" in res.output
    res = runner.invoke(app, ["study", "plan", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_a_setting_whose_rounds_got_no_valid_reply_is_never_chosen(tmp_path, monkeypatch):
    calls = []
    # the best lr on validation (0.002) stalls on task "four": every reply rejected in every round
    # and the better FLoRG variant (top-r) gets no valid reply at any lr: the sub-study goes on without it
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(
        calls, no_replies=("four/tune/fedit/lr0.002", "florg-best/top-r/")))
    study = load_study(_study_file(tmp_path, FLORG_BEST))
    run_phase(study, "florg-best", log=lambda m: None)
    fb = select_florg_best(study)
    assert fb["chosen"] == "paper" and fb["variant_scores"]["top-r"] is None
    run_phase(study, "tune", log=lambda m: None)
    lrs = select_lrs(study, fb)
    assert lrs["four"]["fedit"]["cells"][0.002]["failed"] and lrs["four"]["fedit"]["chosen"] == 0.01
    assert lrs["six"]["fedit"]["chosen"] == VAL_BEST


def test_a_run_claimed_by_another_live_process_is_skipped(tmp_path, monkeypatch):
    import os

    calls = []
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls))
    study = load_study(_study_file(tmp_path))
    specs = plan_phase(study, "tune")
    busy, stale = specs[0], specs[1]
    (tmp_path / "runs" / f"{busy.rel}.lock").parent.mkdir(parents=True)
    (tmp_path / "runs" / f"{busy.rel}.lock").write_text(str(os.getppid()))  # a live process (our parent)
    (tmp_path / "runs" / f"{stale.rel}.lock").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / f"{stale.rel}.lock").write_text("999999999")  # a process that no longer exists
    logs = []
    res = run_phase(study, "tune", log=logs.append)
    assert len(calls) == 7 and res["left"] == 1
    assert any(busy.rel in m and "another process" in m for m in logs)
    assert not (tmp_path / "runs" / f"{stale.rel}.lock").exists()


def test_a_best_lr_at_the_grid_edge_extends_the_grid(tmp_path, monkeypatch):
    """The validation optimum (VAL_BEST = 0.002) lies above a grid of [2e-4, 5e-4]: the row's grid grows past its
    upper edge by the grid's own step (x2.5) until the best lr is inside or ``study.extend_grid`` is used up."""
    calls = []
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls))
    path = _study_file(tmp_path, rows='["florg", "fedit", "florg-noalign"]')
    with pytest.raises(StudyError, match="study.extend_grid: expected a whole number >= 0"):
        load_study(path, ["study.extend_grid=-1"])
    fixed = load_study(path, ["study.lr_grid=[2e-4, 5e-4]", "study.tasks=[\"four\"]"])
    study = load_study(path, ["study.lr_grid=[2e-4, 5e-4]", "study.extend_grid=2", "study.tasks=[\"four\"]"])
    assert planned_counts(study)["tune"] == 2 * 2  # nothing is extended before the grid's runs are done
    logs = []
    res = run_phase(study, "tune", log=logs.append)
    # florg and fedit: 2 base points, then 1.25e-3 (still the edge), then 3.125e-3 (the edge again: no more)
    assert res["ran"] == 2 * 4 and res["left"] == 0 and any("grid was extended" in m for m in logs)
    assert sorted(str(Path(c).relative_to(tmp_path / "runs")) for c in calls) == [
        f"four/tune/{row}/lr{lr}-seed100" for row in ("fedit", "florg") for lr in ("0.0002", "0.0005", "0.00125", "0.003125")]
    lrs = select_lrs(study)
    for row in ("florg", "fedit"):
        assert lrs["four"][row]["grid"] == [2e-4, 5e-4, 1.25e-3, 3.125e-3]
        assert lrs["four"][row]["extended"] == [1.25e-3, 3.125e-3] and lrs["four"][row]["chosen"] == 3.125e-3
    assert lrs["four"]["florg-noalign"]["chosen"] == 3.125e-3
    assert planned_counts(study)["tune"] == 2 * 4
    tuning = (tmp_path / "results" / "tuning.md").read_text()
    assert "Grid extended past the edge" in tuning and "FLoRG on four (+0.00125, 0.003125)" in tuning
    assert "3.125e-3 (grid edge)" in tuning or "0.003125 (grid edge)" in tuning
    # the same results read with a fixed grid: no extension, the base grid's edge is chosen and flagged
    fixed_lrs = select_lrs(fixed)
    assert fixed_lrs["four"]["florg"]["grid"] == [2e-4, 5e-4] and fixed_lrs["four"]["florg"]["chosen"] == 5e-4
    calls.clear()
    assert run_phase(study, "tune", log=lambda m: None)["ran"] == 0 and calls == []  # resumed: nothing left
    # the best lr inside the grid after two steps: the extension stops there, with one step of the budget left
    inner = load_study(path, ["study.lr_grid=[4e-4, 1e-3]", "study.extend_grid=3", "study.tasks=[\"four\"]",
                              f"study.results_dir=\"{tmp_path / 'inner'}\""])
    run_phase(inner, "tune", log=lambda m: None)
    got = select_lrs(inner)["four"]["florg"]
    assert got["grid"] == [4e-4, 1e-3, 2.5e-3, 6.25e-3] and got["chosen"] == 2.5e-3
    assert "grid edge" not in (tmp_path / "inner" / "tuning.md").read_text()


def test_sweep_axes_tune_every_point_and_the_final_runs_take_the_best_point(tmp_path, monkeypatch):
    """``study.sweep`` (every row) and ``[rows.X].sweep`` (one row): each point of the product is tuned over the lr
    grid like a row of its own; the row's final runs take the point whose best lr scores best on validation, and
    an lr_from row takes the lr and the point of its source."""
    calls = []
    fake = _fake_engine(calls)

    def with_head(cfg, run_dir, **kw):  # validation prefers head lr 0.03 and, for FLoRG, init 0.02
        bonus = 0.01 * (cfg.train.head_lr == 0.03) + 0.005 * (cfg.method.name == "florg" and cfg.method.florg.init_scale == 0.02)
        real = globals()["_value"]
        globals()["_value"] = lambda c, kind, r: real(c, kind, r) + (bonus if kind == "val" else -bonus) * r / c.train.rounds
        try:
            return fake(cfg, run_dir, **kw)
        finally:
            globals()["_value"] = real

    monkeypatch.setattr(simulation, "run_simulation_engine", with_head)
    extra = '[rows.florg]\nsweep = { "method.florg.init_scale" = [0.01, 0.02] }\n'
    path = _study_file(tmp_path, extra, rows='["florg", "fedit", "florg-noalign"]')
    study = load_study(path, ['study.sweep={ "train.head_lr" = [0.01, 0.03] }', 'study.tasks=["four"]'])
    assert study.rows["florg"].subrows == ["florg@hlr0.01-init0.01", "florg@hlr0.01-init0.02",
                                           "florg@hlr0.03-init0.01", "florg@hlr0.03-init0.02"]
    assert study.rows["fedit"].subrows == ["fedit@hlr0.01", "fedit@hlr0.03"] and not study.rows["florg-noalign"].subrows
    assert planned_counts(study) == {"florg-best": 0, "tune": (4 + 2) * 2, "final": 3 * 3}
    run_phase(study, "tune", log=lambda m: None)
    assert len(calls) == 12
    lrs = select_lrs(study)["four"]
    assert lrs["florg"]["from"] == "florg@hlr0.03-init0.02" and lrs["florg"]["chosen"] == VAL_BEST
    assert lrs["florg"]["settings"] == {"train.head_lr": 0.03, "method.florg.init_scale": 0.02}
    assert lrs["fedit"]["settings"] == {"train.head_lr": 0.03}
    assert lrs["florg-noalign"]["settings"] == lrs["florg"]["settings"]
    final = plan_phase(study, "final")
    assert {s.group for s in final} == {"florg", "fedit", "florg-noalign"}  # sweep points are never final rows
    florg = [s.cfg for s in final if s.group in ("florg", "florg-noalign")]
    assert {(c.train.head_lr, c.method.florg.init_scale, c.train.lr) for c in florg} == {(0.03, 0.02, VAL_BEST)}
    assert {c.method.florg.procrustes for c in florg} == {"paper", "none"}
    run_phase(study, "final", log=lambda m: None)
    md = (tmp_path / "results" / "four" / "results.md").read_text()
    assert "train.head_lr = 0.03, method.florg.init_scale = 0.02" in md
    assert "best of its sweep points" in (tmp_path / "results" / "tuning.md").read_text()

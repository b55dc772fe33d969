"""``florg compare`` without Flower: planning, resume (skip complete runs), tables, plots, defaults."""

import json
from pathlib import Path

import pytest

import florg.fl.simulation as simulation
from florg.config import ConfigError, load_config
from florg.methods.registry import compare_rows
from florg.study.compare import (
    COMPARE_DEFAULTS,
    METHOD_ORDER,
    bytes_to_target,
    compare_config,
    parse_methods,
    plan_runs,
    run_compare,
)

ROOT = Path(__file__).resolve().parents[1]

FINAL = {"florg": 0.80, "fedit": 0.70, "florg-noalign": 0.75}  # fake final accuracies per method
PER_ROUND = {"florg": 1000, "fedit": 2000, "florg-noalign": 1000}  # fake bytes per round


def test_default_compare_config_is_configs_compare_toml():
    assert compare_config().to_dict() == load_config(ROOT / "configs" / "compare.toml").to_dict()
    cfg = compare_config()
    assert (cfg.data.num_clients, cfg.method.rank, cfg.data.alpha, cfg.data.partition) == (20, 4, 0.5, "dirichlet")
    assert COMPARE_DEFAULTS["train"]["rounds"] == cfg.train.rounds


def test_parse_methods():
    assert parse_methods("") == METHOD_ORDER
    assert parse_methods("florg-noalign, fedit,florg") == ["florg", "fedit", "florg-noalign"]
    with pytest.raises(ConfigError, match="valid: florg, fedit"):
        parse_methods("florg,fedavg")


def test_runs_share_one_config_and_only_the_method_differs(tmp_path):
    base = compare_config(["train.rounds=3", "method.florg.procrustes=top-r"])
    specs = plan_runs(base, tmp_path, METHOD_ORDER, seeds=2)
    assert [s.name for s in specs[:2]] == ["florg-seed0", "fedit-seed0"] and specs[-1].name == f"{METHOD_ORDER[-1]}-seed1"
    rows = {row.label: row for row in compare_rows()}
    shared = []
    for s in specs:
        d = s.cfg.to_dict()
        assert d["out_dir"] == str(tmp_path / "runs") and d["name"] == s.name
        meth, row = d["method"], rows[s.label]
        assert (meth.pop("name"), meth["florg"]["procrustes"]) == (
            row.method, "none" if s.label == "florg-noalign" else "top-r")
        assert all(meth[row.method][k] == v for k, v in row.options.items())  # the row's own options
        assert all(meth[k] == v for k, v in row.shared.items())
        for other in rows.values():  # everything no row sets is shared
            for key in other.options:
                meth[other.method].pop(key, None)
            for key in other.shared:
                meth.pop(key, None)
        for key in ("out_dir", "name", "seed"):
            d.pop(key)
        shared.append(json.dumps(d, sort_keys=True))
    assert len(set(shared)) == 1


def _fake_engine(calls):
    def fake(cfg, run_dir, reporter=None, verbose=False, **kw):
        calls.append(cfg.name)
        label = cfg.name.rsplit("-seed", 1)[0]
        final = FINAL[label] + 0.01 * cfg.seed
        cum = 0
        for r in range(cfg.train.rounds + 1):
            if r:
                cum += PER_ROUND[label]
            row = {"round": r, "test_accuracy": 0.25 + (final - 0.25) * r / cfg.train.rounds, "bytes_up": 0 if r == 0
                   else PER_ROUND[label] // 2, "bytes_down": 0 if r == 0 else PER_ROUND[label] // 2,
                   "bytes_total_cum": cum, "agg_rel_error_max": 0.0, "sent_rel_error_max": 0.1}
            run_dir.append_metrics(row)
            if reporter:
                reporter(row)
        run_dir.set_status("complete", rounds=cfg.train.rounds)
        return {}

    return fake


def test_compare_tables_plots_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls))
    base = compare_config(["train.rounds=4"])
    methods = ["florg", "fedit", "florg-noalign"]
    out = tmp_path / "cmp"
    logs = []
    res = run_compare(base, out, methods, seeds=2, target_fraction=0.9, log=logs.append)
    assert len(calls) == 6 and res["failed"] == []
    per = res["rows"]
    assert per["florg"]["final_by_seed"] == pytest.approx({0: 0.80, 1: 0.81})
    # target = 0.9 * best mean final (FLoRG, 0.805); FLoRG reaches it in round 4, FedIT never
    assert res["target"] == pytest.approx(0.9 * 0.805)
    assert per["florg"]["bytes_to_target"]["by_seed"] == {0: 4000, 1: 4000}
    assert per["fedit"]["bytes_to_target"]["reached"] == 0
    # paired by seed against FLoRG: FedIT is 10 points lower on both seeds
    assert per["fedit"]["vs_florg_final"]["differences"] == pytest.approx([-0.10, -0.10])
    md = (out / "results.md").read_text()
    assert "| Base model | Dataset | FLoRG | FedIT |" in md and "**80.50 ± 0.71**" in md
    assert "| minilm | FLoRG w/o alignment | 75.50 ± 0.71 |" in md and "| | difference | 5.00 |" in md
    assert "| FLoRG | 4.00 KB | 4.00 KB – 4.00 KB | 1.00× | 2/2 |" in md and "| FedIT | not reached | – | – | 0/2 |" in md
    assert "| FedIT | 2 | -10.00 [" in md
    for name in ("accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["rows"]["fedit"]["seeds"] == [0, 1]

    # Resume: complete runs are skipped; an incomplete one is run again from scratch.
    (out / "runs" / "fedit-seed1" / "status.json").write_text(json.dumps({"status": "running"}))
    calls.clear()
    run_compare(base, out, methods, seeds=2, target_fraction=0.9, log=logs.append)
    assert calls == ["fedit-seed1"]
    assert any("florg-seed0: complete, skipped" in m for m in logs)

    # A different shared configuration is refused, before anything runs.
    calls.clear()
    with pytest.raises(ConfigError, match="different configuration"):
        run_compare(compare_config(["train.rounds=5"]), out, methods, seeds=1, log=logs.append)
    assert calls == []


def test_settings_a_method_cannot_honour_fail_before_any_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls))
    with pytest.raises(ConfigError, match="method.client_ranks"):
        run_compare(compare_config(["method.client_ranks=[2,4]"]), tmp_path, ["flora", "fedit"], log=lambda m: None)
    assert calls == [] and not (tmp_path / "runs").exists()


def test_bytes_to_target():
    rows = [{"round": 0, "test_accuracy": 0.2, "bytes_total_cum": 0},
            {"round": 1, "test_accuracy": 0.6, "bytes_total_cum": 10},
            {"round": 2, "test_accuracy": 0.5, "bytes_total_cum": 20}]
    assert bytes_to_target(rows, 0.55) == 10 and bytes_to_target(rows, 0.2) == 0 and bytes_to_target(rows, 0.7) is None


def test_cli_compare_rejects_an_unknown_method_before_running(monkeypatch):
    from typer.testing import CliRunner

    from florg.cli.main import app

    calls = []
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_engine(calls))
    res = CliRunner().invoke(app, ["compare", "--methods", "florg,fedavg"])
    assert res.exit_code == 2 and "valid: florg, fedit" in res.output and calls == []


FINAL_LOSS = {"florg": 2.0, "fedit": 2.4, "florg-noalign": 2.2}  # fake final held-out losses per method


def _fake_lm_engine(calls):
    def fake(cfg, run_dir, reporter=None, verbose=False, **kw):
        calls.append(cfg.name)
        label = cfg.name.rsplit("-seed", 1)[0]
        final = FINAL_LOSS[label] + 0.1 * cfg.seed
        cum = 0
        for r in range(cfg.train.rounds + 1):
            cum += PER_ROUND[label] if r else 0
            loss = 4.0 + (final - 4.0) * r / cfg.train.rounds
            run_dir.append_metrics({"round": r, "test_loss": loss, "test_perplexity": 2.718281828 ** loss,
                                    "bytes_up": 0, "bytes_down": 0, "bytes_total_cum": cum})
        run_dir.set_status("complete", rounds=cfg.train.rounds)
        return {}

    return fake


def test_compare_of_an_instruction_task_ranks_by_the_lowest_loss(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(simulation, "run_simulation_engine", _fake_lm_engine(calls))
    base = compare_config(["train.rounds=4", "data.task=wordnet-define", "model.name=smollm2"])
    res = run_compare(base, tmp_path, ["florg", "fedit", "florg-noalign"], seeds=2, target_fraction=0.9,
                      log=lambda m: None)
    per = res["rows"]
    assert res["metric"] == "loss" and res["higher_is_better"] is False
    assert per["florg"]["final_by_seed"] == pytest.approx({0: 2.0, 1: 2.1})
    assert res["best_final"] == pytest.approx(2.05)  # the lowest mean, FLoRG's
    assert res["target"] == pytest.approx(2.05 / 0.9)  # within 1/0.9 of the best loss
    # FLoRG's loss falls by 0.5 per round: 2.5 after round 3 (> 2.278), 2.0 / 2.1 after round 4
    assert per["florg"]["bytes_to_target"]["by_seed"] == {0: 4000, 1: 4000}
    assert per["fedit"]["bytes_to_target"]["reached"] == 0
    md = (tmp_path / "results.md").read_text()
    assert "## Final loss, mean ± std over seeds" in md and "**2.0500 ± 0.0707**" in md
    for name in ("loss_vs_round.png", "loss_vs_bytes.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


def test_bytes_to_target_lower_is_better():
    rows = [{"round": 0, "test_loss": 4.0, "bytes_total_cum": 0}, {"round": 1, "test_loss": 3.0, "bytes_total_cum": 10},
            {"round": 2, "test_loss": 3.5, "bytes_total_cum": 20}]
    assert bytes_to_target(rows, 3.2, "test_loss", higher_is_better=False) == 10
    assert bytes_to_target(rows, 2.9, "test_loss", higher_is_better=False) is None

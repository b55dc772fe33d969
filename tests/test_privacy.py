"""Differential privacy (docs/privacy.md): clipping, noise, debiasing, central Gram noise, accounting, runs."""

import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from florg.config import ConfigError, load_config
from florg.core import aggregate_gram
from florg.core import privacy as dp
from florg.fl.privacy import PrivacyLedger
from florg.methods import FLoRGMethod, get_method

# ---------------------------------------------------------------------------- clipping


def test_clip_joint_bounds_the_norm_of_the_whole_upload():
    g = torch.Generator().manual_seed(0)
    ups = {"A/l0": torch.randn(4, 64, generator=g) * 3, "A/l1": torch.randn(4, 32, generator=g)}
    norm_before = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ups.values()))
    clipped, norm = dp.clip_joint(ups, 2.0)
    assert norm == pytest.approx(norm_before, rel=1e-12)
    assert dp.joint_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    # one common scale for all layers: the direction of the whole upload is kept
    for key in ups:
        assert torch.allclose(clipped[key], ups[key] * (2.0 / norm_before), rtol=1e-5, atol=1e-7)
        assert clipped[key].dtype == ups[key].dtype
    # per-layer norms are not clipped separately: a small layer stays small
    assert dp.joint_norm([clipped["A/l1"]]) < 2.0 * dp.joint_norm([ups["A/l1"]]) / norm_before + 1e-6


def test_clip_joint_leaves_small_uploads_alone_and_rejects_bad_input():
    small = {"A/x": torch.full((2, 3), 0.1)}
    clipped, norm = dp.clip_joint(small, 5.0)
    assert torch.equal(clipped["A/x"], small["A/x"]) and norm < 5.0
    with pytest.raises(ValueError, match="clip_norm"):
        dp.clip_joint(small, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        dp.clip_joint({"A/x": torch.tensor([[float("nan")]])}, 1.0)


# ---------------------------------------------------------------------------- noise


def test_gaussian_noise_has_mean_zero_and_std_sigma_c():
    sigma, c = 0.7, 1.5
    zeros = {"a": torch.zeros(200, 300), "b": torch.zeros(100, 100)}
    noisy = dp.add_gaussian(zeros, sigma * c, torch.Generator().manual_seed(1))
    flat = torch.cat([t.flatten().double() for t in noisy.values()])
    assert abs(float(flat.mean())) < 4 * sigma * c / math.sqrt(flat.numel())
    assert float(flat.std()) == pytest.approx(sigma * c, rel=0.01)


def test_noise_generator_reproducible_or_fresh():
    a = torch.randn(5, generator=dp.noise_generator(True, 0, 3, 1, "local"))
    b = torch.randn(5, generator=dp.noise_generator(True, 0, 3, 1, "local"))
    c = torch.randn(5, generator=dp.noise_generator(True, 0, 3, 2, "local"))
    d = torch.randn(5, generator=dp.noise_generator(False, 0, 3, 1, "local"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def _local_cfg(*extra):
    return load_config(None, ["privacy.mode=local", "privacy.clip_norm=2.0", "privacy.noise_multiplier=0.5", *extra])


def test_local_dp_upload_clips_then_adds_sigma_c_noise():
    cfg = _local_cfg("privacy.head_clip_norm=0.5")
    method = FLoRGMethod(cfg)
    g = torch.Generator().manual_seed(2)
    upload = {"A/l0": torch.randn(8, 400, generator=g), "A/l1": torch.randn(8, 400, generator=g),
              "head/classifier.weight": torch.randn(30, 100, generator=g)}
    received = {"A/l0": torch.zeros(8, 400), "A/l1": torch.zeros(8, 400),
                "head/classifier.weight": torch.randn(30, 100, generator=g)}
    out = method.privatize_upload(upload, received, torch.Generator().manual_seed(3))
    assert set(out) == set(upload) and all(out[k].dtype == upload[k].dtype for k in out)
    clipped, _ = dp.clip_joint({k: upload[k] for k in ("A/l0", "A/l1")}, 2.0)
    noise = torch.cat([(out[k] - clipped[k]).flatten().double() for k in clipped])
    assert float(noise.std()) == pytest.approx(0.5 * 2.0, rel=0.02)
    assert abs(float(noise.mean())) < 0.02
    # the head goes up as h_global + clip(h - h_global, C_head) + N(0, (sigma C_head)^2)
    delta = (upload["head/classifier.weight"] - received["head/classifier.weight"]).double()
    clipped_delta = delta * min(1.0, 0.5 / float(delta.norm()))
    head_noise = out["head/classifier.weight"].double() - received["head/classifier.weight"].double() - clipped_delta
    assert float(head_noise.std()) == pytest.approx(0.5 * 0.5, rel=0.05)


# ---------------------------------------------------------------------------- Gram noise and debiasing


def test_symmetric_noise_is_frobenius_isotropic():
    k, std = 300, 0.8
    z = dp.symmetric_gaussian(k, std, torch.Generator().manual_seed(4))
    assert torch.equal(z, z.T)
    iu = torch.triu_indices(k, k, 1)
    assert float(z.diagonal().var()) == pytest.approx(std**2, rel=0.2)
    # off-diagonal N(0, std^2/2): in the coordinates sqrt(2) Z_ij every entry has variance std^2
    assert float((math.sqrt(2) * z[iu[0], iu[1]]).var()) == pytest.approx(std**2, rel=0.02)


def test_debiasing_removes_the_expected_noise_gram_in_expectation():
    g = torch.Generator().manual_seed(5)
    r, k, n = 2, 6, 3
    factors = [torch.randn(r, k, generator=g, dtype=torch.float64) * 0.3 for _ in range(n)]
    p = [0.2, 0.3, 0.5]
    std = 0.5
    truth = sum(w * a.T @ a for w, a in zip(p, factors))
    shift = dp.noise_bias([r] * n, p, std)
    assert shift == pytest.approx(r * std**2)
    trials = 4000
    raw = torch.zeros(k, k, dtype=torch.float64)
    debiased = torch.zeros(k, k, dtype=torch.float64)
    noise_gen = torch.Generator().manual_seed(6)
    for _ in range(trials):
        noisy = [a + torch.randn(r, k, generator=noise_gen, dtype=torch.float64) * std for a in factors]
        raw += dp.noisy_gram(noisy, p)
        debiased += dp.noisy_gram(noisy, p, shift=shift)
    raw /= trials
    debiased /= trials
    # without debiasing the diagonal carries + r std^2; with it the mean matches the true Gram
    assert float((raw - truth).diagonal().mean()) == pytest.approx(r * std**2, abs=0.02)
    assert float((debiased - truth).abs().max()) < 0.03
    assert float((raw - truth).abs().max()) > 0.4


def test_central_gram_sensitivity_is_c_squared_over_m():
    """Adding/removing one clipped client moves the stacked Gram matrices by at most C^2/m (Frobenius)."""
    g = torch.Generator().manual_seed(7)
    c, m = 1.3, 5
    worst = 0.0
    for _ in range(200):
        layers = {f"A/l{i}": torch.randn(3, 10, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g) * 3)
                  for i in range(3)}
        clipped, _ = dp.clip_joint(layers, c)
        grams = [a.T @ a / m for a in clipped.values()]
        worst = max(worst, math.sqrt(sum(float((q**2).sum()) for q in grams)))
    assert worst <= c**2 / m * (1 + 1e-12)
    # attained by a rank-1 upload in one layer
    a = torch.zeros(3, 10, dtype=torch.float64)
    a[0, 0] = c
    assert float(torch.linalg.matrix_norm(a.T @ a / m)) == pytest.approx(c**2 / m)


def test_central_gram_noise_has_scale_sigma_c_squared_over_m():
    g = torch.Generator().manual_seed(8)
    c, sigma, m, k = 2.0, 0.6, 4, 200
    factors = [torch.randn(4, k, generator=g) for _ in range(3)]
    p = [1.0 / m] * 3
    std = dp.central_gram_std(c, sigma, m)
    assert std == pytest.approx(sigma * c**2 / m)
    noise = dp.noisy_gram(factors, p, noise_std=std, generator=torch.Generator().manual_seed(9)) - dp.noisy_gram(factors, p)
    iu = torch.triu_indices(k, k, 1)
    assert float(noise.diagonal().std()) == pytest.approx(std, rel=0.15)
    assert float(noise[iu[0], iu[1]].std()) == pytest.approx(std / math.sqrt(2), rel=0.03)
    # the noiseless part uses the fixed denominator m (weights need not sum to one)
    exact = sum(a.double().T @ a.double() for a in factors) / m
    assert torch.allclose(dp.noisy_gram(factors, p), exact, atol=1e-10)


def _central_cfg(*extra):
    return load_config(None, ["privacy.mode=central", "method.weighting=uniform", "privacy.clip_norm=1.0", *extra])


def test_central_aggregation_clips_each_client_and_noises_q():
    cfg = _central_cfg("privacy.noise_multiplier=1e-9", "privacy.head_clip_norm=0.5")
    method = FLoRGMethod(cfg)
    g = torch.Generator().manual_seed(10)
    k, r = 16, 4
    ups = [{"A/l0": torch.randn(r, k, generator=g) * 5, "A/l1": torch.randn(r, k, generator=g) * 5,
            "head/w": torch.randn(3, k, generator=g)} for _ in range(3)]
    current = {"A/l0": torch.randn(r, k, generator=g), "A/l1": torch.randn(r, k, generator=g), "head/w": torch.zeros(3, k)}
    new, metrics = method.aggregate_private(ups, current, denominator=4, generator=torch.Generator().manual_seed(0))
    assert metrics["dp_clipped_fraction"] == 1.0 and metrics["dp_upload_norm_mean"] > 1.0
    assert metrics["dp_gram_noise_std"] == pytest.approx(1e-9 / 4)
    clipped = [dp.clip_joint({k_: u[k_] for k_ in ("A/l0", "A/l1")}, 1.0)[0] for u in ups]
    for key in ("A/l0", "A/l1"):
        q = sum(c[key].double().T @ c[key].double() for c in clipped) / 4  # fixed denominator m = 4
        ref = aggregate_gram(q, previous=current[key], rank=r)
        assert torch.allclose(new[key], ref.factor, atol=1e-5)
    head = sum(dp.clip_joint({"w": u["head/w"].double()}, 0.5)[0]["w"] for u in ups) / 4
    assert torch.allclose(new["head/w"].double(), head, atol=1e-6)
    # real noise: reproducible per generator seed, different across seeds
    noisy = FLoRGMethod(_central_cfg("privacy.noise_multiplier=1.0"))
    a1, _ = noisy.aggregate_private(ups, current, denominator=3, generator=torch.Generator().manual_seed(1))
    a2, _ = noisy.aggregate_private(ups, current, denominator=3, generator=torch.Generator().manual_seed(1))
    a3, _ = noisy.aggregate_private(ups, current, denominator=3, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a1[key], a2[key]) for key in a1)
    assert not torch.equal(a1["A/l0"], a3["A/l0"])


def test_local_debias_runs_on_the_gram_path_with_the_expected_shift():
    cfg = _local_cfg()
    method = FLoRGMethod(cfg)
    g = torch.Generator().manual_seed(11)
    ups = [{"A/l0": torch.randn(4, 16, generator=g), "head/classifier.weight": torch.randn(2, 16, generator=g)}
           for _ in range(3)]
    current = {"A/l0": torch.randn(4, 16, generator=g), "head/classifier.weight": torch.zeros(2, 16)}
    new, metrics = method.aggregate(ups, [1, 2, 3], current)
    assert metrics["dp_debias_shift"] == pytest.approx(4 * (0.5 * 2.0) ** 2)
    p = [1 / 6, 2 / 6, 3 / 6]  # method.weighting=examples
    q = sum(w * u["A/l0"].double().T @ u["A/l0"].double() for w, u in zip(p, ups)) - 4.0 * torch.eye(16, dtype=torch.float64)
    assert torch.allclose(new["A/l0"], aggregate_gram(q, previous=current["A/l0"], rank=4).factor, atol=1e-5)
    plain, metrics_plain = FLoRGMethod(_local_cfg("privacy.debias=false")).aggregate(ups, [1, 2, 3], current)
    assert "dp_debias_shift" not in metrics_plain and not torch.allclose(plain["A/l0"], new["A/l0"])


# ---------------------------------------------------------------------------- accounting


def test_effective_noise_multipliers():
    s = 1.2
    assert dp.accounting_noise_multiplier("local", s, head=False) == pytest.approx(s / 2)
    assert dp.accounting_noise_multiplier("local", s, head=True) == pytest.approx(s / (2 * math.sqrt(2)))
    assert dp.accounting_noise_multiplier("central", s, head=False) == pytest.approx(s)
    assert dp.accounting_noise_multiplier("central", s, head=True) == pytest.approx(s / math.sqrt(2))
    assert dp.accounting_noise_multiplier("central", s, head=False, replace_one=True) == pytest.approx(s / math.sqrt(2))
    assert dp.accounting_noise_multiplier("central", s, head=True, replace_one=True) == pytest.approx(s / math.sqrt(6))


def _epsilon(mode, sigma, rounds, *extra):
    cfg = load_config(None, [f"privacy.mode={mode}", f"privacy.noise_multiplier={sigma}", "method.weighting=uniform",
                             "data.num_clients=10", *extra])
    ledger = PrivacyLedger(cfg)
    for _ in range(rounds):
        ledger.release(10)
    return ledger


def test_epsilon_decreases_with_sigma_and_grows_with_rounds():
    for mode in ("local", "central"):
        eps_sigma = [_epsilon(mode, s, 5).epsilon() for s in (0.5, 1.0, 2.0, 4.0)]
        assert eps_sigma == sorted(eps_sigma, reverse=True) and len(set(eps_sigma)) == 4
        eps_rounds = [_epsilon(mode, 1.0, t).epsilon() for t in (1, 2, 5, 10)]
        assert eps_rounds == sorted(eps_rounds) and len(set(eps_rounds)) == 4
    assert _epsilon("central", 1.0, 0).row() == {"privacy_epsilon": 0.0, "privacy_delta": 1e-5, "privacy_releases": 0}


def test_epsilon_matches_dp_accounting_called_directly():
    for mode, head, expected_sigma in (("central", "false", 2.0), ("central", "true", 2.0 / math.sqrt(2)),
                                       ("local", "false", 1.0), ("local", "true", 1.0 / math.sqrt(2))):
        ledger = _epsilon(mode, 2.0, 7, f"method.train_head={head}")
        assert ledger.noise_multiplier == pytest.approx(expected_sigma)
        direct = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
        direct.compose(dp_event.GaussianDpEvent(expected_sigma), 7)
        assert ledger.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    # amplification: sampling 3 of 10 without replacement, replace-one neighbours
    ledger = _epsilon("central", 2.0, 0, "privacy.amplification=true", "federation.fraction_train=0.3")
    for _ in range(7):
        ledger.release(3)
    direct = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    direct.compose(dp_event.SampledWithoutReplacementDpEvent(10, 3, dp_event.GaussianDpEvent(2.0 / math.sqrt(6))), 7)
    assert ledger.epsilon() == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)


def test_ledger_state_survives_a_checkpoint():
    ledger = _epsilon("central", 1.0, 3)
    fresh = _epsilon("central", 1.0, 0)
    fresh.load_state_dict(ledger.state_dict())
    assert fresh.releases == 3 and fresh.epsilon() == ledger.epsilon()


# ---------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["privacy.mode=global"], "privacy.mode"),
        (["privacy.mode=local", "privacy.clip_norm=0"], "privacy.clip_norm"),
        (["privacy.mode=local", "privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
        (["privacy.mode=local", "privacy.delta=1"], "privacy.delta"),
        (["privacy.mode=local", "privacy.head_clip_norm=-1"], "privacy.head_clip_norm"),
        (["privacy.mode=local", "privacy.amplification=true"], "privacy.amplification"),
        (["privacy.mode=central"], "method.weighting"),  # default weighting is 'examples'
    ],
)
def test_bad_privacy_config_is_a_config_error_naming_the_field(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("name", ["fedit", "ffa-lora", "flora"])
def test_privacy_needs_a_method_that_supports_it(name):
    with pytest.raises(ConfigError, match=r"privacy\.mode.*no differential-privacy support"):
        get_method(load_config(None, [f"method.name={name}", "privacy.mode=local"]))
    get_method(load_config(None, [f"method.name={name}"]))  # fine without DP
    get_method(load_config(None, ["privacy.mode=local"]))  # FLoRG supports it


def test_missing_accounting_backend_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dp_accounting" else real(name, *a))
    with pytest.raises(ConfigError, match="dp-accounting"):
        get_method(load_config(None, ["privacy.mode=local"]))
    get_method(load_config(None, []))  # not needed without DP


def test_cli_rejects_dp_for_other_methods_before_training(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from florg.cli.main import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["run", "--set", f"out_dir={tmp_path / 'runs'}", "--set", "method.name=fedit",
                                   "--set", "privacy.mode=central", "--set", "method.weighting=uniform"],
                             catch_exceptions=False)
    assert res.exit_code == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "privacy.mode" in errors[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ---------------------------------------------------------------------------- tiny simulations


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
@pytest.mark.parametrize("mode, extra", [("local", []), ("central", ["method.weighting=uniform"])])
def test_tiny_simulation_with_dp_writes_epsilon(tmp_path, tiny_overrides, mode, extra):
    from florg.fl.simulation import run_simulation_engine
    from florg.run.rundir import RunDir

    dp_overrides = ["privacy.clip_norm=3.0", "privacy.noise_multiplier=0.8", "privacy.reproducible_noise=true"]
    cfg = load_config(None, [*tiny_overrides, *dp_overrides, f"privacy.mode={mode}", *extra, f"out_dir={tmp_path}",
                             f"name={mode}"])
    run_dir = RunDir.create(cfg)
    summary = run_simulation_engine(cfg, run_dir, reporter=lambda row: None)
    rows = run_dir.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["privacy_epsilon"] == 0.0
    expected = _epsilon(mode, 0.8, 0, "data.num_clients=3")
    for row in rows[1:]:
        expected.release(3)
        assert row["privacy_delta"] == 1e-5 and row["privacy_releases"] == row["round"]
        assert row["privacy_epsilon"] == pytest.approx(expected.epsilon(), rel=1e-12)
        assert row["participants"] == 3 and math.isfinite(row["test_loss"])
    assert 0 < rows[1]["privacy_epsilon"] < rows[2]["privacy_epsilon"]
    if mode == "central":
        assert rows[1]["dp_gram_noise_std"] == pytest.approx(0.8 * 3.0**2 / 3)
    else:
        assert rows[1]["dp_debias_shift"] > 0
    assert summary["accuracy_after"] == rows[-1]["test_accuracy"]
    if mode == "central":
        _resume_keeps_counting(cfg, run_dir, rows)


def _resume_keeps_counting(cfg, run_dir, rows):
    """Cut the run back to its round-1 checkpoint; the resumed round 2 continues the accountant's count."""
    from florg.fl.simulation import run_simulation_engine
    from florg.run.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run_dir.path)
    assert ckpt["privacy"]["compositions"][0]["count"] == 1 and len(ckpt["privacy"]["compositions"]) == 2
    ckpt["round"] = 1
    ckpt["privacy"]["compositions"] = ckpt["privacy"]["compositions"][:1]
    save_checkpoint(run_dir.path, {k: v for k, v in ckpt.items() if k != "rng"})
    run_dir.set_status("running")
    run_simulation_engine(cfg, run_dir, reporter=lambda row: None, resume=True)
    resumed = run_dir.read_metrics()
    assert [r["round"] for r in resumed] == [0, 1, 2]
    assert resumed[2]["privacy_releases"] == 2
    assert resumed[2]["privacy_epsilon"] == pytest.approx(rows[2]["privacy_epsilon"], rel=1e-12)

"""florg.study.stats against values computed by hand (and scipy where scipy is the reference)."""

import math

import pytest

from florg.study.stats import (
    bytes_to_target,
    final_value,
    last_k_mean,
    mean_std,
    paired_test,
    summarise_values,
    t_interval,
)


def test_mean_and_sample_std():
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5; std = sqrt(5 / 3)
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5.0 / 3.0), rel=1e-12)
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_t_interval_uses_the_t_quantile():
    # t_{0.975, 3} = 3.182446 (tables); half width = 3.182446 * sqrt(5/3) / 2 = 2.054260
    lo, hi = t_interval([1.0, 2.0, 3.0, 4.0])
    assert lo == pytest.approx(2.5 - 2.054260, abs=1e-5) and hi == pytest.approx(2.5 + 2.054260, abs=1e-5)
    # n = 2, t_{0.975, 1} = 12.7062; values 0 and 1: mean 0.5, std sqrt(0.5), half = 12.7062 * 0.5 = 6.3531
    lo, hi = t_interval([0.0, 1.0])
    assert hi - 0.5 == pytest.approx(6.3531, abs=1e-4)
    assert all(math.isnan(v) for v in t_interval([3.0]))
    s = summarise_values([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.min, s.max, s.mean) == (4, 1.0, 4.0, 2.5) and s.ci_low == pytest.approx(0.445740, abs=1e-5)


def test_paired_t_test_against_a_hand_computation():
    # differences 0.05, -0.02, 0.10: mean 0.043333, std 0.060277, t = mean / (std / sqrt 3) = 1.245176
    a = {0: 0.80, 1: 0.70, 2: 0.90}
    b = {0: 0.75, 1: 0.72, 2: 0.80}
    res = paired_test(a, b)
    assert res.seeds == [0, 1, 2] and res.differences == pytest.approx([0.05, -0.02, 0.10])
    assert res.mean == pytest.approx(0.0433333, abs=1e-6) and res.std == pytest.approx(0.0602771, abs=1e-6)
    assert res.t == pytest.approx(1.245176, abs=1e-5)
    # with 2 degrees of freedom the t distribution has a closed form: two-sided p = 1 - |t| / sqrt(t^2 + 2)
    assert res.p_t == pytest.approx(1.0 - res.t / math.sqrt(res.t**2 + 2.0), abs=1e-12)
    assert res.p_t == pytest.approx(0.339176, abs=1e-5)


def test_paired_test_reproduces_the_first_comparison():
    # FLoRG - FedIT paired by seed in the first 3-seed comparison: -1.0, -16.3, -6.3 points
    # (by hand: mean -7.867, std 7.769, t = -7.867 / (7.769 / sqrt 3) = -1.754, p = 1 - 1.754 / sqrt(1.754^2 + 2) = 0.222)
    fedit = {0: 0.90, 1: 0.90, 2: 0.90}
    florg = {0: 0.89, 1: 0.737, 2: 0.837}
    res = paired_test(florg, fedit)
    assert res.mean * 100 == pytest.approx(-7.8667, abs=1e-3) and res.std * 100 == pytest.approx(7.7694, abs=1e-3)
    assert res.t == pytest.approx(-1.7537, abs=1e-3) and res.p_t == pytest.approx(0.2216, abs=1e-3)


def test_wilcoxon_exact_small_sample_and_degenerate_cases():
    # three differences, all positive: the exact two-sided signed-rank p-value is 2 * (1/8) = 0.25
    res = paired_test({0: 1.1, 1: 2.2, 2: 3.3}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert res.p_wilcoxon == pytest.approx(0.25)
    # identical values: no test statistic; one shared seed: a difference but no test
    same = paired_test({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert same.mean == 0.0 and math.isnan(same.p_t) and math.isnan(same.p_wilcoxon)
    one = paired_test({0: 0.5, 1: 0.6}, {1: 0.4, 2: 0.9})
    assert one.seeds == [1] and one.differences == pytest.approx([0.2]) and math.isnan(one.p_t)
    assert paired_test({0: 1.0}, {1: 1.0}) is None


ROWS = [
    {"round": 0, "test_accuracy": 0.25, "test_loss": 1.40, "bytes_total_cum": 0},
    {"round": 1, "test_accuracy": 0.60, "test_loss": 1.00, "bytes_total_cum": 10},
    {"round": 2, "test_accuracy": 0.55, "test_loss": 0.90, "bytes_total_cum": 20},
    {"round": 3, "test_accuracy": 0.70, "test_loss": 0.80, "bytes_total_cum": 30},
    {"round": 4, "test_accuracy": 0.80, "test_loss": 0.85, "bytes_total_cum": 40},
]


def test_final_and_last3_mean():
    assert final_value(ROWS, "test_accuracy") == 0.80
    assert last_k_mean(ROWS, "test_accuracy", 3) == pytest.approx((0.55 + 0.70 + 0.80) / 3)
    # round 0 (the untrained model) never counts; fewer trained rounds than k: all of them
    assert last_k_mean(ROWS[:2], "test_accuracy", 3) == pytest.approx(0.60)
    # rounds without the key (e.g. a test split evaluated only in some rounds) are skipped
    sparse = [ROWS[0], {"round": 1}, ROWS[2], {"round": 3}, ROWS[4]]
    assert final_value(sparse, "test_accuracy") == 0.80
    assert last_k_mean(sparse, "test_accuracy", 3) == pytest.approx((0.55 + 0.80) / 2)
    with pytest.raises(KeyError):
        final_value(ROWS, "val_accuracy")


def test_bytes_to_target_both_directions():
    assert bytes_to_target(ROWS, "test_accuracy", 0.58) == 10
    assert bytes_to_target(ROWS, "test_accuracy", 0.25) == 0
    assert bytes_to_target(ROWS, "test_accuracy", 0.81) is None
    # lower is better (a loss): the first round at or below the target
    assert bytes_to_target(ROWS, "test_loss", 0.9, higher_is_better=False) == 20
    assert bytes_to_target(ROWS, "test_loss", 0.5, higher_is_better=False) is None

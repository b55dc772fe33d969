"""florg.core.consensus: the consensus/spread split of Q and the factors of Q_gamma, against dense k x k algebra."""

import math

import pytest
import torch

from florg.core import aggregate
from florg.core.consensus import consensus_stats, spread_factors

R, K, N = 3, 11, 5


def _round(seed=0, same=False):
    g = torch.Generator().manual_seed(seed)
    prev = torch.randn(R, K, generator=g, dtype=torch.float64)
    move = 0.3 * torch.randn(R, K, generator=g, dtype=torch.float64)
    factors = [prev + (move if same else 0.3 * torch.randn(R, K, generator=g, dtype=torch.float64)) for _ in range(N)]
    w = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    return factors, (w / w.sum()).tolist(), prev


def _gram(x):
    return x.T @ x


def test_q_is_the_mean_factor_s_gram_plus_the_spread():
    factors, p, _ = _round()
    q = sum(pi * _gram(a) for pi, a in zip(p, factors))
    mean = sum(pi * a for pi, a in zip(p, factors))
    spread = sum(pi * _gram(a - mean) for pi, a in zip(p, factors))
    assert torch.allclose(q, _gram(mean) + spread, atol=1e-12)
    for gamma in (1.0, 0.5, 0.0):
        fs, ws = spread_factors(factors, p, gamma)
        assert math.isclose(sum(ws), 1.0, rel_tol=1e-15)
        q_gamma = sum(w * _gram(f) for w, f in zip(ws, fs))
        assert torch.allclose(q_gamma, _gram(mean) + gamma * spread, atol=1e-12), gamma
    assert len(spread_factors(factors, p, 0.0)[0]) == 1  # gamma = 0: the mean factor alone, rank r
    with pytest.raises(ValueError, match="gamma"):
        spread_factors(factors, p, 1.5)


def test_gamma_zero_aggregate_is_exact_rank_r_and_gamma_one_is_the_paper_s():
    factors, p, prev = _round(1)
    mean = sum(pi * a for pi, a in zip(p, factors))
    fs, ws = spread_factors(factors, p, 0.0)
    res = aggregate(fs, ws, previous=prev, rank=R)
    assert torch.allclose(_gram(res.factor.double()), _gram(mean), atol=1e-12)  # nothing truncated
    fs, ws = spread_factors(factors, p, 1.0)
    a = aggregate(fs, ws, previous=prev, rank=R).factor
    b = aggregate(factors, p, previous=prev, rank=R).factor
    assert torch.allclose(a, b, atol=1e-10)


def test_consensus_stats_match_dense_algebra():
    factors, p, prev = _round(2)
    s = consensus_stats(factors, p, prev)
    moves = [_gram(a) - _gram(prev) for a in factors]
    mean = sum(pi * a for pi, a in zip(p, factors))
    cos = [float((moves[i] * moves[j]).sum() / (moves[i].norm() * moves[j].norm()))
           for i in range(N) for j in range(i + 1, N)]
    assert s["client_cosine"] == pytest.approx(sum(cos) / len(cos), rel=1e-10)
    assert s["consensus_norm"] == pytest.approx(float((_gram(mean) - _gram(prev)).norm()), rel=1e-10)
    spread = sum(pi * _gram(a - mean) for pi, a in zip(p, factors))
    assert s["spread_norm"] == pytest.approx(float(spread.norm()), rel=1e-10)
    assert s["move_norm"] == pytest.approx(float(sum(pi * m for pi, m in zip(p, moves)).norm()), rel=1e-10)
    assert s["client_move_norm"] == pytest.approx(sum(pi * float(m.norm()) for pi, m in zip(p, moves)), rel=1e-10)
    assert s["spread_ratio"] == pytest.approx(s["spread_norm"] / s["consensus_norm"])


def test_clients_that_agree_have_cosine_one_and_no_spread():
    factors, p, prev = _round(3, same=True)
    s = consensus_stats(factors, p, prev)
    assert s["client_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert s["spread_norm"] == pytest.approx(0.0, abs=1e-10)


def test_errors_against_the_mean_update_match_dense_algebra():
    from florg.core.consensus import errors_against_mean

    factors, p, prev = _round(4)
    q = sum(pi * _gram(a) for pi, a in zip(p, factors))
    sent = aggregate(*spread_factors(factors, p, 0.0), previous=prev, rank=R).factor.double()
    e = errors_against_mean(sent, factors, p, prev)
    assert e["sent_rel_error"] == pytest.approx(float((_gram(sent) - q).norm() / q.norm()), rel=1e-9)
    assert e["round_rel_error"] == pytest.approx(float((_gram(sent) - q).norm() / (q - _gram(prev)).norm()), rel=1e-9)
    assert "round_rel_error" not in errors_against_mean(sent, factors, p, None)

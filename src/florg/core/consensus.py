"""Consensus and spread of one round's client factors: what Gram averaging keeps that factor averaging cancels.

Every client of a round starts from the broadcast factor ``P`` (``r x k``) and uploads ``A_n``. The
paper's aggregate splits exactly (``sum p_n = 1``)::

    Q = sum_n p_n A_n^T A_n = Abar^T Abar + S,      Abar = sum_n p_n A_n,
                                                    S    = sum_n p_n (A_n - Abar)^T (A_n - Abar)

``Abar^T Abar - P^T P`` is the *consensus* move (what the clients agree on; FedAvg of the factors
keeps only this), ``S`` the *spread*: positive semi-definite, so disagreeing client moves add up
in ``Q`` instead of cancelling. :func:`spread_factors` builds the factors of
``Q_gamma = Abar^T Abar + gamma S`` for the thin path (``gamma = 1``: the paper's ``Q`` exactly;
``gamma = 0``: the Gram matrix of the mean factor, rank ``r``, nothing truncated).
:func:`consensus_stats` measures the split in a round (all in ``r x r`` products: nothing ``k x k``).

Pure torch, float64 inside.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["consensus_stats", "errors_against_mean", "spread_factors"]

_F64 = torch.float64


def _frob2(x: torch.Tensor) -> float:
    return float((x * x).sum())


def _gram_inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a^T a, b^T b>_F = ||a b^T||_F^2`` for factors ``a (r_a x k)``, ``b (r_b x k)``."""
    return _frob2(a @ b.T)


def consensus_stats(factors: Sequence[torch.Tensor], p: Sequence[float], previous: torch.Tensor) -> dict[str, float]:
    """How much the clients of one layer agree, and how ``Q - P^T P`` splits into consensus and spread.

    ``factors``: the uploads ``A_n`` (same shape as ``previous``, the broadcast ``P``); ``p``: the
    normalised weights. Returns:

    * ``client_cosine``: the mean over client pairs of the cosine between their Gram moves
      ``G_n = A_n^T A_n - P^T P`` (1: all move the same way; about 0: unrelated moves);
    * ``consensus_norm``: ``||Abar^T Abar - P^T P||_F``, the move FedAvg of the factors would make;
    * ``spread_norm``: ``||S||_F``, the move that only Gram averaging adds;
    * ``spread_ratio``: ``spread_norm / consensus_norm``;
    * ``move_norm``: ``||Q - P^T P||_F``, the paper's move; ``client_move_norm``: the weighted mean of ``||G_n||_F``.
    """
    a = [f.detach().to(_F64) for f in factors]
    prev = previous.detach().to(_F64)
    w = [float(x) for x in p]
    n = len(a)
    # <G_n, G_m> = <A_n'A_n, A_m'A_m> - <A_n'A_n, P'P> - <P'P, A_m'A_m> + <P'P, P'P>
    pp = _gram_inner(prev, prev)
    with_p = [_gram_inner(x, prev) for x in a]
    inner = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i, n):
            v = _gram_inner(a[i], a[j]) - with_p[i] - with_p[j] + pp
            inner[i][j] = inner[j][i] = v
    norms = [math.sqrt(max(inner[i][i], 0.0)) for i in range(n)]
    cosines = [inner[i][j] / (norms[i] * norms[j]) for i in range(n) for j in range(i + 1, n)
               if norms[i] > 0 and norms[j] > 0]
    mean = sum(wi * x for wi, x in zip(w, a, strict=True))
    devs = [x - mean for x in a]
    # ||Abar'Abar - P'P||^2 and ||S||^2 = sum_nm p_n p_m ||d_n d_m'||^2, ||Q - P'P||^2 = sum_nm p_n p_m <G_n, G_m>
    consensus = math.sqrt(max(_gram_inner(mean, mean) - 2 * _gram_inner(mean, prev) + pp, 0.0))
    spread = math.sqrt(max(sum(w[i] * w[j] * _gram_inner(devs[i], devs[j]) for i in range(n) for j in range(n)), 0.0))
    move = math.sqrt(max(sum(w[i] * w[j] * inner[i][j] for i in range(n) for j in range(n)), 0.0))
    return {
        "client_cosine": sum(cosines) / len(cosines) if cosines else float("nan"),
        "consensus_norm": consensus,
        "spread_norm": spread,
        "spread_ratio": spread / consensus if consensus > 0 else float("inf"),
        "move_norm": move,
        "client_move_norm": sum(wi * x for wi, x in zip(w, norms, strict=True)),
    }


def spread_factors(factors: Sequence[torch.Tensor], p: Sequence[float], gamma: float
                   ) -> tuple[list[torch.Tensor], list[float]]:
    """Factors and weights whose weighted Gram sum is ``Q_gamma = Abar^T Abar + gamma S`` (see the module).

    Returned as ``([Abar, c (A_1 - Abar), ...], [w_0, w_1, ...])`` with weights that sum to 1 (as the
    aggregation normalises them) and a common scale ``c`` folded into the factors: with
    ``W = 1 + gamma``, ``Q_gamma = (1/W) (W Abar^T Abar) + sum_n (gamma p_n / W) (W d_n^T d_n)``.
    ``gamma = 0`` gives the single factor ``Abar`` (weight 1).
    """
    if not 0.0 <= gamma <= 1.0 or not math.isfinite(gamma):
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    dtype = factors[0].dtype
    a = [f.detach().to(_F64) for f in factors]
    w = [float(x) for x in p]
    mean = sum(wi * x for wi, x in zip(w, a, strict=True))
    if gamma == 0.0:
        return [mean.to(dtype)], [1.0]
    total = 1.0 + gamma
    scale = math.sqrt(total)
    out = [(mean * scale).to(dtype)] + [((x - mean) * scale).to(dtype) for x in a]
    weights = [1.0 / total] + [gamma * wi / total for wi in w]
    return out, weights


def errors_against_mean(sent: torch.Tensor, factors: Sequence[torch.Tensor], p: Sequence[float],
                        previous: torch.Tensor | None) -> dict[str, float]:
    """``sent_rel_error`` and ``round_rel_error`` of the factor ``sent`` against the paper's target ``Q = sum p_n A_n^T A_n``.

    The exact mean of the clients' updates, whatever rule produced ``sent`` (``Q_gamma`` with
    ``gamma < 1`` moves away from it on purpose: this says by how much). ``||sent^T sent - Q||_F`` from
    ``r x r`` products: ``||X X^T||^2 - 2 sum p_n ||X A_n^T||^2 + sum_nm p_n p_m ||A_n A_m^T||^2``.
    """
    x = sent.detach().to(_F64)
    a = [f.detach().to(_F64) for f in factors]
    w = [float(v) for v in p]
    qq = sum(w[i] * w[j] * _gram_inner(a[i], a[j]) for i in range(len(a)) for j in range(len(a)))
    err = math.sqrt(max(_gram_inner(x, x) - 2 * sum(wi * _gram_inner(x, ai) for wi, ai in zip(w, a, strict=True))
                        + qq, 0.0))
    out = {"sent_rel_error": err / math.sqrt(qq) if qq > 0 else 0.0}
    if previous is not None:
        prev = previous.detach().to(_F64)
        upd2 = qq - 2 * sum(wi * _gram_inner(ai, prev) for wi, ai in zip(w, a, strict=True)) + _gram_inner(prev, prev)
        upd = math.sqrt(max(upd2, 0.0))
        out["round_rel_error"] = err / (upd if upd > 0 else 1.0)
    return out

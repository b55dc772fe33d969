"""Server-side FLoRG aggregation: exact Gram averaging, rank-r factorisation, Procrustes alignment.

Per adapted layer the server receives client factors ``A_n`` (``r_n x k``) with weights
``w_n`` and wants ``Q = sum_n p_n A_n^T A_n`` (``p_n = w_n / sum w``). ``Q`` is linear in the
uploads, so ``s L Q R = sum_n p_n dW_n`` exactly: FLoRG has no aggregation error.

Two equivalent paths compute the non-zero eigenpairs ``Q = P^T diag(lam) P`` and the canonical
factor ``A~ = diag(lam)^(1/2) P`` (``r' x k``):

* **thin** (used when ``sum r_n < k``): stack ``M = [sqrt(p_n) A_n]`` so that ``M^T M = Q``;
  eigendecompose the small ``(sum r_n) x (sum r_n)`` matrix ``G = M M^T = U diag(lam) U^T`` in
  float64; then ``A~ = U^T M``. No ``k x k`` matrix is ever formed.
* **gram** (used when ``sum r_n >= k``): accumulate ``Q`` reply by reply in float64
  (:class:`GramAccumulator`) and take its symmetric eigendecomposition.

Eigenpairs with ``lam <= eig_rtol * lam_max`` are treated as round-off and dropped
(``eig_rtol = 1e-12`` by default; the dropped mass is reported by the diagnostics).

The factor is then aligned to last round's global ``A_prev`` (``r x k``):

* ``variant="paper"``: keep all ``r'`` eigenpairs; ``S* = U V^T`` from the SVD of
  ``A_prev A~^T`` (``r x r'``); ``A_new = S* A~``. When ``r' <= r``, ``S*`` has orthonormal
  columns and ``A_new^T A_new = Q`` exactly (``A_new`` has rank ``r'``). When ``r' > r``,
  ``S* S*^T = I_r`` and ``A_new^T A_new`` is ``Q`` projected onto an r-dimensional subspace
  chosen to stay close to ``A_prev`` (this truncation is reported by the diagnostics).
* ``variant="top-r"``: keep the top ``r`` eigenpairs (zero rows when ``r' < r``), then the
  ``r x r`` orthogonal Procrustes rotation ``O* = U V^T`` of ``A_prev A~_r^T``. Keeps exactly
  the best rank-r approximation of ``Q`` and only rotates it.
* ``align=False``: the raw top-r eigen-factor (zero-padded when ``r' < r``), the paper's
  "w/o alignment" ablation.

Clients of different ranks (``blocks``): ``Q`` is ``k x k`` whatever each ``r_n``, so the Gram
aggregate stays exact. To serve a client of rank ``r_n`` the top-``r_n`` rows of the sent factor
must be meaningful, so the factor is aligned block by block: with the distinct ranks
``c_1 < ... < c_b = r`` the rows ``c_{j-1}:c_j`` are the eigen-rows ``c_{j-1}:c_j`` of ``A~``
(decreasing eigenvalues) rotated by their own Procrustes rotation against the same rows of
``A_prev`` (the last block by ``variant``). The leading ``c_j`` rows therefore span the top-``c_j``
eigenspace: a client of rank ``c_j`` receives the best rank-``c_j`` approximation of ``Q``.

The case ``r' < r``: both variants return an ``r x k`` factor of rank ``r'`` with
``A_new^T A_new = Q`` exactly. Note that under plain gradient descent such a factor can not
regain rank (``A (I - eta G)`` has rank ``<= r'``); adaptive optimisers (Adam) can.

Everything is computed in float64 on the device the uploads are on; the returned factor has
the uploads' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .gram import (
    _F64,
    DEFAULT_EIG_RTOL,
    GramAccumulator,
    GramFactor,
    _eigen,
    _gram_path_eigen,
    _ThinSpectrum,
    gram_eigen,
)
from .validation import (
    Path,
    _check_blocks,
    _check_eig_rtol,
    _check_layer,
    _check_previous,
    _check_structure,
    check_factors,
)

__all__ = ["DEFAULT_EIG_RTOL", "AggregationResult", "GramAccumulator", "GramFactor", "Variant", "aggregate",
           "aggregate_gram", "gram_eigen", "procrustes_align"]

Variant = Literal["paper", "top-r"]


def _rotation(x: torch.Tensor) -> torch.Tensor:
    """``U V^T`` from the SVD of the small ``r x r`` matrix ``x`` (on the host, like :func:`_small_eigh`)."""
    u, _, vh = torch.linalg.svd(x.cpu() if x.device.type != "cpu" else x, full_matrices=False)
    return (u @ vh).to(x.device)


def procrustes_align(
    previous: torch.Tensor | None,
    factor: GramFactor,
    rank: int,
    *,
    variant: Variant = "paper",
    align: bool = True,
    layer: str = "<layer>",
) -> torch.Tensor:
    """Return the ``rank x k`` float64 factor to send down (see the module docstring).

    ``previous=None`` (no reference yet) gives the unaligned top-r factor. ``previous`` must
    have shape ``(rank, k)``; ``layer`` only names the layer in error messages.
    """
    k = factor.k
    if variant not in ("paper", "top-r"):
        raise ValueError(f"layer {layer!r}: variant must be 'paper' or 'top-r', got {variant!r}")
    _check_previous(previous, rank, k, layer)
    return _align(previous, factor, rank, variant, align)[0]


def _align(
    previous: torch.Tensor | None, factor: GramFactor, rank: int, variant: Variant, align: bool,
    blocks: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factor to send down, dense (``rank x k``), and as coefficients ``C`` on ``factor.base``.

    ``dense = C @ factor.base`` up to rounding; ``C`` is ``rank x m`` (``m = factor.base.shape[0]``).
    ``blocks`` (row boundaries ``c_1 < ... < c_b = rank``, see :func:`aggregate`) aligns block by
    block; ``None`` or one block is the plain alignment. Inputs are assumed validated (see
    :func:`procrustes_align`).
    """
    if blocks is not None and len(blocks) > 1 and align and previous is not None and factor.rank > 0:
        return _align_blocks(previous, factor, rank, variant, list(blocks))
    k = factor.k
    r_prime = factor.rank
    device = factor.base.device
    m = int(factor.base.shape[0])
    if r_prime == 0:
        zeros = torch.zeros(rank, m, dtype=_F64, device=device)
        return torch.zeros(rank, k, dtype=_F64, device=device), zeros
    top = min(rank, r_prime)
    if not align or previous is None:
        out = torch.zeros(rank, k, dtype=_F64, device=device)
        out[:top] = factor.dense(top)
        coeff = torch.zeros(rank, m, dtype=_F64, device=device)
        coeff[:top] = factor.coeff[:top]
        return out, coeff
    prev = previous.to(dtype=_F64, device=device)
    if variant == "paper":
        coeff = _rotation(factor.cross(prev)) @ factor.coeff  # as in GramFactor.left_mul
        return coeff @ factor.base, coeff
    if variant == "top-r":
        cross = torch.zeros(rank, rank, dtype=_F64, device=device)
        cross[:, :top] = factor.cross(prev, rows=top)
        rot = _rotation(cross)  # r x r orthogonal
        coeff = rot[:, :top] @ factor.coeff[:top]
        return coeff @ factor.base, coeff
    raise AssertionError("unreachable: variant was validated by the caller")


def _align_blocks(
    previous: torch.Tensor, factor: GramFactor, rank: int, variant: Variant, blocks: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise alignment for clients of different ranks (``blocks`` = the distinct ranks, ascending).

    Rows ``c_{j-1}:c_j`` of the result are eigen-rows ``c_{j-1}:c_j`` of ``A~`` (decreasing
    eigenvalue order) rotated by their own ``b x b`` orthogonal Procrustes against the same rows
    of ``previous``, so the leading ``c_j`` rows always span the top-``c_j`` eigenspace of ``Q``:
    a client of rank ``c_j`` that receives them holds the best rank-``c_j`` approximation of ``Q``.
    The last block follows ``variant``: ``"top-r"`` rotates eigen-rows ``c_{b-1}:rank``,
    ``"paper"`` projects all remaining eigen-rows ``c_{b-1}:r'`` with a semi-orthogonal ``S*``.
    """
    m = int(factor.base.shape[0])
    device = factor.base.device
    prev = previous.to(dtype=_F64, device=device)
    r_prime = factor.rank
    coeff = torch.zeros(rank, m, dtype=_F64, device=device)
    lo = 0
    for j, hi in enumerate(blocks):
        last = j == len(blocks) - 1
        stop = r_prime if (last and variant == "paper") else min(hi, r_prime)
        if stop > lo:
            t = factor.coeff[lo:stop]  # eigen-rows lo:stop of A~, as coefficients on M
            cross = torch.zeros(hi - lo, max(hi - lo, stop - lo), dtype=_F64, device=device)
            cross[:, : stop - lo] = (prev[lo:hi] @ factor.base.T) @ t.T
            coeff[lo:hi] = _rotation(cross)[:, : stop - lo] @ t
        lo = hi
    return coeff @ factor.base, coeff


def _gram_diff_norm(x: torch.Tensor, coeff: torch.Tensor, target: GramFactor, thin: _ThinSpectrum | None) -> float:
    """``|| x^T x - Q ||_F`` for ``x = coeff @ target.base``, never forming a k x k matrix on the thin path.

    Gram path: dense, with the ``Q`` that was decomposed. Thin path: ``Q = M^T M`` and
    ``G = M M^T = W W^T`` with ``W = U diag(sqrt(lam))``, so ``M = W V^T`` for some ``V`` with
    orthonormal columns and ``x = C M`` has coordinates ``P = C W`` in that basis of the row
    space of ``M``; hence ``||x^T x - M^T M||_F = ||P^T P - W^T W||_F``, an ``m x m`` computation.
    It measures the factor in its exact coefficient form (orthogonality of the eigenvectors,
    eigenvalues dropped as round-off, truncation to rank r), not the rounding of the final dense
    product ``C @ M`` (a few ulps).
    """
    if target.gram is not None:
        return float(torch.linalg.matrix_norm(x.T @ x - target.gram))
    assert thin is not None
    w, wtw = thin.root()
    cx = coeff @ w
    return float(torch.linalg.matrix_norm(cx.T @ cx - wtw))


def _update_norm(target: GramFactor, thin: _ThinSpectrum | None, prev: torch.Tensor) -> float:
    """``|| Q - A_prev^T A_prev ||_F`` (the round's exact mean update in ``k x k`` coordinates).

    Gram path: dense. Thin path: with ``Z = [M; A_prev]`` and ``D = diag(1 (m times), -1 (r times))``,
    ``Q - A_prev^T A_prev = Z^T D Z``; a thin QR ``Z^T = V T`` gives ``||Z^T D Z||_F = ||T D T^T||_F``,
    so no ``k x k`` matrix is formed.
    """
    if target.gram is not None:
        return float(torch.linalg.matrix_norm(target.gram - prev.T @ prev))
    assert thin is not None
    z = torch.cat([target.base, prev], dim=0)
    sign = torch.ones(z.shape[0], dtype=_F64, device=z.device)
    sign[target.base.shape[0]:] = -1.0
    _, t = torch.linalg.qr(z.T, mode="reduced")
    return float(torch.linalg.matrix_norm((t * sign) @ t.T))


def _procrustes_gap(x: torch.Tensor, prev: torch.Tensor, blocks: Sequence[int] | None) -> float:
    """``||X - A_prev||_F^2 - min_O ||O X - A_prev||_F^2`` over the rotations ``O`` that keep ``X``'s Gram.

    ``O`` ranges over ``r x r`` orthogonal matrices (block-diagonal ones with ``blocks``). The
    minimum has the closed form ``||X||^2 + ||A_prev||^2 - 2 ||X A_prev^T||_*`` (nuclear norm), so
    the gap is ``2 (||X A_prev^T||_* - tr(X A_prev^T))`` summed over blocks: zero exactly when ``X``
    is already the optimally rotated factor, positive otherwise.
    """
    bounds = list(blocks) if blocks else [int(x.shape[0])]
    gap, lo = 0.0, 0
    for hi in bounds:
        c = x[lo:hi] @ prev[lo:hi].T
        gap += 2.0 * (float(torch.linalg.svdvals(c).sum()) - float(torch.diagonal(c).sum()))
        lo = hi
    return gap


def _q_norm(target: GramFactor, thin: _ThinSpectrum | None) -> float:
    if target.gram is not None:
        return float(torch.linalg.matrix_norm(target.gram))
    assert thin is not None
    return float(torch.linalg.matrix_norm(thin.g))  # ||M^T M||_F = ||M M^T||_F


@dataclass
class AggregationResult:
    """The outcome of aggregating one layer.

    ``factor`` is the ``r x k`` global ``A`` to send down (in the uploads' dtype);
    ``eigenvalues`` are the kept eigenvalues of ``Q`` (float64, decreasing; ``rank_q = r'``);
    ``diagnostics`` holds (when requested):

    * ``agg_rel_error``: ``||L (A~^T A~ - Q) R||_F / ||L Q R||_F`` -- the error of the exact
      aggregate, zero up to rounding (and the eigenvalues dropped as round-off);
    * ``sent_rel_error``: the same for the rank-r factor actually sent down, which also carries
      the truncation to rank r when ``r' > r``;
    * ``round_rel_error``: ``||A_new^T A_new - Q||_F / ||Q - A_prev^T A_prev||_F``, the error of
      the update actually sent relative to the round's exact mean update (``L``, ``R`` orthonormal:
      the same ratio as ``||dW_sent - dW_exact|| / ||dW_exact - dW_prev||``);
    * ``drift``: ``||A_new - A_prev||_F``;
    * ``delta_proc``: the paper's ``Delta_proc = ||S A~ - A_prev||_F^2 - ||S* A~ - A_prev||_F^2`` for
      the factor actually sent (``S A~ = A_new``) against the optimal rotation of the same factor
      (same Gram matrix): ``||A_new - A_prev||^2 - min_O ||O A_new - A_prev||^2`` over orthogonal
      ``r x r`` ``O`` (block-diagonal with ``blocks``). Zero (up to rounding) when the factor was
      aligned, positive for the unaligned ablation;
    * ``align_gain``: ``||A_raw - A_prev||_F^2 - ||A_new - A_prev||_F^2`` with ``A_raw`` the raw
      top-r eigen-factor: how much closer alignment brought the sent factor (zero when
      ``align=False``). For the paper variant with ``r' > r`` the two factors have different Gram
      matrices, so this is not a distance between factors of the same ``Q``;
    * ``tail_energy``: share of ``trace(Q)`` outside the top-r eigenpairs.

    Because ``L`` has orthonormal columns and ``R`` orthonormal rows, ``||L X R||_F = ||X||_F``,
    so all errors are computed on ``k``-dimensional quantities, never on ``d x d`` matrices.
    """

    layer: str
    factor: torch.Tensor
    eigenvalues: torch.Tensor
    rank_q: int
    path: str
    diagnostics: dict[str, float] = field(default_factory=dict)


def _finish(
    layer: str,
    gf: GramFactor,
    thin: _ThinSpectrum | None,
    previous: torch.Tensor | None,
    rank: int,
    variant: Variant,
    align: bool,
    diagnostics: bool,
    out_dtype: torch.dtype,
    blocks: Sequence[int] | None = None,
) -> AggregationResult:
    """Align, cast and (optionally) diagnose one layer. Inputs were validated by the caller."""
    new, new_coeff = _align(previous, gf, rank, variant, align, blocks)
    diag: dict[str, float] = {}
    if diagnostics:
        q_norm = _q_norm(gf, thin)
        denom = q_norm if q_norm > 0 else 1.0
        agg = gf.dense() if thin is None else None  # the thin path works on coefficients only
        diag["agg_rel_error"] = _gram_diff_norm(agg, gf.coeff, gf, thin) / denom
        sent_err = _gram_diff_norm(new, new_coeff, gf, thin)
        diag["sent_rel_error"] = sent_err / denom
        # All eigenvalues in decreasing order: the kept ones, then those dropped as round-off.
        spectrum = torch.cat([gf.eigenvalues, gf.dropped])
        trace = float(spectrum.sum())
        diag["tail_energy"] = float(spectrum[rank:].sum()) / trace if trace > 0 else 0.0
        if previous is not None:
            prev = previous.to(dtype=_F64, device=new.device)
            upd = _update_norm(gf, thin, prev)
            diag["round_rel_error"] = sent_err / (upd if upd > 0 else 1.0)
            d_new = float(torch.linalg.matrix_norm(new - prev))
            raw = new if not align else _align(None, gf, rank, variant, False)[0]
            d_raw = float(torch.linalg.matrix_norm(raw - prev))
            diag["drift"] = d_new
            diag["delta_proc"] = _procrustes_gap(new, prev, blocks)
            diag["align_gain"] = d_raw**2 - d_new**2
    return AggregationResult(
        layer=layer,
        factor=new.to(out_dtype),
        eigenvalues=gf.eigenvalues,
        rank_q=gf.rank,
        path=gf.path,
        diagnostics=diag,
    )


def aggregate(
    factors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    previous: torch.Tensor | None = None,
    rank: int | None = None,
    variant: Variant = "paper",
    align: bool = True,
    path: Path = "auto",
    eig_rtol: float = DEFAULT_EIG_RTOL,
    diagnostics: bool = True,
    layer: str = "<layer>",
    blocks: Sequence[int] | None = None,
) -> AggregationResult:
    """Aggregate one layer's client factors into the next global ``A`` (``rank x k``).

    ``rank`` defaults to ``previous.shape[0]``, else to the largest client rank.

    ``blocks`` serves clients of different ranks: the distinct client ranks in increasing order,
    the last one equal to ``rank`` (e.g. ``(2, 4, 8)``). The factor is then aligned block by block
    (rows ``0:2``, ``2:4``, ``4:8``, each with its own Procrustes rotation against the same rows of
    ``previous``), so that its leading ``r_n`` rows are the aligned top-``r_n`` eigen-factor of
    ``Q``: a client of rank ``r_n`` receives rows ``0:r_n``. ``None`` (or one block) is the usual
    single alignment.
    """
    if variant not in ("paper", "top-r"):
        raise ValueError(f"layer {layer!r}: variant must be 'paper' or 'top-r', got {variant!r}")
    k = _check_structure(factors, layer)
    try:
        rank, p, chosen = _check_layer(factors, k, weights, previous, rank, blocks, path, eig_rtol, layer)
    except ValueError:
        check_factors(factors, layer=layer)  # a NaN/Inf upload is reported first, as check order demands
        raise
    gf, thin = _eigen(factors, p, chosen, k, eig_rtol, layer)  # thin path: finiteness checked on M
    return _finish(layer, gf, thin, previous, rank, variant, align, diagnostics, factors[0].dtype, blocks)


def aggregate_gram(
    q: torch.Tensor,
    *,
    previous: torch.Tensor | None = None,
    rank: int,
    variant: Variant = "paper",
    align: bool = True,
    eig_rtol: float = DEFAULT_EIG_RTOL,
    diagnostics: bool = True,
    layer: str = "<layer>",
    out_dtype: torch.dtype = torch.float32,
    blocks: Sequence[int] | None = None,
) -> AggregationResult:
    """Aggregate one layer from a given symmetric ``k x k`` matrix ``Q`` (the Gram path).

    For a ``Q`` that was not formed from the uploads alone, e.g. with privacy noise added or
    a bias subtracted (:mod:`florg.core.privacy`). ``Q`` need not be PSD: eigenvalues at or
    below ``eig_rtol * lam_max`` (so every negative one) are dropped. The diagnostics compare
    with this ``Q``.
    """
    if q.ndim != 2 or q.shape[0] != q.shape[1] or q.shape[0] < 1:
        raise ValueError(f"layer {layer!r}: Q must be a square k x k matrix, got shape {tuple(q.shape)}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError(f"layer {layer!r}: Q contains NaN or Inf")
    if variant not in ("paper", "top-r"):
        raise ValueError(f"layer {layer!r}: variant must be 'paper' or 'top-r', got {variant!r}")
    _check_previous(previous, rank, int(q.shape[0]), layer)
    _check_blocks(blocks, rank, layer)
    _check_eig_rtol(eig_rtol, layer)
    q = q.to(dtype=_F64)
    gf = _gram_path_eigen(0.5 * (q + q.T), eig_rtol)
    return _finish(layer, gf, None, previous, rank, variant, align, diagnostics, out_dtype, blocks)



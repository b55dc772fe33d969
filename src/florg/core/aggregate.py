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

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .validation import check_factors, normalise_weights

DEFAULT_EIG_RTOL = 1e-12
Variant = Literal["paper", "top-r"]
Path = Literal["auto", "thin", "gram"]
_F64 = torch.float64


@dataclass
class GramFactor:
    """The canonical factor ``A~ = diag(lam)^(1/2) P`` of ``Q``, kept implicit as ``A~ = T @ M``.

    On the thin path ``T = U_kept^T`` (``r' x sum r_n``) and ``M`` is the stacked weighted
    uploads, so products with ``A~`` never need its dense form; on the gram path ``T`` is the
    identity and ``M = A~``. ``eigenvalues`` are in decreasing order.
    """

    eigenvalues: torch.Tensor  # (r',) float64, decreasing, all > tol
    coeff: torch.Tensor  # T: (r', m) float64
    base: torch.Tensor  # M: (m, k) float64
    dropped: torch.Tensor  # eigenvalues treated as round-off (float64)
    path: str
    gram: torch.Tensor | None = None  # Q (k x k) on the gram path, else None

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())

    @property
    def k(self) -> int:
        return int(self.base.shape[1])

    def dense(self, rows: int | None = None) -> torch.Tensor:
        """``A~`` (or its first ``rows`` rows) as a dense float64 matrix."""
        t = self.coeff if rows is None else self.coeff[:rows]
        return t @ self.base

    def left_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ A~`` for ``x`` of shape ``(a, r')``."""
        return (x @ self.coeff) @ self.base

    def cross(self, a: torch.Tensor, rows: int | None = None) -> torch.Tensor:
        """``a @ A~[:rows]^T`` for ``a`` of shape ``(r, k)``."""
        t = self.coeff if rows is None else self.coeff[:rows]
        return (a @ self.base.T) @ t.T


class GramAccumulator:
    """Streaming ``Q = sum_n w_n A_n^T A_n / sum_n w_n`` in float64, one reply at a time.

    Memory is one ``k x k`` float64 matrix regardless of the number of clients. Use it when
    ``sum r_n >= k`` (or when replies arrive one by one and must not be kept).
    """

    def __init__(self, k: int, *, layer: str = "<layer>", device: torch.device | str | None = None) -> None:
        if k < 1:
            raise ValueError(f"layer {layer!r}: k must be positive, got {k}")
        self.k = k
        self.layer = layer
        self._q = torch.zeros(k, k, dtype=_F64, device=device)
        self._total = 0.0
        self._dtype: torch.dtype | None = None
        self.count = 0

    def add(self, factor: torch.Tensor, weight: float = 1.0) -> None:
        check_factors([factor], layer=self.layer, k=self.k)
        if self._dtype is not None and factor.dtype != self._dtype:
            raise ValueError(
                f"layer {self.layer!r}: mixed dtypes ({self._dtype} and {factor.dtype}); "
                "cast all factors to one dtype before aggregating"
            )
        normalise_weights([weight], 1, layer=self.layer)  # positivity / finiteness check
        self._dtype = factor.dtype
        a = factor.to(device=self._q.device, dtype=_F64)
        self._q.addmm_(a.T, a, alpha=float(weight))
        self._total += float(weight)
        self.count += 1

    def gram(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError(f"layer {self.layer!r}: empty client list; no factor was added")
        return self._q / self._total

    def eigen(self, eig_rtol: float = DEFAULT_EIG_RTOL) -> GramFactor:
        _check_eig_rtol(eig_rtol, self.layer)
        return _gram_path_eigen(self.gram(), eig_rtol)


def _check_eig_rtol(eig_rtol: float, layer: str) -> None:
    # A negative tolerance would keep round-off eigenvalues below zero (NaN square roots); NaN
    # would silently drop every eigenpair.
    if not 0.0 <= float(eig_rtol) < 1.0:
        raise ValueError(f"layer {layer!r}: eig_rtol must be in [0, 1), got {eig_rtol!r}")


def _split_eigs(lam: torch.Tensor, eig_rtol: float) -> int:
    """How many of the decreasing eigenvalues ``lam`` are kept: those ``> eig_rtol * lam[0]``, a prefix.

    A count rather than a boolean mask: slicing a prefix needs no device-to-host copy of the mask.
    """
    lam_max = float(lam[0]) if lam.numel() else 0.0
    if lam_max <= 0.0:
        return 0
    return int((lam > eig_rtol * lam_max).sum())


@dataclass
class _ThinSpectrum:
    """All ``m`` eigenpairs of ``G = M M^T = U diag(lam) U^T`` (decreasing) and ``G`` itself.

    Kept on the thin path for the diagnostics: ``W = U diag(sqrt(lam))`` satisfies
    ``G = W W^T``, so ``M = W V^T`` with orthonormal ``V`` and any ``X = C M`` has the
    coordinates ``C W`` in that basis of the row space of ``M``.
    """

    lam: torch.Tensor  # (m,) float64, decreasing
    u: torch.Tensor  # (m, m) float64, columns in the order of lam
    g: torch.Tensor  # (m, m) float64
    _w: tuple[torch.Tensor, torch.Tensor] | None = None

    def root(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, W^T W)`` with ``W = U diag(sqrt(lam))`` (computed once)."""
        if self._w is None:
            w = self.u * self.lam.clamp_min(0.0).sqrt()  # scales column j by sqrt(lam_j)
            self._w = (w, w.T @ w)
        return self._w


def _small_eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of small ``m x m`` matrices (``m = sum r_n``; batched or not), on the host.

    cuSOLVER solves a batch of 80 x 80 problems one matrix at a time at about a millisecond each,
    LAPACK in a fraction of that, so on a GPU the Gram matrices ``G = M M^T`` go to the host, are
    decomposed there and their eigenpairs come back; the ``m x k`` products stay on the device.
    The result is the CPU path's, bit for bit.
    """
    if g.device.type == "cpu":
        return torch.linalg.eigh(g)
    lam, u = torch.linalg.eigh(g.cpu())
    return lam.to(g.device), u.to(g.device)


def _rotation(x: torch.Tensor) -> torch.Tensor:
    """``U V^T`` from the SVD of the small ``r x r`` matrix ``x`` (on the host, like :func:`_small_eigh`)."""
    u, _, vh = torch.linalg.svd(x.cpu() if x.device.type != "cpu" else x, full_matrices=False)
    return (u @ vh).to(x.device)


def _thin_from_eigh(
    m: torch.Tensor, lam_asc: torch.Tensor, u_asc: torch.Tensor, eig_rtol: float
) -> tuple[GramFactor, _ThinSpectrum]:
    lam = lam_asc.flip(0)
    u = u_asc.flip(1)
    n = _split_eigs(lam, eig_rtol)
    gf = GramFactor(
        eigenvalues=lam[:n],
        coeff=u[:, :n].T.contiguous(),
        base=m,
        dropped=lam[n:].clamp_min(0.0),
        path="thin",
    )
    return gf, _ThinSpectrum(lam=lam, u=u, g=torch.empty(0))


def _gram_path_eigen(q: torch.Tensor, eig_rtol: float) -> GramFactor:
    lam_asc, v_asc = torch.linalg.eigh(q)
    lam = lam_asc.flip(0)
    v = v_asc.flip(1)
    n = _split_eigs(lam, eig_rtol)
    lam_k = lam[:n]
    factor = lam_k.sqrt()[:, None] * v[:, :n].T
    return GramFactor(
        eigenvalues=lam_k,
        coeff=torch.eye(lam_k.numel(), dtype=_F64, device=q.device),
        base=factor,
        dropped=lam[n:].clamp_min(0.0),
        path="gram",
        gram=q,
    )


def _row_scales(factors: Sequence[torch.Tensor], p: Sequence[float], device: torch.device) -> torch.Tensor:
    """``sqrt(p_n)`` repeated ``r_n`` times: the row scaling of the stacked uploads (float64)."""
    sizes = [int(a.shape[0]) for a in factors]
    roots = torch.tensor([math.sqrt(w) for w in p], dtype=_F64)
    return torch.repeat_interleave(roots, torch.tensor(sizes)).to(device)


def _stack(
    factors: Sequence[torch.Tensor], p: Sequence[float], scales: torch.Tensor | None = None
) -> torch.Tensor:
    """``M = [sqrt(p_1) A_1; ...; sqrt(p_N) A_N]`` in float64 (one copy, one scaling pass).

    ``scales`` (optional) is ``_row_scales(factors, p, device)``, precomputed for many layers.
    """
    device = factors[0].device
    if scales is None:
        scales = _row_scales(factors, p, device)
    out = torch.cat(list(factors), dim=0)
    out = out.to(dtype=_F64) if out.dtype != _F64 else out  # exact conversion to float64
    return out.mul_(scales[:, None])


def _check_structure(factors: Sequence[torch.Tensor], layer: str) -> int:
    """:func:`check_factors` minus its per-factor NaN/Inf scan; returns ``k``.

    The scan (one small tensor op per client and layer) is replaced by :func:`_check_finite` on
    the stacked float64 matrix. Anything unusual falls back to :func:`check_factors`, which
    raises its usual error (or returns ``k`` when all is well).
    """
    width = None
    dtype = None
    try:
        count = len(factors)
    except TypeError:
        count = 0
    if count == 0:
        return check_factors(factors, layer=layer)
    for a in factors:
        if not isinstance(a, torch.Tensor) or a.ndim != 2 or not a.is_floating_point():
            return check_factors(factors, layer=layer)
        if dtype is None:
            dtype = a.dtype
        r_n, w = a.shape
        if width is None:
            width = w
        if a.dtype != dtype or w != width or r_n < 1 or r_n > width:
            return check_factors(factors, layer=layer)
    return int(width)


def _check_finite(stacked: torch.Tensor, layers: Sequence[tuple[str, Sequence[torch.Tensor]]]) -> None:
    """Raise :func:`check_factors`' NaN/Inf error when ``stacked`` (built from ``layers``) is not finite.

    One reduction instead of one scan per upload: the sum is NaN or infinite whenever an entry
    is. A sum that merely overflows is a false alarm, and :func:`check_factors` then passes.
    """
    if not bool(torch.isfinite(stacked.sum())):  # also a sum of stacks' sums (one test for many layers)
        for name, factors in layers:
            check_factors(factors, layer=name)


def _choose_path(path: Path, total_rank: int, k: int, layer: str) -> str:
    if path == "auto":
        return "thin" if total_rank < k else "gram"
    if path not in ("thin", "gram"):
        raise ValueError(f"layer {layer!r}: path must be 'auto', 'thin' or 'gram', got {path!r}")
    return path


def _eigen(
    factors: Sequence[torch.Tensor], p: Sequence[float], chosen: str, k: int, eig_rtol: float, layer: str
) -> tuple[GramFactor, _ThinSpectrum | None]:
    if chosen == "thin":
        stacked = _stack(factors, p)
        _check_finite(stacked, [(layer, factors)])
        g = stacked @ stacked.T
        lam, u = _small_eigh(g)
        gf, spectrum = _thin_from_eigh(stacked, lam, u, eig_rtol)
        spectrum.g = g
        return gf, spectrum
    acc = GramAccumulator(k, layer=layer, device=factors[0].device)
    for a, w in zip(factors, p):
        acc.add(a, w)
    return acc.eigen(eig_rtol), None


def gram_eigen(
    factors: Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    path: Path = "auto",
    eig_rtol: float = DEFAULT_EIG_RTOL,
    layer: str = "<layer>",
) -> GramFactor:
    """Non-zero eigenpairs of ``Q = sum_n p_n A_n^T A_n`` as a :class:`GramFactor`.

    ``weights=None`` means uniform weights; otherwise ``p_n = w_n / sum w`` (e.g. example counts).
    """
    k = check_factors(factors, layer=layer)
    p = normalise_weights(weights, len(factors), layer=layer)
    chosen = _choose_path(path, sum(int(a.shape[0]) for a in factors), k, layer)
    _check_eig_rtol(eig_rtol, layer)
    return _eigen(factors, p, chosen, k, eig_rtol, layer)[0]


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


def _check_previous(previous: torch.Tensor | None, rank: int, k: int, layer: str) -> None:
    if rank < 1 or rank > k:
        raise ValueError(f"layer {layer!r}: rank {rank} is outside 1..k={k}")
    if previous is None:
        return
    if not isinstance(previous, torch.Tensor):
        raise ValueError(
            f"layer {layer!r}: previous global factor is {type(previous).__name__}, expected a torch.Tensor"
        )
    if previous.ndim != 2 or tuple(previous.shape) != (rank, k):
        raise ValueError(
            f"layer {layer!r}: previous global factor has shape {tuple(previous.shape)}, expected ({rank}, {k})"
        )
    if not bool(torch.isfinite(previous).all()):
        raise ValueError(f"layer {layer!r}: previous global factor contains NaN or Inf")


def _check_blocks(blocks: Sequence[int] | None, rank: int, layer: str) -> None:
    if blocks is None:
        return
    b = list(blocks)
    if not b or any(not isinstance(x, int) or x < 1 for x in b) or any(x >= y for x, y in zip(b, b[1:])) \
            or b[-1] != rank:
        raise ValueError(
            f"layer {layer!r}: blocks must be increasing positive ranks ending at the rank {rank}, got {b!r}"
        )


def _default_rank(previous: torch.Tensor | None, factors: Sequence[torch.Tensor], k: int, layer: str) -> int:
    """``previous.shape[0]`` when a (2-D) previous factor is given, else the largest client rank."""
    if previous is None:
        return max(int(a.shape[0]) for a in factors)
    if not isinstance(previous, torch.Tensor) or previous.ndim != 2:
        shape = tuple(previous.shape) if isinstance(previous, torch.Tensor) else type(previous).__name__
        raise ValueError(
            f"layer {layer!r}: previous global factor has shape {shape}, expected a 2-D (rank, {k}) matrix"
        )
    return int(previous.shape[0])


def _check_layer(
    factors: Sequence[torch.Tensor], k: int, weights: Sequence[float] | None, previous: torch.Tensor | None,
    rank: int | None, blocks: Sequence[int] | None, path: Path, eig_rtol: float, layer: str,
) -> tuple[int, list[float], str]:
    """The checks of one layer after its structure, in the documented order: ``(rank, p, path)``.

    Uploads are scanned for NaN/Inf here on the gram path only; the thin path tests its stacks.
    """
    p = normalise_weights(weights, len(factors), layer=layer)
    if rank is None:
        rank = _default_rank(previous, factors, k, layer)
    _check_previous(previous, int(rank), k, layer)
    _check_blocks(blocks, int(rank), layer)
    chosen = _choose_path(path, sum(int(a.shape[0]) for a in factors), k, layer)
    _check_eig_rtol(eig_rtol, layer)
    if chosen == "gram":
        check_factors(factors, layer=layer)
    return int(rank), p, chosen


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


def aggregate_model(
    uploads: Mapping[str, Sequence[torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    previous: Mapping[str, torch.Tensor] | None = None,
    rank: int | Mapping[str, int] | None = None,
    variant: Variant = "paper",
    align: bool = True,
    path: Path = "auto",
    eig_rtol: float = DEFAULT_EIG_RTOL,
    diagnostics: bool = True,
    blocks: Sequence[int] | None = None,
) -> dict[str, AggregationResult]:
    """Aggregate every adapted layer of a model in one call (``blocks``: see :func:`aggregate`).

    ``uploads[layer]`` holds the clients' factors for that layer, in the same client order
    for every layer (``weights`` apply to clients). Returns ``{layer: AggregationResult}`` with
    ``diagnostics["seconds"]`` unset; time the call as a whole.

    Thin-path layers on the host are done one at a time in a single pass: the float64 stack
    ``M`` (``m x k``) is written into one buffer per shape group (memory ``O(m k)`` for the whole
    model), ``G = M M^T`` and then only what the rule needs:

    * ``variant="paper"``, aligned to a previous factor, no diagnostics, ``rank Q = m`` (no
      eigenvalue dropped as round-off): the eigenvalues of ``G`` only (``eigvalsh``) and
      ``A_new = polar(A_prev M^T) M``. This is the paper's ``S* A~``: with ``A~ = U^T M`` and ``U``
      orthogonal, ``polar(A_prev M^T U) U^T = polar(A_prev M^T)``, so no eigenvector is needed.
      ``G`` and ``A_prev M^T`` come from two GEMMs over one stack (:func:`_gram_and_cross`), and the
      row scaling ``sqrt(p_n)`` is applied to ``G`` and to ``r x m`` matrices, not to ``M``.
      Same factor as the eigenvector route up to rounding (about 1e-15 relative); eigenvalues
      from LAPACK's eigenvalue-only driver (equal to those of ``eigh`` up to rounding).
    * otherwise the full eigendecomposition of ``G``, the same LAPACK routine as the batched
      call of :func:`_aggregate_model_reference` (the same factor, eigenvalues and diagnostics,
      bit for bit when MKL's result does not depend on the alignment of the matrix in memory:
      ``m * m`` a multiple of 8, e.g. ``m = 80``; otherwise up to rounding).

    The layers are spread over the host's intra-op threads (:func:`_map_layers`: one layer per thread
    at a time), so a layer's result does not depend on the thread count's effect on one GEMM.

    Uploads on a GPU keep the batched two-pass route of :func:`_aggregate_model_reference`
    (one host round trip per shape group).
    """
    return _aggregate_model(
        uploads, weights, previous=previous, rank=rank, variant=variant, align=align, path=path,
        eig_rtol=eig_rtol, diagnostics=diagnostics, blocks=blocks, fast=True,
    )


def _aggregate_model_reference(
    uploads: Mapping[str, Sequence[torch.Tensor]], weights: Sequence[float] | None = None, **kwargs: Any
) -> dict[str, AggregationResult]:
    """The previous route of :func:`aggregate_model`, kept for comparison (tests, ``bench_server.py``).

    Two passes over each shape group of thin layers: ``G = M M^T`` layer by layer, one batched
    full eigendecomposition per group, then ``M`` is rebuilt to align and diagnose each layer.
    """
    return _aggregate_model(uploads, weights, fast=False, **kwargs)


def _gram_and_cross(s: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S_m S_m^T, P S_m^T)`` for ``s = [S_m; P]`` (``S_m``: the first ``m`` rows), in two GEMMs, not four.

    ``G = S_m S_m^T`` is symmetric: with ``S_m = [S_1; S_2]`` (halves), ``s @ S_1^T`` gives ``G``'s first block
    column and ``P S_1^T``, and ``[S_2; P] @ S_2^T`` the last block of ``G`` and ``P S_2^T``; ``S_1 S_2^T`` is the
    transpose of a block already computed. About a quarter fewer multiply-adds than ``S_m S_m^T`` and
    ``P S_m^T`` apart, and one read of ``s`` fewer. Equal to those products up to rounding.
    """
    h = m // 2
    first = s @ s[:h].T  # (m + r) x h: [S_1 S_1^T; S_2 S_1^T; P S_1^T]
    second = s[h:] @ s[h:m].T  # (m - h + r) x (m - h): [S_2 S_2^T; P S_2^T]
    g = torch.empty(m, m, dtype=s.dtype)
    g[:, :h] = first[:m]
    g[:h, h:] = first[h:m].T
    g[h:, h:] = second[: m - h]
    return g, torch.cat([first[m:], second[m - h:]], dim=1)


def _finish_polar(
    layer: str, m: torch.Tensor, scales: torch.Tensor, lam: torch.Tensor, cross: torch.Tensor,
    out_dtype: torch.dtype,
) -> AggregationResult:
    """The paper variant's factor without eigenvectors: ``polar(A_prev M^T) M`` (see :func:`aggregate_model`).

    ``m`` is the unscaled stack, ``scales`` its row scales ``D`` (``M = D m``) and ``cross = A_prev m^T``:
    ``polar(A_prev m^T D) D m``, so the scaling touches two ``r x m`` matrices instead of ``m``. Only for
    ``rank Q = m`` (``lam``: all ``m`` eigenvalues of ``G``, decreasing, none dropped), no blocks, no diagnostics.
    """
    new = (_rotation(cross.mul_(scales)) * scales) @ m
    return AggregationResult(
        layer=layer, factor=new.to(out_dtype), eigenvalues=lam, rank_q=int(lam.numel()), path="thin", diagnostics={},
    )


def _map_layers(fn: Any, jobs: Sequence[tuple[str, torch.Tensor]]) -> list[AggregationResult]:
    """``[fn(*job) for job in jobs]``, spread over the host's intra-op threads.

    Each layer is one small problem (a skinny GEMM, an ``m x m`` eigenproblem, an ``r x m`` SVD) that one
    core does about as fast as two, so with ``t = torch.get_num_threads() > 1`` threads the layers go to
    ``t`` workers that each run one layer at a time on one thread (``torch.set_num_threads(1)`` for the
    duration of the call, restored after). A layer's result depends only on its own inputs, not on which
    worker ran it, so the result is the same every time. The first failing layer (in ``jobs`` order)
    raises, as in a plain loop.
    """
    threads = torch.get_num_threads()
    if threads <= 1 or len(jobs) <= 1:
        torch.set_num_threads(1)
        try:
            return [fn(*job) for job in jobs]
        finally:
            torch.set_num_threads(threads)
    torch.set_num_threads(1)
    try:
        # set_num_threads in each worker too: OpenMP's thread count is per calling thread
        with ThreadPoolExecutor(max_workers=min(threads, len(jobs)), thread_name_prefix="florg-aggregate",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(lambda job: fn(*job), jobs))
    finally:
        torch.set_num_threads(threads)


def _aggregate_model(
    uploads: Mapping[str, Sequence[torch.Tensor]],
    weights: Sequence[float] | None = None,
    *,
    previous: Mapping[str, torch.Tensor] | None = None,
    rank: int | Mapping[str, int] | None = None,
    variant: Variant = "paper",
    align: bool = True,
    path: Path = "auto",
    eig_rtol: float = DEFAULT_EIG_RTOL,
    diagnostics: bool = True,
    blocks: Sequence[int] | None = None,
    fast: bool = True,
) -> dict[str, AggregationResult]:
    if not uploads:
        raise ValueError("aggregate_model: no layers were uploaded")
    previous = previous or {}
    for what, mapping in (("previous", previous), ("rank", rank if isinstance(rank, Mapping) else {})):
        unknown = sorted(set(mapping) - set(uploads))
        if unknown:
            raise ValueError(f"aggregate_model: {what} names layers that were not uploaded: {', '.join(unknown)}")
    if variant not in ("paper", "top-r"):
        first = next(iter(uploads))
        raise ValueError(f"layer {first!r}: variant must be 'paper' or 'top-r', got {variant!r}")
    n_clients = None
    groups: dict[tuple, list[str]] = {}
    meta: dict[str, tuple[int, int, list[float]]] = {}
    names_in_order = list(uploads)
    for idx, (name, factors) in enumerate(uploads.items()):
        try:
            k = _check_structure(factors, name)
            if n_clients is None:
                n_clients = len(factors)
            elif len(factors) != n_clients:
                raise ValueError(f"layer {name!r}: {len(factors)} client factors, other layers have {n_clients}")
            r = rank.get(name) if isinstance(rank, Mapping) else rank
            r, p, chosen = _check_layer(factors, k, weights, previous.get(name), r, blocks, path, eig_rtol, name)
            meta[name] = (k, r, p)
        except ValueError:
            # The NaN/Inf scan of thin layers is deferred to their stacks; report the first
            # failing check in the documented order (layer by layer, uploads first).
            for earlier in names_in_order[: idx + 1]:
                check_factors(uploads[earlier], layer=earlier)
            raise
        key = ("thin", k, tuple(int(a.shape[0]) for a in factors), factors[0].dtype, str(factors[0].device))
        if chosen == "gram":
            key = ("gram", name)
        groups.setdefault(key, []).append(name)

    # Thin groups, pass 1: G = M M^T layer by layer, then one batched eigendecomposition per
    # group. The float64 stack M of a layer (m x k) is rebuilt in pass 2 instead of being kept:
    # only one layer's M is alive at a time (memory O(m k), not O(layers m k)), and the
    # allocator reuses that block instead of faulting in fresh pages for a (B, m, k) tensor.
    spectra: dict[tuple, tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = {}
    scales: dict[tuple, torch.Tensor] = {}  # sqrt(p_n) per stacked row; one per group (same clients)
    every_layer = [(n, uploads[n]) for n in names_in_order]
    results: dict[str, AggregationResult] = {}
    polar_ok = variant == "paper" and align and not diagnostics and (blocks is None or len(blocks) <= 1)
    one_pass: list[tuple[str, torch.Tensor]] = []  # host thin layers done in one pass: (name, row scales)
    for key, names in groups.items():
        if key[0] == "thin" and fast and key[4] == "cpu":
            sc = _row_scales(uploads[names[0]], meta[names[0]][2], uploads[names[0]][0].device)
            one_pass += [(name, sc) for name in names]
        elif key[0] == "thin":
            grams = []
            scales[key] = _row_scales(uploads[names[0]], meta[names[0]][2], uploads[names[0]][0].device)
            total = None  # one NaN/Inf test per group (one device sync), before any decomposition
            for name in names:
                stacked = _stack(uploads[name], meta[name][2], scales[key])
                total = stacked.sum() if total is None else total + stacked.sum()
                grams.append(stacked @ stacked.T)
            _check_finite(total, every_layer)
            lam_b, u_b = _small_eigh(torch.stack(grams))
            spectra[key] = (grams, lam_b, u_b)

    def one_layer(name: str, sc: torch.Tensor) -> AggregationResult:
        factors = uploads[name]
        prev = previous.get(name)
        m = int(sc.numel())
        if polar_ok and prev is not None:
            # [m; A_prev] in float64 (exact casts, unscaled): G and A_prev m^T from one stack
            both = torch.cat([*factors, prev.to(device=factors[0].device)]).to(_F64)
            g, x = _gram_and_cross(both, m)
            g.mul_(sc[:, None]).mul_(sc)  # D (m m^T) D = M M^T
            _check_finite(g.diagonal(), every_layer)  # diag G = row sums of squares: finite iff the rows are
            lam = torch.linalg.eigvalsh(g).flip(0)
            if _split_eigs(lam, eig_rtol) == lam.numel():
                return _finish_polar(name, both[:m], sc, lam, x, factors[0].dtype)
        stacked = torch.cat(list(factors)).to(_F64).mul_(sc[:, None])  # exact cast, then scale
        _check_finite(stacked, every_layer)
        g = stacked @ stacked.T
        lam_asc, u_asc = torch.linalg.eigh(g)
        gf, thin = _thin_from_eigh(stacked, lam_asc, u_asc, eig_rtol)
        thin.g = g
        return _finish(name, gf, thin, prev, meta[name][1], variant, align, diagnostics, factors[0].dtype, blocks)

    for name, res in zip([n for n, _ in one_pass], _map_layers(one_layer, one_pass)):
        results[name] = res

    for key, names in groups.items():
        if key[0] == "thin" and key not in spectra:
            continue  # done above, in one pass
        if key[0] == "gram":
            name = names[0]
            k, r, _ = meta[name]
            results[name] = aggregate(
                uploads[name], weights, previous=previous.get(name), rank=r, variant=variant,
                align=align, path="gram", eig_rtol=eig_rtol, diagnostics=diagnostics, layer=name, blocks=blocks,
            )
            continue
        grams, lam_b, u_b = spectra[key]
        for i, name in enumerate(names):
            k, r, p = meta[name]
            gf, thin = _thin_from_eigh(_stack(uploads[name], p, scales[key]), lam_b[i], u_b[i], eig_rtol)
            thin.g = grams[i]
            results[name] = _finish(
                name, gf, thin, previous.get(name), r, variant, align, diagnostics,
                uploads[name][0].dtype, blocks,
            )
    return {name: results[name] for name in uploads}

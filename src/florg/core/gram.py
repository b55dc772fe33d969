"""The eigen-factor of ``Q = sum_n p_n A_n^T A_n``: its non-zero eigenpairs by the thin path or the Gram path.

* **thin** (``sum r_n < k``): ``M = [sqrt(p_n) A_n]`` (``M^T M = Q``), the small ``G = M M^T = U diag(lam) U^T``
  in float64, ``A~ = U^T M``; no ``k x k`` matrix is formed.
* **gram** (``sum r_n >= k``): ``Q`` accumulated reply by reply in float64 (:class:`GramAccumulator`), then its
  symmetric eigendecomposition.

Eigenpairs with ``lam <= eig_rtol * lam_max`` are round-off and dropped. Alignment, diagnostics and the
public rule are in :mod:`florg.core.aggregate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .validation import Path, _check_eig_rtol, _check_finite, _choose_path, check_factors, normalise_weights

__all__ = ["DEFAULT_EIG_RTOL", "GramAccumulator", "GramFactor", "gram_eigen"]

DEFAULT_EIG_RTOL = 1e-12
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

"""Input checks shared by the core math. Every failure is a ``ValueError`` naming the layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

#: how a layer's eigen-factor is computed: 'thin' (stack the uploads), 'gram' (k x k) or 'auto'
Path = Literal["auto", "thin", "gram"]

__all__ = ["check_factors", "normalise_weights"]


def check_factors(
    factors: Sequence[torch.Tensor],
    *,
    layer: str,
    k: int | None = None,
    max_rank: int | None = None,
) -> int:
    """Validate client factors ``A_n`` (each ``r_n x k``) and return the common width ``k``.

    Checks: at least one factor; every factor a 2-D floating tensor; the same width (and the
    expected ``k`` when given); ``1 <= r_n <= k`` (and ``<= max_rank`` when given); a single
    dtype across clients; only finite values.
    """
    if factors is None or len(factors) == 0:
        raise ValueError(f"layer {layer!r}: empty client list; at least one client factor is needed")
    dtype = None
    width = k
    for i, a in enumerate(factors):
        if not isinstance(a, torch.Tensor):
            raise ValueError(f"layer {layer!r}: client {i} factor is {type(a).__name__}, expected a torch.Tensor")
        if a.ndim != 2:
            raise ValueError(
                f"layer {layer!r}: client {i} factor has shape {tuple(a.shape)}; expected a 2-D (r, k) matrix"
            )
        if not a.is_floating_point():
            raise ValueError(f"layer {layer!r}: client {i} factor has dtype {a.dtype}; expected a floating dtype")
        if dtype is None:
            dtype = a.dtype
        elif a.dtype != dtype:
            raise ValueError(
                f"layer {layer!r}: mixed dtypes ({dtype} and {a.dtype} from client {i}); "
                "cast all factors to one dtype before aggregating"
            )
        r_n, w = a.shape
        if width is None:
            width = w
        elif w != width:
            raise ValueError(
                f"layer {layer!r}: client {i} factor has width {w}, expected k={width} "
                "(factors must be (r, k) with k = min(d_out, d_in))"
            )
        if r_n < 1 or r_n > width:
            raise ValueError(f"layer {layer!r}: client {i} rank {r_n} is outside 1..k={width}")
        if max_rank is not None and r_n > max_rank:
            raise ValueError(f"layer {layer!r}: client {i} rank {r_n} exceeds the allowed maximum {max_rank}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError(f"layer {layer!r}: client {i} factor contains NaN or Inf")
    assert width is not None
    return int(width)


def normalise_weights(weights: Sequence[float] | None, n: int, *, layer: str) -> list[float]:
    """Return weights ``w_n / sum(w)``; ``None`` means uniform ``1/n``. Weights must be positive and finite."""
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"layer {layer!r}: got {len(w)} weights for {n} client factors")
    for i, x in enumerate(w):
        if not math.isfinite(x) or x <= 0:
            raise ValueError(
                f"layer {layer!r}: weight {x!r} of client {i} must be positive and finite "
                "(use example counts or uniform weights)"
            )
    total = math.fsum(w)
    return [x / total for x in w]


def _check_eig_rtol(eig_rtol: float, layer: str) -> None:
    # A negative tolerance would keep round-off eigenvalues below zero (NaN square roots); NaN
    # would silently drop every eigenpair.
    if not 0.0 <= float(eig_rtol) < 1.0:
        raise ValueError(f"layer {layer!r}: eig_rtol must be in [0, 1), got {eig_rtol!r}")


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

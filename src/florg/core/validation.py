"""Input checks shared by the core math. Every failure is a ``ValueError`` naming the layer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

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

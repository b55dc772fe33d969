"""Fixed semi-orthogonal bases ``L`` and ``R`` shared by every client.

For an adapted weight ``W0`` of shape ``(d_out, d_in)`` FLoRG uses ``k = min(d_out, d_in)``,
``L`` of shape ``(d_out, k)`` with orthonormal columns and ``R`` of shape ``(k, d_in)`` with
orthonormal rows. Only a seed crosses the wire: every party regenerates the same matrices
from ``(global_seed, layer_name)``.

Generation is done in float64 on the CPU (Gaussian matrix -> QR with the sign convention
``diag(R_qr) > 0``, i.e. a Haar-distributed orthonormal frame) and only then cast to the
requested dtype and moved to the requested device. The result is therefore bit-identical
across devices and across calls for the same seed, layer name and dtype.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["init_factor", "layer_seed", "make_bases", "orthonormal_frame"]


def layer_seed(global_seed: int, layer_name: str) -> int:
    """Derive a 63-bit seed for one layer from the run's global seed and the layer's name.

    The derivation is a SHA-256 hash, so it does not depend on Python's hash randomisation
    and is identical on every machine. The name should be the layer's module path with any
    PEFT wrapper prefix removed (e.g. ``"encoder.layer.0.attention.self.query"``).
    """
    if not isinstance(layer_name, str) or not layer_name:
        raise ValueError("layer_name must be a non-empty string (the module path of the layer)")
    digest = hashlib.sha256(f"florg/{int(global_seed)}/{layer_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def orthonormal_frame(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """An ``(n, k)`` float64 CPU matrix with orthonormal columns (``k <= n``), Haar-distributed."""
    if k > n:
        raise ValueError(f"cannot build {k} orthonormal columns in dimension {n}")
    g = torch.randn(n, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g, mode="reduced")
    # Fix the sign ambiguity of QR so the frame is a deterministic function of the draw.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def make_bases(
    d_out: int,
    d_in: int,
    *,
    seed: int,
    layer_name: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(L, R)`` for a ``d_out x d_in`` weight.

    ``L`` is ``(d_out, k)`` with ``L.T @ L = I_k``; ``R`` is ``(k, d_in)`` with
    ``R @ R.T = I_k``; ``k = min(d_out, d_in)``. ``seed`` is the run's global seed; the
    per-layer seed is derived with :func:`layer_seed`.
    """
    if d_out <= 0 or d_in <= 0:
        raise ValueError(f"layer {layer_name!r}: shape must be positive, got ({d_out}, {d_in})")
    k = min(d_out, d_in)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(layer_seed(seed, layer_name))
    left = orthonormal_frame(d_out, k, gen)
    right = orthonormal_frame(d_in, k, gen).T.contiguous()
    return left.to(dtype=dtype, device=device), right.to(dtype=dtype, device=device)


def init_factor(
    rank: int,
    k: int,
    *,
    seed: int,
    layer_name: str,
    scale: float = 0.01,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The initial global factor ``A0 = scale * N(0, 1)`` of shape ``(rank, k)``.

    Drawn in float64 on the CPU from a seed derived from ``(seed, layer_name)`` (independent
    of the bases' draw), so the server and every client obtain the identical ``A0``.
    ``A0`` must be non-zero: ``A = 0`` is a stationary point of FLoRG (``grad_A = s A (H + H^T)``).
    """
    if rank < 1 or rank > k:
        raise ValueError(f"layer {layer_name!r}: rank {rank} is outside 1..k={k} (k = min(d_out, d_in))")
    if not scale > 0:
        raise ValueError(f"layer {layer_name!r}: init scale must be positive, got {scale}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(layer_seed(seed, layer_name + "#A0"))
    a0 = torch.randn(rank, k, generator=gen, dtype=torch.float64) * scale
    return a0.to(dtype=dtype, device=device)

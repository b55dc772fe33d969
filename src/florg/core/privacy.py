"""Differential privacy for FLoRG uploads: clipping, Gaussian noise, the noisy Gram matrix (pure torch).

The design and the guarantees are explained in ``docs/privacy.md``; in short:

* **Clipping** is joint over a client's whole adapter upload: all its factors ``A_l`` (one per
  adapted layer) are scaled by ``min(1, C / ||(A_1, ..., A_L)||_F)``, so that
  ``sum_l ||A_l||_F^2 <= C^2``. The head, when it trains, is clipped separately, as an
  *update* ``h_n - h_global`` of norm at most ``C_head`` (the global head is public).
* **Local DP** (at the client, before sending): every entry of every clipped factor gets
  ``N(0, (sigma C)^2)``, every entry of the clipped head update ``N(0, (sigma C_head)^2)``.
* **Central DP** (at the server): ``Q_l = (1/m) sum_n A_nl^T A_nl + Z_l`` with the clipped
  factors, a fixed public denominator ``m`` (the number of clients sampled) and symmetric
  Gaussian noise ``Z_l`` of scale ``sigma C^2 / m``. Since ``||A^T A||_F <= ||A||_F^2``, the
  Gram matrices of all layers of one client have joint Frobenius norm at most ``C^2``: that is
  the sensitivity of ``(Q_1, ..., Q_L)`` to adding or removing a client, times ``1/m``.
* **Debiasing** (local DP): with ``A + E`` uploaded, ``E[E^T E] = r (sigma C)^2 I_k``, so the
  server's ``sum_n p_n (A_n + E_n)^T (A_n + E_n)`` is biased by ``sum_n p_n r_n (sigma C)^2 I``;
  :func:`noisy_gram` can subtract it (``shift``).

The symmetric noise ``Z = std * (G + G^T) / 2`` (``G`` with i.i.d. ``N(0, 1)`` entries) has
``N(0, std^2)`` on the diagonal and ``N(0, std^2 / 2)`` off it, i.e. i.i.d. ``N(0, std^2)`` in
the coordinates ``(Z_ii, sqrt(2) Z_ij)_{i<j}`` in which the Frobenius norm of a symmetric
matrix is the Euclidean norm: exactly the Gaussian mechanism for Frobenius sensitivity
``std / sigma``.

Everything here is plain torch; the (epsilon, delta) accounting is in :mod:`florg.fl.privacy`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import secrets
from collections.abc import Mapping, Sequence

import torch

from florg.options import ConfigError

from .aggregate import DEFAULT_EIG_RTOL, AggregationResult, Variant, aggregate_gram
from .validation import check_factors

__all__ = [
    "accounting_noise_multiplier",
    "add_gaussian",
    "check_accounting_available",
    "central_gram_std",
    "clip_joint",
    "dp_aggregate_layers",
    "joint_norm",
    "noise_bias",
    "noise_generator",
    "noisy_gram",
    "noisy_mean",
    "symmetric_gaussian",
]

_F64 = torch.float64
Tensors = Mapping[str, torch.Tensor]


def check_accounting_available() -> None:
    """Raise :class:`florg.config.ConfigError` when the accountant's backend (``dp-accounting``) is missing."""
    if importlib.util.find_spec("dp_accounting") is None:

        raise ConfigError(
            "config key 'privacy.mode': privacy accounting needs the package dp-accounting "
            "(pip install 'flwr[dp]', i.e. dp-accounting 0.6), or set privacy.mode=off"
        )


def noise_generator(reproducible: bool, *parts: object) -> torch.Generator:
    """A CPU generator for privacy noise.

    ``reproducible=True``: seeded from ``parts`` (e.g. run seed, round, partition), for
    repeatable experiments; anyone who knows the parts can regenerate (and remove) the noise,
    so this gives no protection in a real deployment. ``reproducible=False``: seeded from the
    operating system's entropy source.
    """
    if reproducible:
        digest = hashlib.sha256(repr(("florg-dp",) + parts).encode()).digest()
        seed = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    else:
        seed = secrets.randbits(63)
    return torch.Generator().manual_seed(seed)


def joint_norm(tensors: Tensors | Sequence[torch.Tensor]) -> float:
    """Frobenius norm of the concatenation of ``tensors`` (computed in float64)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    total = math.fsum(float(torch.sum(t.detach().to(_F64) ** 2)) for t in values)
    return math.sqrt(total)


def clip_joint(tensors: Tensors, clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """Scale all ``tensors`` by ``min(1, clip_norm / joint_norm)``; returns ``(clipped, norm_before)``.

    The clipped copies keep their dtypes; their joint norm is at most ``clip_norm`` (up to the
    rounding of that dtype).
    """
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm!r}")
    norm = joint_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("cannot clip tensors that contain NaN or Inf")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v.detach().to(_F64) * scale).to(v.dtype) for k, v in tensors.items()}, norm


def add_gaussian(tensors: Tensors, std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``t + N(0, std^2)`` entrywise for every tensor (noise drawn in float64 on the CPU, in key order)."""
    if not std >= 0 or not math.isfinite(std):
        raise ValueError(f"noise std must be >= 0 and finite, got {std!r}")
    out = {}
    for key, value in tensors.items():
        noise = torch.randn(tuple(value.shape), generator=generator, dtype=_F64) * std
        out[key] = (value.detach().to(device="cpu", dtype=_F64) + noise).to(device=value.device, dtype=value.dtype)
    return out


def symmetric_gaussian(k: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """``std * (G + G^T) / 2``: diagonal ``N(0, std^2)``, off-diagonal ``N(0, std^2 / 2)`` (float64, k x k)."""
    g = torch.randn(k, k, generator=generator, dtype=_F64)
    return (g + g.T) * (0.5 * std)


def central_gram_std(clip_norm: float, noise_multiplier: float, denominator: int) -> float:
    """Noise scale of each layer's central-DP Gram matrix: ``sigma C^2 / m`` (sensitivity ``C^2 / m``)."""
    return noise_multiplier * clip_norm**2 / denominator


def noise_bias(ranks: Sequence[int], p: Sequence[float], std: float) -> float:
    """``b = sum_n p_n r_n std^2``: the expected ``sum_n p_n E_n^T E_n = b I`` of factor noise ``E_n`` (r_n x k)."""
    return math.fsum(w * r * std**2 for w, r in zip(p, ranks))


def noisy_gram(
    factors: Sequence[torch.Tensor],
    p: Sequence[float],
    *,
    noise_std: float = 0.0,
    shift: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``Q = sum_n p_n A_n^T A_n - shift * I + Z`` (float64, k x k) with ``Z`` from :func:`symmetric_gaussian`.

    ``p`` is used as given (it need not sum to one: central DP divides by a fixed ``m``).
    """
    if len(factors) == 0 or len(factors) != len(p):
        raise ValueError(f"need one weight per factor, got {len(factors)} factors and {len(p)} weights")
    k = int(factors[0].shape[1])
    q = torch.zeros(k, k, dtype=_F64)
    for a, w in zip(factors, p):
        a64 = a.detach().to(device="cpu", dtype=_F64)
        q.addmm_(a64.T, a64, alpha=float(w))
    if shift:
        q.diagonal().sub_(shift)
    if noise_std > 0:
        if generator is None:
            raise ValueError("noise_std > 0 needs a generator")
        q += symmetric_gaussian(k, noise_std, generator)
    return q


def dp_aggregate_layers(
    uploads: Mapping[str, Sequence[torch.Tensor]],
    p: Sequence[float],
    *,
    previous: Mapping[str, torch.Tensor],
    rank: int,
    variant: Variant = "paper",
    align: bool = True,
    eig_rtol: float = DEFAULT_EIG_RTOL,
    noise_std: float = 0.0,
    shift: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, AggregationResult]:
    """The FLoRG server rule on the Gram path with privacy noise and/or a bias correction, layer by layer.

    Per layer: ``Q`` from :func:`noisy_gram` (a k x k float64 matrix; noise drawn in the order
    of ``uploads``), then :func:`florg.core.aggregate_gram` (eigendecomposition, rank-r factor,
    Procrustes alignment to ``previous``).
    """
    out = {}
    for name, factors in uploads.items():
        check_factors(factors, layer=name)
        q = noisy_gram(factors, p, noise_std=noise_std, shift=shift, generator=generator)
        out[name] = aggregate_gram(
            q, previous=previous.get(name), rank=rank, variant=variant, align=align, eig_rtol=eig_rtol,
            layer=name, out_dtype=factors[0].dtype,
        )
    return out


def noisy_mean(
    updates: Sequence[Tensors], denominator: int, std: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``(1/m) sum_n u_n + N(0, std^2)`` per entry, in float64 (the central-DP mean of clipped head updates)."""
    if not updates:
        raise ValueError("noisy_mean: no updates")
    keys = list(updates[0])
    total = {k: sum(u[k].detach().to(_F64) for u in updates) / denominator for k in keys}
    return add_gaussian(total, std, generator)


def accounting_noise_multiplier(mode: str, noise_multiplier: float, *, head: bool, replace_one: bool = False) -> float:
    """The noise multiplier of the one Gaussian mechanism a round amounts to, for the accountant.

    The ratio noise std / l2-sensitivity of each part of a round's release, under the
    neighbouring relation the accountant uses:

    * ``local``: the client's whole data may change, so a clipped vector may move across the
      ball: sensitivity ``2C`` (factors) and ``2 C_head`` (head update); ratio ``sigma / 2`` each.
    * ``central``, add/remove one client: ``C^2 / m`` (Gram matrices) and ``C_head / m`` (mean
      head update); ratio ``sigma``. Replace one client (sampling without replacement): the
      difference of two PSD Gram matrices of norm <= ``C^2`` has norm <= ``sqrt(2) C^2``, the
      head's ``2 C_head``; ratios ``sigma / sqrt(2)`` and ``sigma / 2``.

    Parts released together with ratios ``z_i`` are one Gaussian mechanism with ratio
    ``(sum_i z_i^-2)^(-1/2)`` (scale each part by ``1 / (z_i Delta_i)``).
    """
    if mode == "local":
        parts = [noise_multiplier / 2.0] + ([noise_multiplier / 2.0] if head else [])
    elif mode == "central":
        if replace_one:
            parts = [noise_multiplier / math.sqrt(2.0)] + ([noise_multiplier / 2.0] if head else [])
        else:
            parts = [noise_multiplier] + ([noise_multiplier] if head else [])
    else:
        raise ValueError(f"privacy mode must be 'local' or 'central', got {mode!r}")
    return 1.0 / math.sqrt(sum(z**-2 for z in parts))

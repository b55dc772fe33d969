"""One place where the run seed is turned into the seeds of its parts.

Every random choice of a run (client data order, local dropout, client sampling, dropout
injection, the personalised evaluation subset) draws from a seed derived here, so the same
config and seed give the same run. Per-layer seeds for the bases and the initial factor come
from :func:`florg.core.bases.layer_seed` (a SHA-256 of the layer name).
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]

#: multiplier applied before adding the i-th part (cycled when there are more parts)
_MULTIPLIERS = (1_000_003, 10_007, 7_919)
_MASK = (1 << 63) - 1


def _part_value(part: int | str) -> int:
    if isinstance(part, bool):
        raise TypeError("derive_seed parts must be ints or strings, not bool")
    if isinstance(part, int):
        return part
    if isinstance(part, str):  # a purpose tag: a stable 32-bit number
        return int.from_bytes(hashlib.sha256(part.encode()).digest()[:4], "little")
    raise TypeError(f"derive_seed parts must be ints or strings, got {type(part).__name__}")


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for one use of the run ``seed``: ``h = seed``, then ``h = h * M_i + part_i``.

    ``M = (1_000_003, 10_007, 7_919)`` (cycled). Integer parts name the round, the partition,
    ...; a string part names the purpose (hashed to a stable 32-bit number), so that two uses
    with the same numbers draw different streams, e.g. ``derive_seed(seed, rnd, pid)`` for a
    client's data order and ``derive_seed(seed, "dropout", rnd)`` for injected dropouts.
    Deterministic across processes and machines (no Python ``hash``).
    """
    h = int(seed)
    for i, part in enumerate(parts):
        h = h * _MULTIPLIERS[i % len(_MULTIPLIERS)] + _part_value(part)
    return h & _MASK

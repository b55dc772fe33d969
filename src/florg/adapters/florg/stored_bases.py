"""A safetensors file of FLoRG bases, so that a process that builds the same adapter again loads them.

FLoRG's bases are a pure function of ``(seed, layer name, shape, dtype)``
(:func:`florg.core.make_bases`: float64 Gaussian draw, QR, one rounding to ``dtype``), but the QR
costs O(k^3) per layer: seconds for a 3B model on a few CPU cores. A deployment's ClientApp
rebuilds its model in a fresh process every round, so florg keeps the bases of an experiment in
one file and reads them back (memory-mapped, bit-identical to a fresh draw)::

    with basis_store("bases.safetensors"):
        model = get_peft_model(base, FLoRGConfig(...))   # looks up / records every layer's L, R

Inside the block every FLoRG layer takes its ``(L, R)`` from the file when it has them and draws
them otherwise; on leaving the block, newly drawn bases are added to the file (written to a
temporary file and renamed, so concurrent processes never read a half-written file).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ...core.bases import make_bases

__all__ = ["BasisStore", "basis_store", "get_bases"]

log = logging.getLogger(__name__)

_ACTIVE: contextvars.ContextVar[BasisStore | None] = contextvars.ContextVar("florg_basis_store", default=None)


def _key(seed: int, layer_name: str, d_out: int, d_in: int, dtype: torch.dtype) -> str:
    return f"{int(seed)}/{layer_name}/{int(d_out)}x{int(d_in)}/{str(dtype).removeprefix('torch.')}"


class BasisStore:
    """The bases in one safetensors file (read lazily), plus the ones drawn since it was opened."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.new: dict[str, torch.Tensor] = {}
        self.hits = 0
        self._names: set[str] = set()
        if self.path.is_file():
            with safe_open(str(self.path), framework="pt") as f:
                self._names = set(f.keys())

    def get(self, d_out: int, d_in: int, *, seed: int, layer_name: str, dtype: torch.dtype,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`florg.core.make_bases` of these arguments, from the file if it has them."""
        key = _key(seed, layer_name, d_out, d_in, dtype)
        names = [self._stored_name(key + "/L"), self._stored_name(key + "/R")]
        if all(names):
            with safe_open(str(self.path), framework="pt") as f:
                left, right = (_restore(f.get_tensor(n), n) for n in names)
            self.hits += 1
            return left.to(device=device), right.to(device=device)
        left, right = make_bases(d_out, d_in, seed=seed, layer_name=layer_name, dtype=dtype, device="cpu")
        self.new[key + "/L"], self.new[key + "/R"] = left, right
        return left.to(device=device), right.to(device=device)

    def save(self) -> None:
        """Add the bases drawn since opening to the file (atomic replace); a no-op when none were."""
        if not self.new:
            return
        tensors = load_file(str(self.path)) if self.path.is_file() else {}
        for name, value in self.new.items():
            tensors.update([_stored(name, value)])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": "pt", "content": "florg bases"})
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._names = set(tensors)
        self.new = {}

    def _stored_name(self, name: str) -> str | None:
        """The name ``name`` is stored under (``name`` or ``name`` + :data:`_TRANSPOSED`), None if absent."""
        for candidate in (name, name + _TRANSPOSED):
            if candidate in self._names:
                return candidate
        return None


#: suffix of a tensor stored transposed (it was column-major, as LAPACK's QR returns L)
_TRANSPOSED = "#T"


def _stored(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """How a tensor is written: as is when row-major, transposed (and marked) when column-major.

    safetensors keeps only row-major data; restoring a column-major ``L`` in its original layout
    matters because matrix kernels may round differently for another layout, and a loaded base
    must give results bit-identical to a drawn one.
    """
    if not value.is_contiguous() and value.ndim == 2 and value.T.is_contiguous():
        return name + _TRANSPOSED, value.T
    return name, value.contiguous()


def _restore(value: torch.Tensor, name: str) -> torch.Tensor:
    """The tensor in its original layout, in freshly allocated (aligned) memory.

    A tensor read straight from the file may sit at any byte offset; kernels can round
    differently on unaligned data, so it is copied.
    """
    if name.endswith(_TRANSPOSED):
        return value.clone().T  # column-major again: the transpose of a row-major copy
    return value.clone()


@contextlib.contextmanager
def basis_store(path: str | os.PathLike[str] | None, *, strict: bool = True) -> Iterator[BasisStore | None]:
    """Make FLoRG layers built inside the block use the bases file ``path`` (None: no store).

    ``strict=False``: a file that cannot be read is ignored (every basis is drawn) and one that
    cannot be written is left as it is, each with a warning; the bases are the same either way.
    """
    if path is None:
        yield None
        return
    try:
        store = BasisStore(path)
    except Exception as exc:  # strict=False: an unreadable file only costs the draws
        if strict:
            raise
        log.warning("florg bases: ignoring the unreadable file %s (%s: %s)", path, type(exc).__name__, exc)
        yield None  # no store: every basis is drawn, and the file is left as it is
        return
    token = _ACTIVE.set(store)
    try:
        yield store
    finally:
        _ACTIVE.reset(token)
    try:
        store.save()
    except Exception as exc:  # strict=False: the bases in use are right; only storing failed
        if strict:
            raise
        log.warning("florg bases: could not store new bases in %s (%s: %s)", path, type(exc).__name__, exc)


def get_bases(d_out: int, d_in: int, *, seed: int, layer_name: str, dtype: torch.dtype,
              device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's ``(L, R)``: from the active :func:`basis_store`, else :func:`florg.core.make_bases`."""
    store = _ACTIVE.get()
    if store is None:
        return make_bases(d_out, d_in, seed=seed, layer_name=layer_name, dtype=dtype, device=device)
    return store.get(d_out, d_in, seed=seed, layer_name=layer_name, dtype=dtype, device=device)

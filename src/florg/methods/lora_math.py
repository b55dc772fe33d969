"""The low-rank linear algebra of the LoRA-based methods' server rules and diagnostics (float64).

:class:`Factored` keeps a ``d_out x d_in`` matrix as a sum of products and takes Frobenius norms
without forming it; :func:`product_svd` is the truncated SVD of a product ``X @ Y`` from thin QRs;
:func:`layer_errors` are the per-layer aggregation diagnostics every method reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["Factored", "layer_errors", "product_svd", "weighted_products"]

_F64 = torch.float64


class Factored:
    """A ``d_out x d_in`` matrix kept as ``sum_i X_i @ Y_i`` (+ an optional dense part), in float64.

    Used for the aggregation diagnostics: differences of low-rank sums are formed and their
    Frobenius norms taken without materialising ``d_out x d_in`` unless a dense part is present
    (or the stacked rank is not smaller than ``min(d_out, d_in)``).
    """

    def __init__(self, shape: tuple[int, int], terms: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
                 dense: torch.Tensor | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.terms = [(x.to(_F64), y.to(_F64)) for x, y in terms]
        self.dense_part = None if dense is None else dense.to(_F64)

    @classmethod
    def product(cls, x: torch.Tensor, y: torch.Tensor, coef: float = 1.0) -> Factored:
        return cls((x.shape[0], y.shape[1]), [(x.to(_F64) * float(coef), y)])

    @classmethod
    def of_dense(cls, d: torch.Tensor) -> Factored:
        return cls(tuple(d.shape), dense=d)

    def __add__(self, other: Factored) -> Factored:
        dense = self.dense_part
        if other.dense_part is not None:
            dense = other.dense_part if dense is None else dense + other.dense_part
        return Factored(self.shape, self.terms + other.terms, dense)

    def scaled(self, c: float) -> Factored:
        return Factored(self.shape, [(x * float(c), y) for x, y in self.terms],
                        None if self.dense_part is None else self.dense_part * float(c))

    def __sub__(self, other: Factored) -> Factored:
        return self + other.scaled(-1.0)

    def dense(self) -> torch.Tensor:
        if self.dense_part is not None:
            out = self.dense_part.clone()
        else:
            out = torch.zeros(self.shape, dtype=_F64, device=self.terms[0][0].device if self.terms else None)
        for x, y in self.terms:
            out += x @ y
        return out

    def fro(self) -> float:
        """``||.||_F``; thin QR of the stacked factors when that avoids a ``d_out x d_in`` matrix."""
        m = sum(int(x.shape[1]) for x, _ in self.terms)
        if m == 0 and self.dense_part is None:
            return 0.0
        if self.dense_part is not None or m >= min(self.shape):
            return float(torch.linalg.matrix_norm(self.dense()))
        x = torch.cat([x for x, _ in self.terms], dim=1)
        y = torch.cat([y for _, y in self.terms], dim=0)
        _, rx = torch.linalg.qr(x, mode="reduced")
        _, ry = torch.linalg.qr(y.T, mode="reduced")
        return float(torch.linalg.matrix_norm(rx @ ry.T))


def product_svd(x: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``(U_r, S_r, V_r)`` of ``P = x @ y`` (``x``: ``d_out x m``, ``y``: ``m x d_in``).

    When ``m < min(d_out, d_in)`` it never forms ``P``: with thin QRs ``x = Q_x R_x`` and
    ``y^T = Q_y R_y``, ``P = Q_x (R_x R_y^T) Q_y^T``, so the SVD of the ``m x m`` core gives
    ``U = Q_x U'`` and ``V = Q_y V'``. Otherwise ``P`` is formed and decomposed densely (small
    layers, or many clients). Float64 throughout. When ``rank(P) < rank`` the missing singular
    triplets are zero (zero columns).
    """
    x = x.to(_F64)
    y = y.to(_F64)
    d_out, m = x.shape
    d_in = y.shape[1]
    if m < min(d_out, d_in):
        qx, rx = torch.linalg.qr(x, mode="reduced")
        qy, ry = torch.linalg.qr(y.T, mode="reduced")
        uc, s, vch = torch.linalg.svd(rx @ ry.T, full_matrices=False)
        u, v = qx @ uc, qy @ vch.T
    else:
        u, s, vh = torch.linalg.svd(x @ y, full_matrices=False)
        v = vh.T
    k = min(rank, int(s.numel()))
    u_r = torch.zeros(d_out, rank, dtype=_F64, device=x.device)
    v_r = torch.zeros(d_in, rank, dtype=_F64, device=x.device)
    s_r = torch.zeros(rank, dtype=_F64, device=x.device)
    u_r[:, :k], v_r[:, :k], s_r[:k] = u[:, :k], v[:, :k], s[:k]
    return u_r, s_r, v_r


def layer_errors(target: Factored, sent: Factored, previous: Factored | None = None,
                 exact: Factored | None = None) -> dict[str, float]:
    """Per-layer aggregation diagnostics (all relative Frobenius norms).

    ``target`` is ``sum_n p_n dW_n`` (the clients' updates of the base weight, relative to the
    pretrained weight); ``sent`` the new global model's update; ``exact`` the method's aggregate
    before any lossy step (defaults to ``sent``); ``previous`` the previous global update.

    * ``agg_rel_error``  = ``||exact - target|| / ||target||``
    * ``sent_rel_error`` = ``||sent - target|| / ||target||``
    * ``round_rel_error`` = ``||sent - target|| / ||target - previous||`` (error relative to the
      round's mean update; only with ``previous``)
    """
    t_norm = target.fro()
    denom = t_norm if t_norm > 0 else 1.0
    sent_err = (sent - target).fro()
    out = {
        "agg_rel_error": ((exact - target).fro() if exact is not None else sent_err) / denom,
        "sent_rel_error": sent_err / denom,
    }
    if previous is not None:
        r_norm = (target - previous).fro()
        out["round_rel_error"] = sent_err / (r_norm if r_norm > 0 else 1.0)
    return out


def weighted_products(bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coefs: Sequence[float]) -> Factored:
    """``sum_n coef_n B_n A_n`` as a :class:`Factored` (nothing ``d_out x d_in`` is formed)."""
    shape = (int(bs[0].shape[0]), int(as_[0].shape[1]))
    return Factored(shape, [(b.to(_F64) * float(c), a) for b, a, c in zip(bs, as_, coefs)])

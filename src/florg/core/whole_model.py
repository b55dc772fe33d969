"""Every adapted layer of a model in one call: :func:`aggregate_model` (the server's round).

Thin-path layers on the host are done in one pass each, spread over the host's threads; the paper
variant without diagnostics needs no eigenvectors. :func:`_aggregate_model_reference` is the previous
two-pass route, kept for comparison (tests, ``benchmarks/bench_server.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any

import torch

from .aggregate import AggregationResult, Variant, _finish, _rotation, aggregate
from .gram import _F64, DEFAULT_EIG_RTOL, _row_scales, _small_eigh, _split_eigs, _stack, _thin_from_eigh
from .validation import Path, _check_finite, _check_layer, _check_structure, check_factors

__all__ = ["aggregate_model"]

#: set by :func:`_aggregate_model_reference`: take the previous two-pass route
_REFERENCE_ROUTE: ContextVar[bool] = ContextVar("florg_reference_route", default=False)


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
    fast = not _REFERENCE_ROUTE.get()
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


def _aggregate_model_reference(
    uploads: Mapping[str, Sequence[torch.Tensor]], weights: Sequence[float] | None = None, **kwargs: Any
) -> dict[str, AggregationResult]:
    """The previous route of :func:`aggregate_model`, kept for comparison (tests, ``bench_server.py``).

    Two passes over each shape group of thin layers: ``G = M M^T`` layer by layer, one batched
    full eigendecomposition per group, then ``M`` is rebuilt to align and diagnose each layer.
    """
    token = _REFERENCE_ROUTE.set(True)
    try:
        return aggregate_model(uploads, weights, **kwargs)
    finally:
        _REFERENCE_ROUTE.reset(token)


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

"""Procrustes alignment: optimality against random orthogonal / semi-orthogonal matrices,
exact recovery of a rotated reference, and the Gram matrix each variant sends down.

Notation: ``A~`` is the canonical ``r' x k`` factor of ``Q`` (``gram_eigen(...).dense()``),
``r`` the target rank, ``A_prev`` last round's ``r x k`` global factor.
"""

from __future__ import annotations

import pytest
import torch

from florg.core import GramFactor, aggregate, gram_eigen, procrustes_align
from helpers import (
    F64,
    dense_q,
    fro,
    gram_of,
    orthonormal_rows,
    randn,
    random_orthogonal,
    random_orthogonals,
    random_semi_orthogonals,
    rel,
    top_r_truncation,
)

N_RANDOM = 300  # random (semi-)orthogonal competitors per optimality check


def assert_procrustes_certificate(a_new: torch.Tensor, prev: torch.Tensor) -> None:
    """Optimality certificate of orthogonal Procrustes: ``A_new A_prev^T`` is symmetric PSD."""
    c = a_new @ prev.T
    assert fro(c - c.T) <= 1e-10 * fro(c)
    assert float(torch.linalg.eigvalsh((c + c.T) / 2).min()) >= -1e-10 * fro(c)


# --------------------------------------------------------------------------- inputs with r' = r = 4


def clients_single():
    return [randn(4, 48, seed=1)]


def clients_rank_exactly_r():
    base = randn(4, 48, seed=2)
    return [base, randn(4, 4, seed=3) @ base, randn(3, 4, seed=4) @ base]


def clients_repeated_eigenvalue():
    frame = orthonormal_rows(4, 48, seed=5)
    return [2.0 * frame, 2.0 * random_orthogonal(4, seed=6) @ frame]  # Q = 4 P, one 4-fold eigenvalue


R_EQUALS_R = {
    "single": clients_single,
    "rank_exactly_r": clients_rank_exactly_r,
    "repeated_eigenvalue": clients_repeated_eigenvalue,
}


@pytest.mark.parametrize("path", ["thin", "gram"])
@pytest.mark.parametrize("variant", ["paper", "top-r"])
@pytest.mark.parametrize("clients", list(R_EQUALS_R))
def test_r_prime_equals_r_minimises_over_all_orthogonal(clients, variant, path):
    factors = R_EQUALS_R[clients]()
    gf = gram_eigen(factors, path=path)
    assert gf.rank == 4
    a_tilde = gf.dense()
    prev = randn(4, 48, seed=7)
    a_new = procrustes_align(prev, gf, 4, variant=variant)
    assert a_new.shape == (4, 48) and a_new.dtype == F64

    # It is a valid factor of Q ...
    assert rel(gram_of(a_new), dense_q(factors)) <= 1e-10
    # ... and no orthogonal O gives a factor O A~ closer to A_prev.
    best = fro(a_new - prev)
    others = torch.linalg.matrix_norm(random_orthogonals(4, N_RANDOM, seed=8) @ a_tilde - prev)
    assert float(others.min()) >= best - 1e-12
    assert bool((torch.linalg.det(random_orthogonals(4, N_RANDOM, seed=8)) < 0).any())  # reflections included
    assert_procrustes_certificate(a_new, prev)
    # Small rotations of the optimum do not improve it either (local optimality).
    for i in range(20):
        skew = randn(4, 4, seed=100 + i)
        rot = torch.linalg.matrix_exp(1e-3 * (skew - skew.T))
        assert fro(rot @ a_new - prev) >= best - 1e-12


@pytest.mark.parametrize("clients", list(R_EQUALS_R))
def test_r_prime_equals_r_variants_agree(clients):
    factors = R_EQUALS_R[clients]()
    prev = randn(4, 48, seed=9)
    paper = aggregate(factors, previous=prev, variant="paper").factor
    top_r = aggregate(factors, previous=prev, variant="top-r").factor
    assert rel(paper, top_r) <= 1e-10


@pytest.mark.parametrize("path", ["thin", "gram"])
@pytest.mark.parametrize("variant", ["paper", "top-r"])
@pytest.mark.parametrize("clients", list(R_EQUALS_R))
def test_rotated_reference_is_recovered(clients, variant, path):
    """If A_prev = O A~ for an orthogonal O, alignment returns exactly A_prev."""
    factors = R_EQUALS_R[clients]()
    a_tilde = gram_eigen(factors, path=path).dense()
    for seed in (10, 11, 12):
        o = random_orthogonal(4, seed=seed)
        prev = o @ a_tilde
        got = aggregate(factors, previous=prev, variant=variant, path=path).factor
        assert rel(got, prev) <= 1e-10
    # The same holds for a reference built from the *other* path's eigenvectors (which differ
    # by signs / rotations inside the repeated eigenspace).
    other = gram_eigen(factors, path="gram" if path == "thin" else "thin").dense()
    prev = random_orthogonal(4, seed=13) @ other
    assert rel(aggregate(factors, previous=prev, variant=variant, path=path).factor, prev) <= 1e-10


@pytest.mark.parametrize("variant", ["paper", "top-r"])
def test_rotated_reference_is_recovered_when_r_prime_below_r(variant):
    """r' = 2 < r = 4: A_prev = S A~ with S (4 x 2) orthonormal columns is recovered exactly."""
    base = randn(2, 48, seed=14)
    factors = [torch.cat([base, base[:1] - base[1:]]), randn(2, 2, seed=15) @ base]
    a_tilde = gram_eigen(factors).dense()
    assert a_tilde.shape[0] == 2
    s = random_orthogonal(4, seed=16)[:, :2]
    prev = s @ a_tilde
    got = aggregate(factors, previous=prev, variant=variant, rank=4).factor
    assert got.shape == (4, 48)
    assert rel(got, prev) <= 1e-10


# --------------------------------------------------------------------------- r' <= r keeps Q exactly


def low_rank_cases():
    base3 = randn(3, 48, seed=20)
    return {
        "r'=r": ([randn(4, 48, seed=21)], 4),
        "r'=2": ([randn(2, 48, seed=22)], 2),
        "r'=3 from two rank-2 clients": ([base3[:2], base3[1:]], 3),
        "r'=1 repeated rows": ([randn(1, 48, seed=23).repeat(4, 1)], 1),
    }


@pytest.mark.parametrize("path", ["thin", "gram"])
@pytest.mark.parametrize("variant", ["paper", "top-r"])
def test_r_prime_at_most_r_keeps_q_exactly(variant, path):
    for name, (factors, r_prime) in low_rank_cases().items():
        q = dense_q(factors)
        prev = randn(4, 48, seed=24)
        res = aggregate(factors, previous=prev, rank=4, variant=variant, path=path)
        assert res.rank_q == r_prime, name
        assert res.factor.shape == (4, 48)
        assert rel(gram_of(res.factor), q) <= 1e-10, name
        assert int(torch.linalg.matrix_rank(res.factor)) == r_prime, name
        # Exact Frobenius optimum over all S with orthonormal columns: S A~ ranges over these.
        a_tilde = gram_eigen(factors, path=path).dense()
        competitors = random_orthogonals(4, N_RANDOM, seed=25)[:, :, :r_prime] @ a_tilde
        best = fro(res.factor - prev)
        assert float(torch.linalg.matrix_norm(competitors - prev).min()) >= best - 1e-12, name


# --------------------------------------------------------------------------- r' > r


def truncating_clients():
    return [randn(r, 48, seed=30 + r) for r in (1, 2, 4, 8)]  # r' = 15


@pytest.mark.parametrize("path", ["thin", "gram"])
def test_top_r_variant_sends_best_rank_r_approximation(path):
    factors = truncating_clients()
    q = dense_q(factors)
    gf = gram_eigen(factors, path=path)
    assert gf.rank == 15
    for seed in (40, 41, 42):
        prev = randn(4, 48, seed=seed)
        a_new = procrustes_align(prev, gf, 4, variant="top-r")
        assert rel(gram_of(a_new), top_r_truncation(q, 4)) <= 1e-10
        # It is the best rotation of the top-r eigen-factor A~_r.
        a_r = gf.dense(4)
        best = fro(a_new - prev)
        others = torch.linalg.matrix_norm(random_orthogonals(4, N_RANDOM, seed=seed) @ a_r - prev)
        assert float(others.min()) >= best - 1e-12
        assert_procrustes_certificate(a_new, prev)


@pytest.mark.parametrize("path", ["thin", "gram"])
def test_paper_variant_with_r_prime_above_r(path):
    factors = truncating_clients()
    gf = gram_eigen(factors, path=path)
    a_tilde, lam = gf.dense(), gf.eigenvalues
    q = dense_q(factors)
    for seed in (50, 51, 52):
        prev = randn(4, 48, seed=seed)
        a_new = procrustes_align(prev, gf, 4, variant="paper")
        assert a_new.shape == (4, 48)
        # Recover S from A_new = S A~ (A~ A~^T = diag(lam), so S = A_new A~^T diag(1/lam)).
        s = (a_new @ a_tilde.T) / lam
        assert s.shape == (4, 15)
        assert float((s @ s.T - torch.eye(4, dtype=F64)).abs().max()) <= 1e-10
        assert rel(s @ a_tilde, a_new) <= 1e-10  # rows of A_new lie in the row space of A~
        assert fro(a_new) ** 2 <= fro(a_tilde) ** 2 + 1e-10
        # S maximises Tr(A_prev A~^T S^T) over semi-orthogonal S; the maximum is the nuclear
        # norm of A_prev A~^T.
        cross = prev @ a_tilde.T
        best = float(torch.trace(cross @ s.T))
        assert abs(best - float(torch.linalg.svdvals(cross).sum())) <= 1e-10 * best
        others = random_semi_orthogonals(4, 15, N_RANDOM, seed=seed)
        traces = torch.einsum("ij,bij->b", cross, others)
        assert float(traces.max()) <= best + 1e-10
        # Its Gram is Q compressed to a 4-dimensional subspace: not Q, and (for a generic
        # reference) not the top-4 eigen-truncation either.
        g = gram_of(a_new)
        assert rel(g, q) > 1e-3
        assert rel(g, top_r_truncation(q, 4)) > 1e-3
        assert float(torch.linalg.eigvalsh(q - g).min()) >= -1e-10 * float(lam[0])  # 0 <= A^T A <= Q


# --------------------------------------------------------------------------- no alignment


@pytest.mark.parametrize("variant", ["paper", "top-r"])
def test_align_false_gives_raw_top_r_eigen_factor(variant):
    factors = truncating_clients()
    q = dense_q(factors)
    lam = torch.linalg.eigvalsh(q).flip(0)
    prev = randn(4, 48, seed=60)
    res = aggregate(factors, previous=prev, variant=variant, align=False, rank=4)
    a = res.factor
    assert rel(gram_of(a), top_r_truncation(q, 4)) <= 1e-10
    # Eigen-factor: orthogonal rows with squared norms = the top-4 eigenvalues, in order.
    assert float((a @ a.T - torch.diag(lam[:4])).abs().max()) <= 1e-10 * float(lam[0])
    # The reference and the variant are ignored.
    for other in (None, randn(4, 48, seed=61)):
        again = aggregate(factors, previous=other, variant="top-r", align=False, rank=4).factor
        assert torch.equal(again, a)
    assert torch.equal(aggregate(factors, rank=4).factor, a)  # no reference yet: unaligned


def test_align_false_zero_pads_when_r_prime_below_r():
    factors = [randn(2, 48, seed=62)]
    q = dense_q(factors)
    a = aggregate(factors, previous=randn(4, 48, seed=63), rank=4, align=False).factor
    assert a.shape == (4, 48)
    assert torch.equal(a[2:], torch.zeros(2, 48, dtype=F64))
    assert bool((a[:2].abs().sum(dim=1) > 0).all())
    assert rel(gram_of(a), q) <= 1e-10


def test_previous_none_gives_unaligned_factor_for_both_variants():
    factors = truncating_clients()
    gf = gram_eigen(factors)
    raw = procrustes_align(None, gf, 4, align=False)
    assert torch.equal(procrustes_align(None, gf, 4, variant="paper"), raw)
    assert torch.equal(procrustes_align(None, gf, 4, variant="top-r"), raw)
    assert torch.equal(raw, gf.dense(4))


def test_alignment_is_invariant_to_the_eigenvector_choice():
    """Aligned factors do not depend on signs or rotations of A~ (thin vs gram eigenvectors)."""
    frame = orthonormal_rows(8, 48, seed=70)
    factors = [2.0 * frame[:4], 2.0 * frame[4:]]  # Q = 2 P: one eigenvalue of multiplicity 8
    prev = randn(4, 48, seed=72)
    thin_gf, gram_gf = gram_eigen(factors, path="thin"), gram_eigen(factors, path="gram")
    assert thin_gf.rank == gram_gf.rank == 8
    assert float((thin_gf.eigenvalues - 2.0).abs().max()) <= 1e-12
    # Paper variant: S* A~ does not depend on which orthonormal basis of the eigenspace A~ uses.
    thin = procrustes_align(prev, thin_gf, 4, variant="paper")
    gram = procrustes_align(prev, gram_gf, 4, variant="paper")
    rotated = GramFactor(
        eigenvalues=gram_gf.eigenvalues,
        coeff=random_orthogonal(8, seed=73),
        base=gram_gf.dense(),
        dropped=gram_gf.dropped,
        path="gram",
    )
    assert rel(thin, gram) <= 1e-10
    assert rel(procrustes_align(prev, rotated, 4, variant="paper"), gram) <= 1e-10
    # Top-r: the top-4 eigenspace is not unique (the eigenvalue straddles r = 4), so only the
    # kept energy and the eigen-structure are comparable.
    for gf in (thin_gf, gram_gf):
        a = procrustes_align(prev, gf, 4, variant="top-r")
        assert float((a @ a.T - 2.0 * torch.eye(4, dtype=F64)).abs().max()) <= 1e-10

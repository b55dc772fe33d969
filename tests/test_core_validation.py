"""Bad input is rejected with a ``ValueError`` that names the layer and the problem.

Nothing is silently broadcast: 1-D and 3-D factors, wrongly shaped reference factors and
mismatched weight lists are errors, never reshaped.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from florg.core import (
    GramAccumulator,
    aggregate,
    aggregate_model,
    check_factors,
    gram_eigen,
    normalise_weights,
    procrustes_align,
)
from helpers import F64, randn

LAYER = "encoder.layer.3.attention.self.query"
K = 16


def clients(n: int = 3, r: int = 4) -> list[torch.Tensor]:
    return [randn(r, K, seed=i) for i in range(n)]


def with_nan(value: float) -> list[torch.Tensor]:
    fs = clients()
    fs[1] = fs[1].clone()
    fs[1][2, 5] = value
    return fs


def names_layer(problem: str) -> str:
    return re.escape(repr(LAYER)) + ".*" + problem


# (description, kwargs for aggregate, regex for the problem)
BAD_AGGREGATE = [
    ("rank zero", dict(factors=clients(), rank=0), r"rank 0 is outside 1\.\.k=16"),
    ("rank negative", dict(factors=clients(), rank=-2), r"rank -2 is outside 1\.\.k=16"),
    ("rank above k", dict(factors=clients(), rank=K + 1), r"rank 17 is outside 1\.\.k=16"),
    ("client with zero rows", dict(factors=[*clients(2), torch.zeros(0, K, dtype=F64)]), r"client 2 rank 0 is outside 1\.\.k"),
    ("client with more rows than k", dict(factors=[*clients(1), randn(K + 1, K)]), r"client 1 rank 17 is outside 1\.\.k=16"),
    ("wrong width", dict(factors=[*clients(2), randn(4, K - 4)]), r"client 2 factor has width 12, expected k=16"),
    ("mixed dtypes", dict(factors=[*clients(2), randn(4, K, dtype=torch.float32)]), r"mixed dtypes"),
    ("NaN", dict(factors=with_nan(float("nan"))), r"client 1 factor contains NaN or Inf"),
    ("Inf", dict(factors=with_nan(float("inf"))), r"client 1 factor contains NaN or Inf"),
    ("-Inf", dict(factors=with_nan(float("-inf"))), r"client 1 factor contains NaN or Inf"),
    ("empty client list", dict(factors=[]), r"empty client list"),
    ("negative weight", dict(factors=clients(), weights=[1.0, -2.0, 1.0]), r"weight -2\.0 of client 1 must be positive"),
    ("zero weight", dict(factors=clients(), weights=[1.0, 1.0, 0.0]), r"weight 0\.0 of client 2 must be positive"),
    ("NaN weight", dict(factors=clients(), weights=[1.0, float("nan"), 1.0]),
     r"weight nan of client 1 must be positive and finite"),
    ("Inf weight", dict(factors=clients(), weights=[float("inf"), 1.0, 1.0]),
     r"weight inf of client 0 must be positive and finite"),
    ("too few weights", dict(factors=clients(), weights=[1.0, 2.0]), r"got 2 weights for 3 client factors"),
    ("too many weights", dict(factors=clients(), weights=[1.0, 2.0, 3.0, 4.0]), r"got 4 weights for 3 client factors"),
    ("previous wrong rows", dict(factors=clients(), previous=randn(3, K), rank=4),
     r"previous global factor has shape \(3, 16\), expected \(4, 16\)"),
    ("previous wrong width", dict(factors=clients(), previous=randn(4, K + 1)),
     r"previous global factor has shape \(4, 17\), expected \(4, 16\)"),
    ("previous 1-D", dict(factors=clients(), previous=randn(K)), r"previous global factor has shape \(16,\)"),
    ("previous 1-D with rank", dict(factors=clients(), previous=randn(K), rank=1),
     r"previous global factor has shape \(16,\), expected \(1, 16\)"),
    ("previous 3-D", dict(factors=clients(), previous=randn(1, 4, K)), r"previous global factor has shape \(1, 4, 16\)"),
    ("previous 0-D", dict(factors=clients(), previous=torch.tensor(1.0)), r"previous global factor has shape \(\)"),
    ("previous NaN", dict(factors=clients(), previous=torch.full((4, K), float("nan"))),
     r"previous global factor contains NaN or Inf"),
    ("previous not a tensor", dict(factors=clients(), previous=np.zeros((4, K)), rank=4), r"previous global factor is ndarray"),
    ("unknown variant", dict(factors=clients(), variant="procrustes"), r"variant must be 'paper' or 'top-r', got 'procrustes'"),
    ("unknown path", dict(factors=clients(), path="svd"), r"path must be 'auto', 'thin' or 'gram', got 'svd'"),
    ("1-D factor", dict(factors=[*clients(2), randn(K)]), r"client 2 factor has shape \(16,\); expected a 2-D"),
    ("3-D factor", dict(factors=[*clients(2), randn(1, 4, K)]), r"client 2 factor has shape \(1, 4, 16\); expected a 2-D"),
    ("0-D factor", dict(factors=[torch.tensor(1.0, dtype=F64)]), r"client 0 factor has shape \(\); expected a 2-D"),
    ("integer factor", dict(factors=[torch.ones(4, K, dtype=torch.int64)]),
     r"client 0 factor has dtype torch\.int64; expected a floating"),
    ("numpy factor", dict(factors=[np.ones((4, K))]), r"client 0 factor is ndarray, expected a torch\.Tensor"),
    ("negative eig_rtol", dict(factors=clients(), eig_rtol=-1e-12), r"eig_rtol must be in \[0, 1\)"),
    ("NaN eig_rtol", dict(factors=clients(), eig_rtol=float("nan")), r"eig_rtol must be in \[0, 1\)"),
    ("eig_rtol of one", dict(factors=clients(), eig_rtol=1.0), r"eig_rtol must be in \[0, 1\)"),
]


@pytest.mark.parametrize("kwargs,problem", [c[1:] for c in BAD_AGGREGATE], ids=[c[0] for c in BAD_AGGREGATE])
def test_aggregate_rejects_bad_input(kwargs, problem):
    kwargs = dict(kwargs)
    factors = kwargs.pop("factors")
    weights = kwargs.pop("weights", None)
    with pytest.raises(ValueError, match=names_layer(problem)):
        aggregate(factors, weights, layer=LAYER, **kwargs)


GRAM_EIGEN_CASES = [c for c in BAD_AGGREGATE if not set(c[1]) & {"rank", "previous", "variant"}]


@pytest.mark.parametrize("kwargs,problem", [c[1:] for c in GRAM_EIGEN_CASES], ids=[c[0] for c in GRAM_EIGEN_CASES])
def test_gram_eigen_rejects_bad_input(kwargs, problem):
    kwargs = dict(kwargs)
    factors = kwargs.pop("factors")
    weights = kwargs.pop("weights", None)
    with pytest.raises(ValueError, match=names_layer(problem)):
        gram_eigen(factors, weights, layer=LAYER, **kwargs)


def test_check_factors_direct():
    assert check_factors(clients(), layer=LAYER) == K
    assert check_factors(clients(), layer=LAYER, k=K, max_rank=4) == K
    with pytest.raises(ValueError, match=names_layer(r"client 0 factor has width 16, expected k=32")):
        check_factors(clients(), layer=LAYER, k=32)
    with pytest.raises(ValueError, match=names_layer(r"client 0 rank 4 exceeds the allowed maximum 2")):
        check_factors(clients(), layer=LAYER, max_rank=2)
    with pytest.raises(ValueError, match=names_layer(r"empty client list")):
        check_factors(None, layer=LAYER)
    # bfloat16 and float16 uploads are valid floating factors.
    assert check_factors([randn(4, K).to(torch.bfloat16)], layer=LAYER) == K


def test_normalise_weights_direct():
    assert normalise_weights(None, 4, layer=LAYER) == [0.25] * 4
    assert normalise_weights([1, 3], 2, layer=LAYER) == [0.25, 0.75]
    p = normalise_weights([37, 250, 4], 3, layer=LAYER)
    assert abs(sum(p) - 1.0) <= 1e-15 and abs(p[1] - 250 / 291) <= 1e-15
    with pytest.raises(ValueError, match=names_layer(r"got 1 weights for 2 client factors")):
        normalise_weights([1.0], 2, layer=LAYER)
    with pytest.raises(ValueError, match=names_layer(r"weight -1\.0 of client 0 must be positive")):
        normalise_weights([-1.0, 2.0], 2, layer=LAYER)


def test_weights_are_normalised_not_used_raw():
    fs = clients()
    a = aggregate(fs, [1.0, 2.0, 3.0], layer=LAYER, rank=12)
    b = aggregate(fs, [10.0, 20.0, 30.0], layer=LAYER, rank=12)
    assert float((a.eigenvalues - b.eigenvalues).abs().max()) <= 1e-12 * float(a.eigenvalues[0])


# --------------------------------------------------------------------------- aggregate_model


def test_aggregate_model_names_the_failing_layer():
    good = clients()
    with pytest.raises(ValueError, match=r"'blk\.1\.v'.*client 0 factor contains NaN or Inf"):
        aggregate_model({"blk.0.q": good, "blk.1.v": with_nan(float("nan"))[1:]})
    with pytest.raises(ValueError, match=r"'blk\.1\.v'.*2 client factors, other layers have 3"):
        aggregate_model({"blk.0.q": good, "blk.1.v": good[:2]})
    with pytest.raises(ValueError, match=r"'blk\.1\.v'.*previous global factor has shape \(3, 16\), expected \(4, 16\)"):
        aggregate_model({"blk.0.q": good, "blk.1.v": good}, previous={"blk.1.v": randn(3, K)}, rank=4)
    with pytest.raises(ValueError, match=r"'blk\.0\.q'.*rank 0 is outside"):
        aggregate_model({"blk.0.q": good}, rank={"blk.0.q": 0})
    with pytest.raises(ValueError, match=r"'blk\.0\.q'.*got 2 weights for 3 client factors"):
        aggregate_model({"blk.0.q": good}, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"'blk\.0\.q'.*variant must be 'paper' or 'top-r'"):
        aggregate_model({"blk.0.q": good}, variant="none")
    with pytest.raises(ValueError, match=r"'blk\.0\.q'.*path must be"):
        aggregate_model({"blk.0.q": good}, path="dense")
    with pytest.raises(ValueError, match=r"'blk\.0\.q'.*eig_rtol must be in"):
        aggregate_model({"blk.0.q": good}, eig_rtol=-1.0)
    with pytest.raises(ValueError, match=r"'blk\.0\.q'.*empty client list"):
        aggregate_model({"blk.0.q": []})
    with pytest.raises(ValueError, match=r"no layers were uploaded"):
        aggregate_model({})


# --------------------------------------------------------------------------- GramAccumulator


def test_gram_accumulator_rejects_bad_input():
    acc = GramAccumulator(K, layer=LAYER)
    with pytest.raises(ValueError, match=names_layer(r"empty client list; no factor was added")):
        acc.gram()
    with pytest.raises(ValueError, match=names_layer(r"client 0 factor has width 12, expected k=16")):
        acc.add(randn(4, 12))
    with pytest.raises(ValueError, match=names_layer(r"client 0 factor has shape \(16,\)")):
        acc.add(randn(K))
    with pytest.raises(ValueError, match=names_layer(r"client 0 factor contains NaN or Inf")):
        acc.add(torch.full((4, K), float("inf"), dtype=F64))
    with pytest.raises(ValueError, match=names_layer(r"weight 0\.0 of client 0 must be positive")):
        acc.add(randn(4, K), 0.0)
    assert acc.count == 0  # nothing was added by the failed calls
    acc.add(randn(4, K))
    with pytest.raises(ValueError, match=names_layer(r"mixed dtypes")):
        acc.add(randn(4, K, dtype=torch.float32))
    with pytest.raises(ValueError, match=names_layer(r"eig_rtol must be in")):
        acc.eigen(eig_rtol=-0.5)
    assert acc.count == 1
    with pytest.raises(ValueError, match=names_layer(r"k must be positive, got 0")):
        GramAccumulator(0, layer=LAYER)


# --------------------------------------------------------------------------- procrustes_align


def test_procrustes_align_rejects_bad_input():
    gf = gram_eigen(clients(), layer=LAYER)
    with pytest.raises(ValueError, match=names_layer(r"previous global factor has shape \(3, 16\), expected \(4, 16\)")):
        procrustes_align(randn(3, K), gf, 4, layer=LAYER)
    with pytest.raises(ValueError, match=names_layer(r"previous global factor has shape \(4,\)")):
        procrustes_align(randn(4), gf, 4, layer=LAYER)
    with pytest.raises(ValueError, match=names_layer(r"rank 0 is outside 1\.\.k=16")):
        procrustes_align(None, gf, 0, layer=LAYER)
    with pytest.raises(ValueError, match=names_layer(r"rank 17 is outside 1\.\.k=16")):
        procrustes_align(None, gf, K + 1, layer=LAYER)
    with pytest.raises(ValueError, match=names_layer(r"variant must be 'paper' or 'top-r', got 'x'")):
        procrustes_align(randn(4, K), gf, 4, variant="x", layer=LAYER)
    with pytest.raises(ValueError, match=names_layer(r"previous global factor contains NaN or Inf")):
        procrustes_align(torch.full((4, K), float("nan"), dtype=F64), gf, 4, layer=LAYER)


def test_low_precision_uploads_round_trip_dtype():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        fs = [a.to(dtype) for a in clients()]
        res = aggregate(fs, previous=randn(4, K).to(dtype), layer=LAYER)
        assert res.factor.dtype == dtype and res.factor.shape == (4, K)
        assert bool(torch.isfinite(res.factor).all())

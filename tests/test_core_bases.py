"""The fixed bases ``L``, ``R``, the per-layer seed and the initial factor ``A0``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from florg.core import bases as bases_module
from florg.core import init_factor, layer_seed, make_bases
from florg.core.bases import orthonormal_frame

F64 = torch.float64
NAME = "encoder.layer.0.attention.self.query"
SHAPES = {"square": (64, 64), "wide": (48, 160), "tall": (200, 56)}


# --------------------------------------------------------------------------- make_bases


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_bases_are_deterministic(dtype):
    l1, r1 = make_bases(96, 64, seed=7, layer_name=NAME, dtype=dtype)
    l2, r2 = make_bases(96, 64, seed=7, layer_name=NAME, dtype=dtype)
    assert l1.dtype == r1.dtype == dtype
    assert torch.equal(l1, l2) and torch.equal(r1, r2)
    # Every dtype is a cast of the same float64 draw.
    l64, r64 = make_bases(96, 64, seed=7, layer_name=NAME, dtype=F64)
    assert torch.equal(l1, l64.to(dtype)) and torch.equal(r1, r64.to(dtype))


def test_bases_depend_on_seed_and_name():
    ref_l, ref_r = make_bases(64, 64, seed=7, layer_name=NAME)
    for seed, name in ((8, NAME), (7, NAME.replace("query", "value")), (7, "decoder.layers.0.q_proj")):
        left, right = make_bases(64, 64, seed=seed, layer_name=name)
        assert float((left - ref_l).abs().max()) > 0.1
        assert float((right - ref_r).abs().max()) > 0.1
    # L and R are independent draws (not transposes of each other).
    assert float((ref_l - ref_r.T).abs().max()) > 0.1


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bases_are_orthonormal(shape):
    d_out, d_in = SHAPES[shape]
    k = min(d_out, d_in)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-6)):
        left, right = make_bases(d_out, d_in, seed=3, layer_name=f"layer.{shape}", dtype=dtype)
        assert left.shape == (d_out, k) and right.shape == (k, d_in)
        left, right = left.to(F64), right.to(F64)
        eye = torch.eye(k, dtype=F64)
        assert float((left.T @ left - eye).abs().max()) <= tol
        assert float((right @ right.T - eye).abs().max()) <= tol
    # bfloat16 keeps only ~3 significant digits, but is still close to orthonormal.
    left, right = make_bases(d_out, d_in, seed=3, layer_name=f"layer.{shape}", dtype=torch.bfloat16)
    assert float((left.to(F64).T @ left.to(F64) - eye).abs().max()) <= 5e-2


def test_bases_preserve_frobenius_norm():
    left, right = make_bases(48, 160, seed=1, layer_name="x", dtype=F64)
    x = torch.randn(48, 48, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert abs(float(torch.linalg.matrix_norm(left @ x @ right) / torch.linalg.matrix_norm(x)) - 1) <= 1e-12


def test_bases_device_argument():
    left, right = make_bases(32, 16, seed=1, layer_name="x", device="cpu")
    assert left.device.type == "cpu" and right.device.type == "cpu"
    assert left.dtype == torch.float32


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (-3, 8)])
def test_bases_reject_non_positive_shapes(shape):
    with pytest.raises(ValueError, match=r"'blk\.1\.fc'.*shape must be positive"):
        make_bases(*shape, seed=0, layer_name="blk.1.fc")


def test_orthonormal_frame_sign_convention_and_bounds():
    g = torch.Generator().manual_seed(5)
    frame = orthonormal_frame(12, 5, g)
    draw = torch.randn(12, 5, generator=torch.Generator().manual_seed(5), dtype=F64)
    # frame is the Q factor of the draw with a positive-diagonal R: frame^T draw is upper
    # triangular with a positive diagonal.
    r = frame.T @ draw
    assert float(torch.tril(r, -1).abs().max()) <= 1e-12
    assert bool((torch.diagonal(r) > 0).all())
    with pytest.raises(ValueError, match="cannot build 6 orthonormal columns in dimension 5"):
        orthonormal_frame(5, 6, g)


# --------------------------------------------------------------------------- layer_seed


def test_layer_seed_is_stable_and_in_range():
    a = layer_seed(7, NAME)
    assert a == layer_seed(7, NAME)
    assert isinstance(a, int) and 0 <= a < 2**63
    others = {
        layer_seed(8, NAME),
        layer_seed(7, NAME + "x"),
        layer_seed(7, "decoder.layers.0.q_proj"),
        layer_seed(-7, NAME),
        layer_seed(0, NAME),
    }
    assert a not in others and len(others) == 5


def test_layer_seed_independent_of_python_hash_randomisation():
    # A fresh interpreter with another hash seed derives the same value. To keep it fast the
    # module is loaded on its own, with a stub in place of torch (layer_seed does not use it).
    code = (
        "import importlib.util, sys, types\n"
        "class Stub(types.ModuleType):\n"
        "    def __getattr__(self, name):\n"
        "        return None\n"
        "sys.modules['torch'] = Stub('torch')\n"
        f"spec = importlib.util.spec_from_file_location('bases', {bases_module.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        f"print(mod.layer_seed(7, {NAME!r}))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == layer_seed(7, NAME)


@pytest.mark.parametrize("name", ["", None, 3])
def test_layer_seed_rejects_bad_names(name):
    with pytest.raises(ValueError, match="layer_name must be a non-empty string"):
        layer_seed(0, name)


# --------------------------------------------------------------------------- init_factor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_init_factor_deterministic(dtype):
    a = init_factor(4, 256, seed=7, layer_name=NAME, dtype=dtype)
    b = init_factor(4, 256, seed=7, layer_name=NAME, dtype=dtype)
    assert a.shape == (4, 256) and a.dtype == dtype
    assert torch.equal(a, b)
    assert torch.equal(a, init_factor(4, 256, seed=7, layer_name=NAME, dtype=F64).to(dtype))


def test_init_factor_values():
    a = init_factor(4, 256, seed=7, layer_name=NAME, scale=0.01, dtype=F64)
    assert bool((a != 0).all())
    assert abs(float(a.std()) / 0.01 - 1) < 0.1
    assert abs(float(a.mean())) < 0.002
    big = init_factor(4, 256, seed=7, layer_name=NAME, scale=0.5, dtype=F64)
    assert float((big - 50 * a).abs().max()) <= 1e-15  # the scale is a pure multiplier
    # Different layer, different seed: different draws; independent of the bases' draw.
    assert float((init_factor(4, 256, seed=7, layer_name=NAME + ".v", dtype=F64) - a).abs().max()) > 1e-3
    assert float((init_factor(4, 256, seed=8, layer_name=NAME, dtype=F64) - a).abs().max()) > 1e-3
    assert init_factor(256, 256, seed=1, layer_name="full").shape == (256, 256)  # rank = k is allowed
    # Not a re-use of the bases' Gaussian stream for the same layer.
    stream = torch.randn(4 * 256, generator=torch.Generator().manual_seed(layer_seed(7, NAME)), dtype=F64)
    assert abs(float(torch.dot(stream, a.flatten() / 0.01))) / (4 * 256) < 0.2


@pytest.mark.parametrize("rank", [0, -1, 9])
def test_init_factor_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match=rf"'blk\.0\.q'.*rank {rank} is outside 1\.\.k=8"):
        init_factor(rank, 8, seed=0, layer_name="blk.0.q")


@pytest.mark.parametrize("scale", [0.0, -0.01, float("nan")])
def test_init_factor_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match=r"'blk\.0\.q'.*init scale must be positive"):
        init_factor(4, 8, seed=0, layer_name="blk.0.q", scale=scale)

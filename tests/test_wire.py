"""What crosses the wire: exact byte counts per layer and the 16-bit wire dtypes."""

import pytest
import torch

from florg.fl.records import from_record, quantize, to_record

HEADER = 128  # Flower's per-array header (NumPy .npy header) -- the key's length comes on top


@pytest.mark.parametrize("r, k", [(4, 384), (4, 192), (8, 1024), (1, 7)])
@pytest.mark.parametrize("wire, size", [("float32", 4), ("float16", 2), ("bfloat16", 2)])
def test_bytes_per_layer_is_r_k_bytes_plus_fixed_header(r, k, wire, size):
    key = "A/model.layers.0.self_attn.q_proj"
    rec = to_record({key: torch.randn(r, k)}, wire)
    suffix = 5 if wire == "bfloat16" else 0  # "#bf16"
    assert rec.count_bytes() == r * k * size + HEADER + len(key) + suffix


def test_many_layers_add_up():
    state = {f"A/layer{i}.q": torch.randn(4, 384) for i in range(12)}
    state["head/classifier.weight"] = torch.randn(4, 384)
    rec = to_record(state)
    assert rec.count_bytes() == sum(v.numel() * 4 + HEADER + len(k) for k, v in state.items())


@pytest.mark.parametrize("wire, dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_16bit_wire_round_trip(wire, dtype):
    g = torch.Generator().manual_seed(0)
    state = {"A/l0": torch.randn(4, 64, generator=g), "head/w": torch.randn(3, 64, generator=g)}
    back = from_record(to_record(state, wire))
    assert back.keys() == state.keys()
    assert back["A/l0"].dtype == torch.float32
    assert torch.equal(back["A/l0"], state["A/l0"].to(dtype).to(torch.float32))  # exactly the 16-bit value
    assert torch.equal(back["head/w"], state["head/w"])  # the head stays float32
    assert torch.equal(quantize(state, wire)["A/l0"], back["A/l0"])
    assert quantize(state, "float32") is state


def test_float32_wire_is_bit_exact_and_unknown_dtype_fails():
    t = {"A/l0": torch.randn(4, 8)}
    assert torch.equal(from_record(to_record(t))["A/l0"], t["A/l0"])
    with pytest.raises(ValueError, match="federation.wire_dtype"):
        to_record(t, "int8")

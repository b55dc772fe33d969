"""Conversions between florg's ``{key: tensor}`` dicts and Flower records (the only place that does it).

Adapter tensors can travel in a 16-bit wire dtype (``federation.wire_dtype``): ``float16`` as is,
``bfloat16`` (which Flower's NumPy-based arrays cannot hold) bit-cast to ``int16`` under the key
suffix ``#bf16``. Decoding returns float32. Head tensors (``head/...``) always travel in float32.
Each array costs its payload plus Flower's 128-byte array header and the length of its key.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord

CONFIG_KEY = "florg-config"  # the resolved run config (JSON) travels in every round's ConfigRecord
BF16_SUFFIX = "#bf16"
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _encode(key: str, value: torch.Tensor, wire_dtype: str) -> tuple[str, torch.Tensor]:
    value = value.detach().cpu().contiguous()
    if key.startswith("head/") or wire_dtype == "float32" or not value.is_floating_point():
        return key, value
    if wire_dtype == "float16":
        return key, value.to(torch.float16)
    if wire_dtype == "bfloat16":
        return key + BF16_SUFFIX, value.to(torch.bfloat16).view(torch.int16)
    raise ValueError(f"federation.wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {wire_dtype!r}")


def to_record(state: dict[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """Encode a state dict as an ArrayRecord (adapter tensors in ``wire_dtype``)."""
    return ArrayRecord(OrderedDict(_encode(k, v, wire_dtype) for k, v in state.items()))


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode an ArrayRecord; 16-bit wire tensors come back as float32."""
    out: dict[str, torch.Tensor] = {}
    for key, value in record.to_torch_state_dict().items():
        if key.endswith(BF16_SUFFIX):
            out[key[: -len(BF16_SUFFIX)]] = value.view(torch.bfloat16).to(torch.float32)
        elif value.dtype == torch.float16:
            out[key] = value.to(torch.float32)
        else:
            out[key] = value
    return out


def quantize(state: dict[str, torch.Tensor], wire_dtype: str) -> dict[str, torch.Tensor]:
    """The state exactly as a receiver decodes it after a trip through the wire."""
    if wire_dtype == "float32":
        return state
    return from_record(to_record(state, wire_dtype))

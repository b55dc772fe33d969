"""Conversions between florg's ``{key: tensor}`` dicts and Flower records (the only place that does it)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord

CONFIG_KEY = "florg-config"  # the resolved run config (JSON) travels in every round's ConfigRecord


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items()))


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())

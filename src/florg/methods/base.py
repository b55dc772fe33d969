"""The contract every federated method implements: the client's adapter shape and the server's rule.

A method turns a plain transformers model into the client model (``build``), says what the
global state is (``initial_global``), how a client applies it (``load_global``), what a client
uploads (``upload``) and how the server combines uploads (``aggregate``). Tensors travel as flat
``{key: tensor}`` dicts; keys under ``head/`` are the classification head, which every method
trains and FedAvgs the same way (weighted mean), and which is counted separately on the wire.

Methods know nothing about Flower: ``florg.fl`` converts these dicts to and from Flower records.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from florg.config import RunConfig

__all__ = ["FederatedMethod", "HEAD_PREFIX", "head_state", "load_head", "weighted_mean", "split_head"]

HEAD_PREFIX = "head/"
Tensors = dict[str, torch.Tensor]


def head_state(model: nn.Module, adapter_param_marker: str) -> Tensors:
    """Trainable parameters that are not adapter parameters (the classification head), keyed ``head/<name>``."""
    return {
        HEAD_PREFIX + name: p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad and adapter_param_marker not in name
    }


def load_head(model: nn.Module, state: Tensors) -> None:
    """Copy ``head/<name>`` tensors of ``state`` into the model's parameters of the same name."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if not key.startswith(HEAD_PREFIX):
                continue
            name = key[len(HEAD_PREFIX):]
            if name not in params:
                raise KeyError(f"head parameter '{name}' is not in the model; the client and server models differ")
            params[name].copy_(value.to(params[name].dtype))


def split_head(state: Tensors) -> tuple[Tensors, Tensors]:
    """``(adapter_part, head_part)`` of a flat state dict."""
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    return rest, head


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """``sum_n p_n t_n`` with ``p_n = w_n / sum w`` (uniform when ``weights`` is None), in float64, cast back."""
    n = len(tensors)
    w = torch.tensor([1.0] * n if weights is None else list(weights), dtype=torch.float64)
    w = w / w.sum()
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, p in zip(tensors, w):
        acc += p * t.to(torch.float64)
    return acc.to(tensors[0].dtype)


class FederatedMethod(ABC):
    """Base class of a federated fine-tuning method (client shape + server rule)."""

    name: ClassVar[str]
    #: substring that identifies adapter parameters in ``model.named_parameters()``
    adapter_param_marker: ClassVar[str]

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @property
    def uses_example_weights(self) -> bool:
        return self.cfg.method.weighting == "examples"

    # ---- client side -------------------------------------------------------------------
    @abstractmethod
    def build(self, model: nn.Module, target_modules: list[str], head_modules: list[str]) -> nn.Module:
        """Wrap ``model`` with this method's adapter; only adapter (and head) parameters train."""

    @abstractmethod
    def adapter_state(self, model: nn.Module) -> Tensors:
        """The adapter tensors that make up the global state (no head)."""

    @abstractmethod
    def load_adapter_state(self, model: nn.Module, state: Tensors) -> None:
        """Write the adapter part of a global state into the model."""

    def initial_global(self, model: nn.Module) -> Tensors:
        """The global state broadcast in round 1 (adapter + head, if the head trains)."""
        state = self.adapter_state(model)
        if self.cfg.method.train_head:
            state.update(head_state(model, self.adapter_param_marker))
        return state

    def load_global(self, model: nn.Module, state: Tensors) -> None:
        """Apply what came down from the server."""
        adapter, head = split_head(state)
        self.load_adapter_state(model, adapter)
        load_head(model, head)

    def upload(self, model: nn.Module) -> Tensors:
        """What a client sends up after local training."""
        state = self.adapter_state(model)
        if self.cfg.method.train_head:
            state.update(head_state(model, self.adapter_param_marker))
        return state

    # ---- server side -------------------------------------------------------------------
    @abstractmethod
    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        """Combine the adapter parts of the uploads into the next global adapter state."""

    def aggregate(
        self, uploads: list[Tensors], num_examples: list[int], current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        """The server rule: adapter by the method's rule, head by weighted mean."""
        weights = [float(n) for n in num_examples] if self.uses_example_weights else None
        split = [split_head(u) for u in uploads]
        cur_adapter, _ = split_head(current)
        new_state, metrics = self.aggregate_adapter([a for a, _ in split], weights, cur_adapter)
        heads = [h for _, h in split]
        for key in heads[0] if heads else {}:
            new_state[key] = weighted_mean([h[key] for h in heads], weights)
        return new_state, metrics

"""FedSA-LoRA (Guo et al., ICLR 2025): ``A`` shared and averaged; ``B`` and the head kept local on each client.

Client shape: PEFT LoRA, both factors trained, ``A0`` seeded, ``B0 = 0``.
Upload and download (the protocol): ``A`` (``r x d_in``) per adapted layer, nothing else.
Server rule: ``A = sum_n p_n A_n``. As in the reference (``personalization.local_param:
['lora_B', 'classifier']``), each client's ``B_n`` **and classification head** never enter the
protocol: they live in the client's own persistent state (Flower's ``Context.state``, passed to
:meth:`client_load` / :meth:`client_upload` as ``local``), never in the process-level model, which
simulated clients share. A client's first round starts from ``B = 0`` and the initial head, which
every process builds identically from the seed (so nothing crosses the wire for it).

Two accuracies are reported:

* **personalised** (``personal_<metric>``, e.g. ``personal_accuracy``; the method's own metric and
  its headline): after each round's aggregation every client evaluates its own model
  ``W0 + s B_n A_bar`` with its own head on a fixed, seeded subset of the global test split, with
  each class weighted by the client's own training label share (label-skew partitions only move
  label proportions, so this is the client's expected accuracy on its own distribution), and the
  server takes the example-weighted mean over clients (see
  :func:`florg.tasks.classification.label_weighted_accuracy`).
* **global** (``test_<metric>``): a constructed global model ``W0 + s B_bar A_bar`` with
  ``B_bar = sum_n p_n B_n`` and the head ``head_bar = sum_n p_n head_n`` over the round's
  participants (same weights as ``A``). To form it the server needs the ``B_n`` and heads: clients
  send them under ``eval/`` keys, counted as ``bytes_up_eval`` and not as protocol traffic
  (``bytes_up``); ``B_bar`` and ``head_bar`` stay on the server (``server/`` keys) and are never
  sent down. This model is not exact (like FedIT's) and is not FedSA-LoRA's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from florg.options import need, option

from .base import (
    EVAL_PREFIX,
    HEAD_PREFIX,
    SERVER_PREFIX,
    ClientInfo,
    Tensors,
    head_state,
    load_head,
    weighted_mean,
)
from .lora_common import B_SUFFIX, LayerRound, LoRAMethod, a_key, b_key
from .lora_math import Factored, layer_errors

_SERVER_HEAD = SERVER_PREFIX + HEAD_PREFIX
_EVAL_HEAD = EVAL_PREFIX + HEAD_PREFIX


@dataclass
class FedSALoRAOptions:
    """``method.fedsa-lora.*``."""

    personal_eval_examples: int = option(200, "Global-test examples each client evaluates its personalised model on per "
                                              "round (label-reweighted to its own data; 0 = all).")

    def check(self, prefix: str) -> None:
        need(self.personal_eval_examples >= 0, f"{prefix}.personal_eval_examples", "must be >= 0 (0 = all)")


class FedSALoRAMethod(LoRAMethod):
    name = "fedsa-lora"
    display_name = "FedSA-LoRA"
    client_evaluation = True
    shares_head = False
    headline = "personal"
    options_class = FedSALoRAOptions
    arrays_per_layer = (1, 1)
    peft_factors = ("lora_A",)  # B and the head stay on each client

    def wire_numel(self, d_out: int, d_in: int, rank: int, client_rank: int | None = None,
                   round_ranks: Sequence[int] | None = None) -> tuple[int, int]:
        return rank * d_in, rank * d_in  # A both ways; B (and the head) stay on the client

    @property
    def client_eval_examples(self) -> int:
        return int(self.options.personal_eval_examples)

    def build(self, model: nn.Module, target_modules: list[str], head_modules: list[str]) -> nn.Module:
        model = super().build(model, target_modules, head_modules)
        # Every process builds the same initial head from the seed: a client's first-round head.
        # Kept on the (cached) model, which outlives the method objects built for the same experiment.
        model.florg_initial_head = head_state(model, self.adapter_param_marker) if self.cfg.method.train_head else {}
        return model

    def adapter_state(self, model: nn.Module) -> Tensors:
        return self.lora_state(model, b=False)

    def initial_global(self, model: nn.Module) -> Tensors:
        state = self.adapter_state(model)  # A: the protocol
        state.update({SERVER_PREFIX + k: v for k, v in self.lora_state(model, a=False).items()})  # B_bar = 0
        if self.cfg.method.train_head:
            state.update({SERVER_PREFIX + k: v for k, v in head_state(model, self.adapter_param_marker).items()})
        return state

    def load_global(self, model: nn.Module, state: Tensors) -> None:
        """Apply ``A`` and, where present (the server's own global model), ``B_bar`` and ``head_bar``."""
        self.load_adapter_state(model, {k: v for k, v in state.items() if not k.startswith(_SERVER_HEAD)})
        load_head(model, {k[len(SERVER_PREFIX):]: v for k, v in state.items() if k.startswith(_SERVER_HEAD)})

    def upload(self, model: nn.Module) -> Tensors:
        up = self.adapter_state(model)  # A: the protocol
        up.update({EVAL_PREFIX + k: v for k, v in self.lora_state(model, a=False).items()})
        if self.cfg.method.train_head:
            up.update({EVAL_PREFIX + k: v for k, v in head_state(model, self.adapter_param_marker).items()})
        return up

    # ------------------------------------------------------------------ client side
    def client_load(self, model: nn.Module, state: Tensors, info: ClientInfo, local: Tensors) -> None:
        self.load_global(model, state)
        for name, layer in self.layers(model).items():
            own = local.get(b_key(name))
            self.set_B(layer, own if own is not None else torch.zeros_like(layer.lora_B["default"].weight), name)
        if self.cfg.method.train_head:
            own_head = {k: v for k, v in local.items() if k.startswith(HEAD_PREFIX)}
            load_head(model, own_head or getattr(model, "florg_initial_head", {}))

    def client_upload(self, model: nn.Module, info: ClientInfo, local: Tensors) -> Tensors:
        local.update(self.lora_state(model, a=False))
        if self.cfg.method.train_head:
            local.update(head_state(model, self.adapter_param_marker))
        return self.upload(model)

    # ------------------------------------------------------------------ server side
    def expected_upload(self, current: Tensors) -> dict[str, tuple[int, ...]]:
        """``A`` and the evaluation-only ``eval/`` copies of ``B`` and the head (shaped like the server's
        ``B_bar`` and ``head_bar``)."""
        expected = super().expected_upload(current)
        expected.update({EVAL_PREFIX + k[len(SERVER_PREFIX):]: tuple(v.shape) for k, v in current.items()
                         if k.startswith(SERVER_PREFIX) and (k.endswith(B_SUFFIX) or k.startswith(_SERVER_HEAD))})
        return expected

    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        """``A_bar`` (the protocol), then the constructed global model's ``B_bar`` and ``head_bar`` (server-only)."""
        new, metrics = super().aggregate_adapter(uploads, weights, current)
        for key in [k for k in current if k.startswith(_SERVER_HEAD)]:
            heads = [u.get(EVAL_PREFIX + key[len(SERVER_PREFIX):]) for u in uploads]
            if all(h is not None for h in heads):
                new[key] = weighted_mean(heads, weights)
        return new, metrics

    def aggregate_layer(self, layer: LayerRound, current: Tensors, new: Tensors) -> dict[str, float]:
        name, s, p = layer.name, layer.s, layer.p
        new[a_key(name)] = layer.a_mean
        b_n = layer.collect(EVAL_PREFIX + b_key(name))
        if b_n is None:
            return {}  # no evaluation copies of B: the named global model keeps the previous B_bar
        b_bar = weighted_mean(b_n, p)
        new[SERVER_PREFIX + b_key(name)] = b_bar
        prev_b = current.get(SERVER_PREFIX + b_key(name))
        return layer_errors(
            target=layer.clients(b=b_n),
            sent=Factored.product(b_bar, layer.a_mean, s),
            previous=None if prev_b is None else Factored.product(prev_b, current[a_key(name)], s),
        )

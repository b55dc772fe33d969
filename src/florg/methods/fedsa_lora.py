"""FedSA-LoRA (Guo et al., ICLR 2025): ``A`` shared and averaged, ``B`` kept local on each client.

Client shape: PEFT LoRA, both factors trained, ``A0`` seeded, ``B0 = 0``.
Upload and download (the protocol): ``A`` (``r x d_in``) per adapted layer.
Server rule: ``A = sum_n p_n A_n``; ``B_n`` never enters the protocol. Each client's ``B_n`` lives in
its own persistent state (Flower's ``Context.state``, passed to :meth:`client_load` /
:meth:`client_upload` as ``local``), never in the process-level model, which simulated clients
share. A client's first round starts from ``B = 0``.

Two accuracies are reported:

* **global** (``test_accuracy``): the named global model ``W0 + s B_bar A_bar`` with
  ``B_bar = sum_n p_n B_n`` over the round's participants (same weights as ``A``). To form it
  the server needs the ``B_n``: clients send them under ``eval/`` keys, counted as
  ``bytes_up_eval`` and not as protocol traffic (``bytes_up``); ``B_bar`` stays on the server
  (``server/`` keys) and is never sent down. This model is not exact (like FedIT's).
* **personalised** (``personal_accuracy``): after each round's aggregation every client evaluates
  ``W0 + s B_n A_bar`` (its own ``B_n``, the new ``A_bar`` and the global head) on a fixed,
  seeded subset of the global test split, with each class weighted by the client's own training
  label share (label-skew partitions only move label proportions, so this is the client's
  expected accuracy on its own distribution), and the server takes the example-weighted mean over
  clients (see :func:`florg.train.label_weighted_accuracy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from florg.config import need, option

from .base import EVAL_PREFIX, SERVER_PREFIX, ClientInfo, Tensors, weighted_mean
from .lora_common import B_SUFFIX, Factored, LayerRound, LoRAMethod, a_key, b_key, layer_errors


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
    options_class = FedSALoRAOptions
    arrays_per_layer = (1, 1)

    @classmethod
    def wire_numel(cls, d_out: int, d_in: int, rank: int, client_rank: int | None = None) -> tuple[int, int]:
        return rank * d_in, rank * d_in  # A both ways; B stays on the client

    @property
    def client_eval_examples(self) -> int:
        return int(self.options.personal_eval_examples)

    def adapter_state(self, model: nn.Module) -> Tensors:
        return self.lora_state(model, b=False)

    def initial_global(self, model: nn.Module) -> Tensors:
        state = super().initial_global(model)
        state.update({SERVER_PREFIX + k: v for k, v in self.lora_state(model, a=False).items()})
        return state

    def upload(self, model: nn.Module) -> Tensors:
        up = super().upload(model)  # A (+ head): the protocol
        up.update({EVAL_PREFIX + k: v for k, v in self.lora_state(model, a=False).items()})
        return up

    # ------------------------------------------------------------------ client side
    def client_load(self, model: nn.Module, state: Tensors, info: ClientInfo, local: Tensors) -> None:
        self.load_global(model, state)
        for name, layer in self.layers(model).items():
            own = local.get(b_key(name))
            self.set_B(layer, own if own is not None else torch.zeros_like(layer.lora_B["default"].weight), name)

    def client_upload(self, model: nn.Module, info: ClientInfo, local: Tensors) -> Tensors:
        local.update(self.lora_state(model, a=False))
        return self.upload(model)

    # ------------------------------------------------------------------ server side
    def expected_upload(self, current: Tensors) -> dict[str, tuple[int, ...]]:
        """``A`` (+ head) and the evaluation-only ``eval/`` copies of ``B`` (shaped like the server's ``B_bar``)."""
        expected = super().expected_upload(current)
        expected.update({EVAL_PREFIX + k[len(SERVER_PREFIX):]: tuple(v.shape) for k, v in current.items()
                         if k.startswith(SERVER_PREFIX) and k.endswith(B_SUFFIX)})
        return expected

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

"""FedEx-LoRA (Singhal et al., ACL 2025): FedAvg of ``A`` and ``B`` plus the exact residual folded into W0.

Client shape: PEFT LoRA, both factors trained, ``A0`` seeded, ``B0 = 0``; the base weight is
``W0 = W0_pretrained + C`` with ``C`` from the message.
Upload: ``A`` (``r x d_in``) and ``B`` (``d_out x r``) per adapted layer.
Server rule: ``A = sum_n p_n A_n``, ``B = sum_n p_n B_n`` and the residual
``R = sum_n p_n s B_n A_n - s B A`` (``d_out x d_in``, computed in float64), folded into the base
weight: ``C <- C + R``. The new global model ``W0_pretrained + C + s B A`` equals the weighted
mean of the client models exactly.
Download: ``A``, ``B`` and the dense ``d_out x d_in`` matrix ``<layer>.w0_delta``.

Stateless clients: simulated clients share one cached model per process, so instead of each
client accumulating the residuals into its own W0, the message carries the *cumulative*
correction ``C_t`` (the sum of all residuals so far) and every client sets
``W0 = W0_pretrained + C_t``. It has the shape, and so the byte count, of the round's residual
that FedEx-LoRA broadcasts (in round 1 it is all zeros). ``C`` is kept in the ``B @ A``
orientation and added to the weight without a transpose for ``nn.Linear`` (transposed only for
``fan_in_fan_out``/``Conv1D`` layers), avoiding the reference GLUE code's orientation bug.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import Tensors, head_state
from .lora_common import LayerRound, LoRAMethod, a_key, b_key, w0_key
from .lora_math import Factored, layer_errors


class FedExLoRAMethod(LoRAMethod):
    name = "fedex-lora"
    display_name = "FedEx-LoRA"
    modifies_base = True
    arrays_per_layer = (2, 3)

    @property
    def peft_problem(self) -> str | None:
        return ("its server sends every client a correction of the base weights W0 (the residual of averaging A and "
                "B separately), which the client must add to each adapted layer's frozen weight")

    def wire_numel(self, d_out: int, d_in: int, rank: int, client_rank: int | None = None,
                   round_ranks: Sequence[int] | None = None) -> tuple[int, int]:
        return rank * (d_out + d_in), rank * (d_out + d_in) + d_out * d_in  # A, B up; A, B and the dense residual down

    def adapter_state(self, model: nn.Module) -> Tensors:
        state = self.lora_state(model)
        for name, layer in self.layers(model).items():
            state[w0_key(name)] = self.base_delta(layer).to(layer.lora_A["default"].weight.dtype)
        return state

    def upload(self, model: nn.Module) -> Tensors:
        up = self.lora_state(model)  # A and B only: the correction C never goes up
        if self.cfg.method.train_head:
            up.update(head_state(model, self.adapter_param_marker))
        return up

    def aggregate_layer(self, layer: LayerRound, current: Tensors, new: Tensors) -> dict[str, float]:
        name, s = layer.name, layer.s
        a_bar, b_bar = layer.a_mean, layer.b_mean
        c = current[w0_key(name)]
        clients = layer.clients()  # sum_n p_n s B_n A_n
        residual = (clients - Factored.product(b_bar, a_bar, s)).dense()
        c_new = (c.to(torch.float64) + residual).to(c.dtype)
        new[a_key(name)], new[b_key(name)], new[w0_key(name)] = a_bar, b_bar, c_new
        return layer_errors(
            target=Factored.of_dense(c) + clients,
            sent=Factored.of_dense(c_new) + Factored.product(b_bar, a_bar, s),
            previous=Factored.of_dense(c) + Factored.product(current[b_key(name)], current[a_key(name)], s),
        )

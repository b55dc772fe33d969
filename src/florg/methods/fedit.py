"""FedIT (Zhang et al., ICASSP 2024): LoRA with plain FedAvg of ``A`` and of ``B`` separately.

Client shape: PEFT LoRA (``W = W0 + s B A``), both factors trained, ``A0`` seeded, ``B0 = 0``.
Upload and download: ``A`` (``r x d_in``) and ``B`` (``d_out x r``) per adapted layer.
Server rule: ``A = sum_n p_n A_n``, ``B = sum_n p_n B_n``. Not exact: the new global update
``s B A`` misses ``sum_n p_n s B_n A_n`` by exactly ``s/2 sum_ij p_i p_j (B_i - B_j)(A_i - A_j)``.
Every client's factors enter the mean (the FLoRA repository's FedIT branch averages only the
first client's, a variable mix-up; a test guards against it).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .base import Tensors
from .lora_common import LayerRound, LoRAMethod, a_key, b_key
from .lora_math import Factored, layer_errors


class FedITMethod(LoRAMethod):
    name = "fedit"
    display_name = "FedIT"

    def wire_numel(self, d_out: int, d_in: int, rank: int, client_rank: int | None = None,
                   round_ranks: Sequence[int] | None = None) -> tuple[int, int]:
        return rank * (d_out + d_in), rank * (d_out + d_in)  # A and B both ways

    def adapter_state(self, model: nn.Module) -> Tensors:
        return self.lora_state(model)

    def aggregate_layer(self, layer: LayerRound, current: Tensors, new: Tensors) -> dict[str, float]:
        name, s = layer.name, layer.s
        new[a_key(name)], new[b_key(name)] = layer.a_mean, layer.b_mean
        return layer_errors(
            target=layer.clients(),
            sent=Factored.product(layer.b_mean, layer.a_mean, s),
            previous=Factored.product(current[b_key(name)], current[a_key(name)], s),
        )

"""FedIT (Zhang et al., ICASSP 2024): LoRA with plain FedAvg of ``A`` and of ``B`` separately.

Client shape: PEFT LoRA (``W = W0 + s B A``), both factors trained, ``A0`` seeded, ``B0 = 0``.
Upload and download: ``A`` (``r x d_in``) and ``B`` (``d_out x r``) per adapted layer.
Server rule: ``A = sum_n p_n A_n``, ``B = sum_n p_n B_n``. Not exact: the new global update
``s B A`` misses ``sum_n p_n s B_n A_n`` by exactly ``s/2 sum_ij p_i p_j (B_i - B_j)(A_i - A_j)``.
Every client's factors enter the mean (the FLoRA repository's FedIT branch averages only the
first client's, a variable mix-up; a test guards against it).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Tensors, normalised_weights, weighted_mean
from .lora_common import (
    A_SUFFIX,
    Factored,
    LoRAMethod,
    a_key,
    b_key,
    layer_errors,
    layer_names,
    summarise_errors,
    weighted_products,
)


class FedITMethod(LoRAMethod):
    name = "fedit"
    display_name = "FedIT"

    def adapter_state(self, model: nn.Module) -> Tensors:
        return self.lora_state(model)

    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        p = normalised_weights(weights, len(uploads))
        s = self.scale
        new: Tensors = {}
        diags = []
        for name in layer_names(current, A_SUFFIX):
            a_n = [u[a_key(name)] for u in uploads]
            b_n = [u[b_key(name)] for u in uploads]
            a_bar, b_bar = weighted_mean(a_n, p), weighted_mean(b_n, p)
            new[a_key(name)], new[b_key(name)] = a_bar, b_bar
            diags.append(layer_errors(
                target=weighted_products(b_n, a_n, [s * w for w in p]),
                sent=Factored.product(b_bar, a_bar, s),
                previous=Factored.product(current[b_key(name)], current[a_key(name)], s),
            ))
        return new, summarise_errors(diags)

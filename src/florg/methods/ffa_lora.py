"""FFA-LoRA (Sun et al., ICLR 2024): ``A`` frozen at a shared seeded init, only ``B`` trained and averaged.

Client shape: PEFT LoRA with ``lora_A`` frozen (``requires_grad = False``) at PEFT's default
init drawn from the run seed and the layer name (:func:`florg.methods.lora_common.seeded_lora_A`),
so every client and the server hold the byte-identical ``A`` without sending it; ``B0 = 0``.
Upload and download: ``B`` (``d_out x r``) per adapted layer; ``A`` never crosses the wire.
Server rule: ``B = sum_n p_n B_n``. Exact within the frozen-``A`` family:
``s B A = sum_n p_n s B_n A``. The server keeps ``A`` under ``server/`` keys (for its own
evaluation model and the diagnostics); they are never sent.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import SERVER_PREFIX, Tensors, normalised_weights, weighted_mean
from .lora_common import (
    B_SUFFIX,
    Factored,
    LoRAMethod,
    a_key,
    b_key,
    layer_errors,
    layer_names,
    summarise_errors,
    weighted_products,
)


class FFALoRAMethod(LoRAMethod):
    name = "ffa-lora"
    display_name = "FFA-LoRA"
    train_A = False

    def adapter_state(self, model: nn.Module) -> Tensors:
        return self.lora_state(model, a=False)

    def initial_global(self, model: nn.Module) -> Tensors:
        state = super().initial_global(model)
        state.update({SERVER_PREFIX + k: v for k, v in self.lora_state(model, b=False).items()})
        return state

    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        p = normalised_weights(weights, len(uploads))
        s = self.scale
        new: Tensors = {k: v for k, v in current.items() if k.startswith(SERVER_PREFIX)}
        diags = []
        for name in layer_names(current, B_SUFFIX):
            b_n = [u[b_key(name)] for u in uploads]
            b_bar = weighted_mean(b_n, p)
            new[b_key(name)] = b_bar
            a = current.get(SERVER_PREFIX + a_key(name))
            if a is not None:
                diags.append(layer_errors(
                    target=weighted_products(b_n, [a] * len(b_n), [s * w for w in p]),
                    sent=Factored.product(b_bar, a, s),
                    previous=Factored.product(current[b_key(name)], a, s),
                ))
        return new, summarise_errors(diags)

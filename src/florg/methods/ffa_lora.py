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

from collections.abc import Sequence

from torch import nn

from .base import SERVER_PREFIX, Tensors
from .lora_common import LayerRound, LoRAMethod, a_key, b_key
from .lora_math import Factored, layer_errors


class FFALoRAMethod(LoRAMethod):
    name = "ffa-lora"
    display_name = "FFA-LoRA"
    train_A = False
    arrays_per_layer = (1, 1)
    peft_factors = ("lora_B",)  # A: frozen at the same seeded init on every client
    #: only B trains: its best lr lay at 1.25e-2 or above on both tasks of the first study (docs/results/study)
    recommended = {"train.lr": 1.25e-2, "train.head_lr": 1.25e-2}

    def wire_numel(self, d_out: int, d_in: int, rank: int, client_rank: int | None = None,
                   round_ranks: Sequence[int] | None = None) -> tuple[int, int]:
        return rank * d_out, rank * d_out  # B both ways; A never crosses the wire

    def adapter_state(self, model: nn.Module) -> Tensors:
        return self.lora_state(model, a=False)

    def initial_global(self, model: nn.Module) -> Tensors:
        state = super().initial_global(model)
        state.update({SERVER_PREFIX + k: v for k, v in self.lora_state(model, b=False).items()})
        return state

    def aggregate_layer(self, layer: LayerRound, current: Tensors, new: Tensors) -> dict[str, float]:
        name, s = layer.name, layer.s
        new[b_key(name)] = layer.b_mean
        a = current.get(SERVER_PREFIX + a_key(name))
        if a is None:
            return {}
        return layer_errors(
            target=layer.clients(a=[a] * len(layer.b)),
            sent=Factored.product(layer.b_mean, a, s),
            previous=Factored.product(current[b_key(name)], a, s),
        )

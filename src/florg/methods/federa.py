"""FeDeRA (Yan et al., 2024): SVD-of-W0 initialisation, then FedAvg of ``A`` and ``B``.

Client shape: PEFT LoRA initialised with PEFT's ``init_lora_weights="pissa"``: the top-r SVD
``W0 = U S V^T`` gives ``B0 = U_r (S_r/s)^(1/2)`` and ``A0 = (S_r/s)^(1/2) V_r^T``, and the
principal part is subtracted, ``W_res = W0 - s B0 A0``, so the initial model is exactly the
pretrained one (a choice: the FeDeRA paper does not say whether it subtracts). ``W_res`` is
computed by every process from the same pretrained weights with the same deterministic dense SVD;
only the sign-invariant product ``U_r S_r V_r^T`` enters it, so nothing extra crosses the wire
(the init factors themselves arrive in round 1's download, counted like every download).
Upload and download: ``A`` (``r x d_in``) and ``B`` (``d_out x r``) per adapted layer.

Server rule (``method.federa.mode``):

* ``"fedavg"`` (default; the FeDeRA paper's own rule): ``A = sum_n p_n A_n``, ``B = sum_n p_n B_n``,
  as FedIT. Not exact.
* ``"product_svd"`` (the compare row ``federa-svd``, "FeDeRA init + FlexLoRA SVD": FlexLoRA's
  server rule on this initialisation, the "aggregate the product, then decompose" reading of the
  FLoRG paper): form ``P = sum_n p_n s B_n A_n`` exactly as ``X Y`` with ``X = [B_1, ..., B_N]``
  and ``Y = [s p_1 A_1; ...; s p_N A_N]``, take its SVD
  (:func:`florg.methods.lora_common.product_svd`: thin QRs of the stacked factors and an SVD of
  the ``Nr x Nr`` core when ``Nr < min(d_out, d_in)``, otherwise a dense SVD) and re-split the
  top r: ``B = U_r (S_r/s)^(1/2)``, ``A = (S_r/s)^(1/2) V_r^T``. Exact only when
  ``rank(P) <= r``; the tail is dropped (``sent_rel_error``). Singular vectors keep the SVD's own
  signs and rotations, with no alignment between rounds: this is the decomposition drift FLoRG's
  Procrustes step removes.

The server keeps the init factors under ``server/`` keys (never sent) to report the errors of the
update relative to the pretrained weight, ``s B A - s B0 A0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from florg.options import option

from .base import SERVER_PREFIX, Tensors, Variant
from .lora_common import LayerRound, LoRAMethod, a_key, b_key
from .lora_math import Factored, layer_errors, product_svd

INIT_A = ".init_A"
INIT_B = ".init_B"


#: the modes' names before the published rule became the default
_RENAMED = {"init_only_fedavg": "fedavg"}


@dataclass
class FeDeRAOptions:
    """``method.federa.*``."""

    mode: str = option("fedavg", "FeDeRA server rule: 'fedavg' (the paper's: FedAvg of A and B) or 'product_svd' "
                                 "(aggregate sum p_n s B_n A_n exactly, re-split by a rank-r SVD: FlexLoRA's rule).",
                       choices=("fedavg", "product_svd"), renamed=_RENAMED, strategy_keyword="federa_mode")


class FeDeRAMethod(LoRAMethod):
    name = "federa"
    display_name = "FeDeRA"
    init_lora_weights = "pissa"
    modifies_base = True  # W0 -> W_res once, at build
    options_class = FeDeRAOptions
    variants = {"federa-svd": Variant("FeDeRA init + FlexLoRA SVD", {"mode": "product_svd"})}

    def wire_numel(self, d_out: int, d_in: int, rank: int, client_rank: int | None = None,
                   round_ranks: Sequence[int] | None = None) -> tuple[int, int]:
        return rank * (d_out + d_in), rank * (d_out + d_in)  # A and B both ways

    def adapter_state(self, model: nn.Module) -> Tensors:
        return self.lora_state(model)

    def initial_global(self, model: nn.Module) -> Tensors:
        state = super().initial_global(model)
        for name, layer in self.layers(model).items():
            state[SERVER_PREFIX + name + INIT_A] = self.get_A(layer)
            state[SERVER_PREFIX + name + INIT_B] = self.get_B(layer)
        return state

    def aggregate_layer(self, layer: LayerRound, current: Tensors, new: Tensors) -> dict[str, float]:
        name, s, p, r = layer.name, layer.s, layer.p, int(self.cfg.method.rank)
        a_n, b_n = layer.a, layer.b
        dtype = a_n[0].dtype
        a0, b0 = current.get(SERVER_PREFIX + name + INIT_A), current.get(SERVER_PREFIX + name + INIT_B)
        shape = (int(b_n[0].shape[0]), int(a_n[0].shape[1]))
        principal = Factored.product(b0, a0, s) if a0 is not None else Factored(shape)
        exact = None
        if self.options.mode == "product_svd":
            x = torch.cat([b.to(torch.float64) for b in b_n], dim=1)
            y = torch.cat([a.to(torch.float64) * (s * w) for a, w in zip(a_n, p)], dim=0)
            u, sig, v = product_svd(x, y, max(int(x.shape[1]), r))
            exact = Factored.product(u * sig, v.T) - principal  # all singular triplets: P itself
            root = (sig[:r] / s).clamp_min(0.0).sqrt()
            b_new = (u[:, :r] * root).to(dtype)
            a_new = (root[:, None] * v[:, :r].T).to(dtype)
        else:  # "fedavg"
            a_new, b_new = layer.a_mean, layer.b_mean
        new[a_key(name)], new[b_key(name)] = a_new, b_new
        return layer_errors(
            target=layer.clients() - principal,
            sent=Factored.product(b_new, a_new, s) - principal,
            previous=Factored.product(current[b_key(name)], current[a_key(name)], s) - principal,
            exact=exact,
        )

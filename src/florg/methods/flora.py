"""FLoRA (Wang et al., NeurIPS 2024): stacking of heterogeneous-rank LoRAs, merged into W0 every round.

Client shape: every round a *fresh* PEFT LoRA of the client's own rank ``r_k``
(``method.client_ranks[partition_id % len]``, or ``method.rank`` when that list is empty) with
scale ``s_k = alpha / r_k``, ``A`` drawn from ``(seed, layer, round, partition)`` with PEFT's
default init and ``B = 0``, on top of ``W0 = W0_pretrained + C`` (``C`` from the message).
The shared model is built at ``r_max = max(ranks)``; a client of rank ``r_k < r_max`` zeroes the
extra rows of ``A`` and columns of ``B``, which then get exactly zero gradient and stay zero.
Upload: ``A_k`` (``r_k x d_in``) and ``B_k`` (``d_out x r_k``) per adapted layer.
Server rule (stacking): ``A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K]``,
``B_stack = [B_1, ..., B_K]``, so ``B_stack A_stack = sum_k p_k s_k B_k A_k`` for any mix of
ranks (each client's own scale included: the stacking-scale pitfall), merged into the base:
``C <- C + B_stack A_stack``. Exact: the new global model equals the weighted mean of the client
models. The global state is ``C`` alone (plus the head).
Download: the dense ``d_out x d_in`` matrix ``<layer>.w0_delta`` = ``C_t``.

Stateless clients: simulated clients share one cached model per process, so instead of the
protocol's downlink of the last round's stacked pair (``(d_in + d_out) sum_j r_j`` numbers) that
each client merges into its own W0, the message carries the cumulative ``C_t`` and every client
sets ``W0 = W0_pretrained + C_t``. This costs ``d_out d_in`` per layer per client per round,
measured and reported as such; it is cheaper than the stacked pair only when
``(d_in + d_out) sum_j r_j > d_out d_in``, and, unlike the stacked pair, correct under partial
participation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .base import HEAD_PREFIX, ClientInfo, Tensors, check_tensors, head_state
from .lora_common import (
    A_SUFFIX,
    W0_SUFFIX,
    Factored,
    LayerRound,
    LoRAMethod,
    a_key,
    b_key,
    layer_errors,
    layer_names,
    seeded_lora_A,
    w0_key,
    weighted_products,
)

if TYPE_CHECKING:
    from florg.config import RunConfig


def stack_uploads(
    a_n: Sequence[torch.Tensor], b_n: Sequence[torch.Tensor], p: Sequence[float], alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking with each client's scale: ``(A_stack, B_stack)`` in float64.

    ``A_stack`` rows are ``p_k s_k A_k`` with ``s_k = alpha / r_k``, ``B_stack`` columns ``B_k``;
    ``B_stack @ A_stack = sum_k p_k s_k B_k A_k``.
    """
    a_stack = torch.cat([a.to(torch.float64) * (w * alpha / a.shape[0]) for a, w in zip(a_n, p)], dim=0)
    b_stack = torch.cat([b.to(torch.float64) for b in b_n], dim=1)
    return a_stack, b_stack


class FLoRAMethod(LoRAMethod):
    name = "flora"
    display_name = "FLoRA"
    modifies_base = True
    supports_client_ranks = True
    arrays_per_layer = (2, 1)

    @classmethod
    def wire_numel(cls, d_out: int, d_in: int, rank: int, client_rank: int | None = None) -> tuple[int, int]:
        # A_k, B_k of the client's own rank up; the cumulative dense correction C_t down (see the module doc)
        return (client_rank or rank) * (d_out + d_in), d_out * d_in

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)
        from florg.config import ConfigError

        if not cfg.train.reset_optimizer:
            raise ConfigError(
                "config key 'train.reset_optimizer': FLoRA starts a fresh LoRA every round, so optimizer state "
                "carried across rounds would belong to discarded parameters; set train.reset_optimizer=true"
            )

    def client_rank(self, partition_id: int) -> int:
        ranks = list(self.cfg.method.client_ranks)
        return int(ranks[partition_id % len(ranks)]) if ranks else int(self.cfg.method.rank)

    def build_rank(self) -> int:
        return max([int(r) for r in self.cfg.method.client_ranks] or [int(self.cfg.method.rank)])

    # ------------------------------------------------------------------ state
    def adapter_state(self, model: nn.Module) -> Tensors:
        return {w0_key(name): self.base_delta(layer).to(layer.lora_A["default"].weight.dtype)
                for name, layer in self.layers(model).items()}

    def load_adapter_state(self, model: nn.Module, state: Tensors) -> None:
        super().load_adapter_state(model, state)
        for name, layer in self.layers(model).items():  # the global model is W0 + C alone
            self.set_B(layer, torch.zeros_like(layer.lora_B["default"].weight), name)

    # ------------------------------------------------------------------ client side
    def client_load(self, model: nn.Module, state: Tensors, info: ClientInfo, local: Tensors) -> None:
        self.load_global(model, state)
        self.fresh_lora(model, info)

    def fresh_lora(self, model: nn.Module, info: ClientInfo) -> None:
        """Start this client's new LoRA of rank ``r_k`` (seeded ``A``, ``B = 0``, scale ``alpha / r_k``)."""
        r_k = self.client_rank(info.partition_id)
        for name, layer in self.layers(model).items():
            a_param = layer.lora_A["default"].weight
            a = torch.zeros_like(a_param)
            a[:r_k] = seeded_lora_A(r_k, a.shape[1], seed=self.cfg.seed, dtype=a.dtype,
                                    tag=f"{name}#flora/{info.server_round}/{info.partition_id}")
            self.set_A(layer, a, name)
            self.set_B(layer, torch.zeros_like(layer.lora_B["default"].weight), name)
            layer.scaling["default"] = float(self.cfg.method.alpha) / r_k
            layer.florg_active_rank = r_k

    def upload(self, model: nn.Module) -> Tensors:
        up: Tensors = {}
        for name, layer in self.layers(model).items():
            r_k = int(getattr(layer, "florg_active_rank", layer.r["default"]))
            up[a_key(name)] = self.get_A(layer)[:r_k].contiguous()
            up[b_key(name)] = self.get_B(layer)[:, :r_k].contiguous()
        if self.cfg.method.train_head:
            up.update(head_state(model, self.adapter_param_marker))
        return up

    # ------------------------------------------------------------------ server side
    def check_upload(self, upload: Tensors, current: Tensors, max_norm: float = 0.0) -> list[str]:
        """Like the default, with the client's rank read from its ``A`` (one of the configured ranks)."""
        allowed = sorted({int(r) for r in self.cfg.method.client_ranks} or {int(self.cfg.method.rank)})
        names = layer_names(current, W0_SUFFIX)
        first = upload.get(a_key(names[0])) if names else None
        r_k = int(first.shape[0]) if first is not None and first.ndim == 2 else allowed[0]
        problems = [] if r_k in allowed else [f"client rank {r_k} is not one of the configured ranks {allowed}"]
        expected = {k: tuple(v.shape) for k, v in current.items() if k.startswith(HEAD_PREFIX)}
        for name in names:
            d_out, d_in = current[w0_key(name)].shape
            expected[a_key(name)] = (r_k, int(d_in))
            expected[b_key(name)] = (int(d_out), r_k)
        return problems + check_tensors(upload, expected, max_norm)

    def aggregate_layer(self, layer: LayerRound, current: Tensors, new: Tensors) -> dict[str, float]:
        name, alpha = layer.name, float(self.cfg.method.alpha)
        a_n, b_n = layer.a, layer.b
        c = current[w0_key(name)]
        a_stack, b_stack = stack_uploads(a_n, b_n, layer.p, alpha)
        c_new = (c.to(torch.float64) + b_stack @ a_stack).to(c.dtype)
        new[w0_key(name)] = c_new
        clients = weighted_products(b_n, a_n, [w * alpha / a.shape[0] for a, w in zip(a_n, layer.p)])
        return layer_errors(target=Factored.of_dense(c) + clients, sent=Factored.of_dense(c_new),
                            previous=Factored.of_dense(c))

    def round_metrics(self, uploads: list[Tensors]) -> dict[str, float]:
        """``stacked_rank``: sum_k r_k of this round (the rank added to W0)."""
        first = next(k for k in uploads[0] if k.endswith(A_SUFFIX))
        return {"stacked_rank": float(sum(int(u[first].shape[0]) for u in uploads))}

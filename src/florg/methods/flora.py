"""FLoRA (Wang et al., NeurIPS 2024): stacking of heterogeneous-rank LoRAs, merged into W0 every round.

Client shape: every round a *fresh* PEFT LoRA of the client's own rank ``r_k``
(``method.client_ranks[partition_id % len]``, or ``method.rank`` when that list is empty) with
scale ``s_k = alpha / r_k``, ``A`` drawn from ``(seed, layer, round, partition)`` with PEFT's
default init and ``B = 0``, on top of ``W0 = W0_pretrained + C`` (``C``: the client's cumulative
correction). The shared model is built at ``r_max = max(ranks)``; a client of rank ``r_k < r_max``
zeroes the extra rows of ``A`` and columns of ``B``, which then get exactly zero gradient and stay
zero. Upload: ``A_k`` (``r_k x d_in``) and ``B_k`` (``d_out x r_k``) per adapted layer.
Server rule (stacking): ``A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K]``,
``B_stack = [B_1, ..., B_K]``, so ``B_stack A_stack = sum_k p_k s_k B_k A_k`` for any mix of
ranks (each client's own scale included: the stacking-scale pitfall), merged into the base:
``C <- C + B_stack A_stack``. Exact: the new global model equals the weighted mean of the client
models.

Downlink (``method.flora.downlink``):

* ``"stacked"`` (default; FLoRA's own protocol): the last round's stacked pair ``<layer>.stack_A``
  (``sum_j r_j x d_in``, rows already scaled by ``p_j s_j``) and ``<layer>.stack_B``
  (``d_out x sum_j r_j``), ``(d_in + d_out) sum_j r_j`` numbers per layer (empty in round 1),
  plus one number per message, ``stack/round``: how many aggregations the server has merged (the
  pair is the ``stack/round``-th). Every client keeps its own cumulative ``C`` in its persistent
  state (``Context.state``) and merges each pair exactly once, with the same float64 product and
  float32 result as the server, so client and server hold the same ``C``. The server keeps ``C``
  under ``server/`` keys (never sent) for its own evaluation. A client that missed a pair cannot
  rebuild ``C`` and fails with an error that says so: partial participation
  (``federation.fraction_train < 1``) and a 16-bit wire dtype are refused up front, and so is
  ``florg run --resume`` (which does not restore client state); use the dense downlink there.
* ``"dense"`` (the compare row ``flora-dense``, "FLoRA (dense downlink)"): the cumulative ``C_t``
  itself, ``<layer>.w0_delta`` (``d_out d_in`` numbers per layer), so clients stay stateless and any
  client can join any round (partial participation, resume). Cheaper than the stacked pair only
  when ``(d_in + d_out) sum_j r_j > d_out d_in``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from florg.options import ConfigError, option

from .base import HEAD_PREFIX, SERVER_PREFIX, ClientInfo, Tensors, Variant, check_tensors, head_state
from .lora_common import A_SUFFIX, W0_SUFFIX, LayerRound, LoRAMethod, a_key, b_key, seeded_lora_A, w0_key
from .lora_math import Factored, layer_errors, weighted_products

if TYPE_CHECKING:
    from florg.config import RunConfig

STACK_A = ".stack_A"
STACK_B = ".stack_B"
#: the number of aggregations merged so far (the downlink's pair is the ``stack/round``-th), per message
STACK_ROUND = "stack/round"
#: a client's own count of merged pairs (in its persistent state)
_MERGED = "flora/merged"


@dataclass
class FLoRAOptions:
    """``method.flora.*``."""

    downlink: str = option("stacked", "What clients receive: 'stacked' (FLoRA's protocol: last round's stacked pair, "
                                      "merged into each client's own W0 correction) or 'dense' (the cumulative "
                                      "d_out x d_in correction; stateless clients, partial participation allowed).",
                           choices=("stacked", "dense"))


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


def merge_pair(c: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    """``C + B_stack A_stack`` in float64, cast to ``C``'s dtype: the one merge rule of server and clients."""
    return (c.to(torch.float64) + b_stack.to(torch.float64) @ a_stack.to(torch.float64)).to(c.dtype)


class FLoRAMethod(LoRAMethod):
    name = "flora"
    display_name = "FLoRA"
    modifies_base = True
    supports_client_ranks = True
    options_class = FLoRAOptions
    variants = {
        "flora-dense": Variant("FLoRA (dense downlink)", {"downlink": "dense"}),
        "flora-hetero": Variant("FLoRA, ranks 2/4/8", shared={"client_ranks": [2, 4, 8]}, ablation=True),
    }

    @property
    def stacked(self) -> bool:
        return self.options.downlink == "stacked"

    @property
    def peft_problem(self) -> str | None:
        return ("its server stacks the clients' factors into a rank sum_n r_n update that every client merges into its "
                "base weights W0 and then re-initialises its own adapter (per-client state)")

    @property
    def arrays_per_layer(self) -> tuple[int, int]:  # type: ignore[override]
        return (2, 2) if self.stacked else (2, 1)

    def wire_numel(self, d_out: int, d_in: int, rank: int, client_rank: int | None = None,
                   round_ranks: Sequence[int] | None = None) -> tuple[int, int]:
        up = (client_rank or rank) * (d_out + d_in)  # A_k, B_k of the client's own rank
        if self.stacked:  # the previous round's stacked pair (nothing in round 1)
            return up, (d_out + d_in) * sum(int(r) for r in (round_ranks or ()))
        return up, d_out * d_in  # the cumulative dense correction C_t

    @property
    def resume_problem(self) -> str | None:
        if not self.stacked:
            return None
        return ("with the stacked downlink every client keeps its own W0 correction, which a resumed run does not "
                "restore; start the run again, or use method.flora.downlink='dense' (stateless clients)")

    def wire_extra_numel(self) -> tuple[int, int]:
        return (0, 1) if self.stacked else (0, 0)  # stack/round

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)

        if not cfg.train.reset_optimizer:
            raise ConfigError(
                "config key 'train.reset_optimizer': FLoRA starts a fresh LoRA every round, so optimizer state "
                "carried across rounds would belong to discarded parameters; set train.reset_optimizer=true"
            )
        if cfg.method.flora.downlink == "stacked":
            if cfg.federation.fraction_train < 1.0:
                raise ConfigError(
                    f"config key 'federation.fraction_train': FLoRA's stacked downlink "
                    f"(method.flora.downlink='stacked') needs every client in every round (each merges every "
                    f"round's stacked pair into its own W0), got {cfg.federation.fraction_train}; set "
                    "federation.fraction_train=1.0 or method.flora.downlink='dense' (stateless clients)"
                )
            if cfg.federation.wire_dtype != "float32":
                raise ConfigError(
                    f"config key 'federation.wire_dtype': FLoRA's stacked downlink keeps a W0 correction on every "
                    f"client that must equal the server's, which a {cfg.federation.wire_dtype} wire rounds apart; "
                    "set federation.wire_dtype='float32' or method.flora.downlink='dense'"
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

    def initial_global(self, model: nn.Module) -> Tensors:
        if not self.stacked:
            return super().initial_global(model)
        state: Tensors = {}
        for name, layer in self.layers(model).items():
            dtype = layer.lora_A["default"].weight.dtype
            state[SERVER_PREFIX + w0_key(name)] = self.base_delta(layer).to(dtype)
            state[name + STACK_A] = torch.zeros(0, layer.in_features, dtype=dtype)
            state[name + STACK_B] = torch.zeros(layer.out_features, 0, dtype=dtype)
        state[STACK_ROUND] = torch.zeros(1, dtype=torch.int32)
        if self.cfg.method.train_head:
            state.update(head_state(model, self.adapter_param_marker))
        return state

    def load_adapter_state(self, model: nn.Module, state: Tensors) -> None:
        """Apply the correction ``C`` (``w0_delta``, also under ``server/``); the stacked pair is the clients' to merge."""
        super().load_adapter_state(model, {k: v for k, v in state.items()
                                           if not k.endswith((STACK_A, STACK_B)) and k != STACK_ROUND})
        for name, layer in self.layers(model).items():  # the global model is W0 + C alone
            self.set_B(layer, torch.zeros_like(layer.lora_B["default"].weight), name)

    # ------------------------------------------------------------------ client side
    def client_load(self, model: nn.Module, state: Tensors, info: ClientInfo, local: Tensors) -> None:
        self.load_global(model, state)
        if self.stacked:
            self._merge_downlink(model, state, info, local)
        self.fresh_lora(model, info)

    def _merge_downlink(self, model: nn.Module, state: Tensors, info: ClientInfo, local: Tensors) -> None:
        """Merge the received stacked pair into this client's own ``C`` (once), then ``W0 = W0_pretrained + C``."""
        pair = int(state[STACK_ROUND].reshape(-1)[0])
        merged = int(local[_MERGED].reshape(-1)[0]) if _MERGED in local else 0
        if pair not in (merged, merged + 1):
            raise ValueError(
                f"FLoRA client {info.partition_id} (round {info.server_round}) has merged {merged} stacked pairs but "
                f"the server sends pair {pair}: it missed a round's downlink (a failed reply, partial participation, "
                "or a resumed run, which does not restore client state), so it cannot rebuild its W0 correction; "
                "use method.flora.downlink='dense' (stateless clients)"
            )
        for name, layer in self.layers(model).items():
            c = local.get(w0_key(name))
            if c is None:
                c = torch.zeros(layer.out_features, layer.in_features, dtype=layer.lora_A["default"].weight.dtype)
            if pair == merged + 1:
                c = merge_pair(c, state[name + STACK_A], state[name + STACK_B])
                local[w0_key(name)] = c
            self.set_base_delta(layer, c, name)
        local[_MERGED] = torch.tensor([pair], dtype=torch.int32)

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
    @staticmethod
    def _c_key(current: Tensors, name: str) -> str:
        """Where the state keeps layer ``name``'s correction ``C`` (``server/`` with the stacked downlink)."""
        key = w0_key(name)
        return key if key in current else SERVER_PREFIX + key

    @staticmethod
    def _layer_names(current: Tensors) -> list[str]:
        plain = [k[len(SERVER_PREFIX):] if k.startswith(SERVER_PREFIX) else k for k in current]
        return [k[: -len(W0_SUFFIX)] for k in plain if k.endswith(W0_SUFFIX)]

    def layer_rounds(self, uploads: list[Tensors], current: Tensors, p: list[float]) -> Iterator[LayerRound]:
        for name in self._layer_names(current):
            yield LayerRound(name, p, self.scale, uploads)

    def check_upload(self, upload: Tensors, current: Tensors, max_norm: float = 0.0) -> list[str]:
        """Like the default, with the client's rank read from its ``A`` (one of the configured ranks)."""
        allowed = sorted({int(r) for r in self.cfg.method.client_ranks} or {int(self.cfg.method.rank)})
        names = self._layer_names(current)
        first = upload.get(a_key(names[0])) if names else None
        r_k = int(first.shape[0]) if first is not None and first.ndim == 2 else allowed[0]
        problems = [] if r_k in allowed else [f"client rank {r_k} is not one of the configured ranks {allowed}"]
        expected = {k: tuple(v.shape) for k, v in current.items() if k.startswith(HEAD_PREFIX)}
        for name in names:
            d_out, d_in = current[self._c_key(current, name)].shape
            expected[a_key(name)] = (r_k, int(d_in))
            expected[b_key(name)] = (int(d_out), r_k)
        return problems + check_tensors(upload, expected, max_norm)

    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        new, metrics = super().aggregate_adapter(uploads, weights, current)
        if self.stacked:
            new[STACK_ROUND] = current[STACK_ROUND] + 1
        return new, metrics

    def aggregate_layer(self, layer: LayerRound, current: Tensors, new: Tensors) -> dict[str, float]:
        name, alpha = layer.name, float(self.cfg.method.alpha)
        a_n, b_n = layer.a, layer.b
        c_key = self._c_key(current, name)
        c = current[c_key]
        a_stack, b_stack = stack_uploads(a_n, b_n, layer.p, alpha)
        if self.stacked:  # merge exactly what the clients receive (the pair in C's dtype)
            a_stack, b_stack = a_stack.to(c.dtype), b_stack.to(c.dtype)
            new[name + STACK_A], new[name + STACK_B] = a_stack, b_stack
        c_new = merge_pair(c, a_stack, b_stack)
        new[c_key] = c_new
        clients = weighted_products(b_n, a_n, [w * alpha / a.shape[0] for a, w in zip(a_n, layer.p)])
        return layer_errors(target=Factored.of_dense(c) + clients, sent=Factored.of_dense(c_new),
                            previous=Factored.of_dense(c))

    def round_metrics(self, uploads: list[Tensors]) -> dict[str, float]:
        """``stacked_rank``: sum_k r_k of this round (the rank added to W0)."""
        first = next(k for k in uploads[0] if k.endswith(A_SUFFIX))
        return {"stacked_rank": float(sum(int(u[first].shape[0]) for u in uploads))}

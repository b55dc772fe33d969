"""FLoRG: one trainable ``A (r x k)`` per layer, exact Gram aggregation, Procrustes alignment.

Client shape: the FLoRG PEFT adapter (``florg.adapters``), ``dW = s L A^T A R`` with fixed bases
regenerated from the run seed. Upload and download: ``A`` per adapted layer (r*k numbers).
Server rule: :func:`florg.core.aggregate_model` -- ``Q = sum p_n A_n^T A_n`` (thin path when
``sum r_n < k``), rank-r factor, Procrustes-aligned to the previous global ``A`` (in round 1 the
random ``A0``, unless ``method.florg.align_initial = false``).

Clients of different ranks (``method.client_ranks``, beyond the paper): ``Q`` is ``k x k`` whatever
each client's rank, so the aggregate stays exact. The global factor has ``r_max = max(ranks)``
rows, aligned block by block at the distinct ranks (:func:`florg.core.aggregate`, ``blocks``), so
that its leading ``r_n`` rows are the aligned top-``r_n`` eigen-factor of ``Q``; client ``n``
receives exactly those rows (``r_n k`` numbers) and uploads its ``r_n x k`` factor. All clients
share one scale ``s = alpha / r_max`` (exactness needs one ``s``: ``sum p_n s L A_n^T A_n R = s L Q
R``). The shared model is built at ``r_max``; a client of rank ``r_n`` zero-pads its rows, which
get exactly zero gradient (``grad_A = s A (H + H^T)``) and stay zero.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from florg.core import AggregationResult, aggregate_model
from florg.core import privacy as dp
from florg.core.consensus import consensus_stats, errors_against_mean, spread_factors
from florg.options import ConfigError, need, option

from .base import (
    HEAD_PREFIX,
    SERVER_PREFIX,
    ClientInfo,
    FederatedMethod,
    Tensors,
    Variant,
    check_tensors,
    normalised_weights,
    split_head,
    summarise_layers,
)

if TYPE_CHECKING:
    from florg.config import RunConfig

A_PREFIX = "A/"
#: the key suffix of a FLoRG factor in a PEFT state dict (``get_peft_model_state_dict``)
PEFT_A_SUFFIX = ".florg_A"
#: marks the initial global state (server-only; present until the first aggregation) when round 1
#: must not align to the random A0 (``method.florg.align_initial = false``)
INITIAL_KEY = "server/florg.initial"


@dataclass
class FLoRGOptions:
    """``method.florg.*``: FLoRG's own choices where the paper is silent (docs/methods.md)."""

    procrustes: str = option("paper", "Procrustes alignment: 'paper' (keep all r' eigenpairs), 'top-r', or 'none' (ablation).",
                             choices=("paper", "top-r", "none"), strategy_keyword="procrustes", server_only=True)
    align_initial: bool = option(True, "Align round 1's factor to the random initial A0 (true, the paper's rule read "
                                       "literally); false: round 1 sends the unaligned top eigen-factor and alignment "
                                       "starts in round 2.", strategy_keyword="align_initial", server_only=True)
    init_scale: float = option(0.01, "A0 = init_scale * N(0, 1) from the seed (A must start non-zero).")
    compensate_init: bool = option(False, "Subtract the initial delta from W0 so training starts exactly at the "
                                          "pretrained model.")
    eig_rtol: float = option(1e-12, "Eigenvalues below eig_rtol * largest are treated as round-off.",
                             strategy_keyword="eig_rtol", server_only=True)
    client_spread: float = option(1.0, "gamma: the weight of the clients' spread around their mean factor in Q = "
                                       "Abar^T Abar + gamma sum_n p_n (A_n - Abar)^T (A_n - Abar). 1 = the paper's Q = "
                                       "sum_n p_n A_n^T A_n (the exact mean of the clients' updates, where disagreeing "
                                       "moves add up); 0 = the Gram matrix of the mean factor (they cancel, as in "
                                       "FedAvg). Beyond the paper (docs/results/study-v2, the mechanism).", server_only=True)
    consensus_diagnostics: bool = option(False, "Measure every round how the clients agree: client_cosine, "
                                                "consensus_norm, spread_norm, spread_ratio (florg.core.consensus) "
                                                "in metrics.jsonl.", server_only=True)
    bases: str = option("per-layer", "Bases L, R: 'per-layer' (drawn per layer, as in the paper) or 'per-shape' "
                                     "(memory-lean: one pair per layer shape, held once; docs/gpu.md).",
                        choices=("per-layer", "per-shape"))

    def check(self, prefix: str) -> None:
        need(self.init_scale > 0, f"{prefix}.init_scale", "must be > 0 (A = 0 never trains)")
        need(0 < self.eig_rtol < 1, f"{prefix}.eig_rtol", "must be in (0, 1)")
        need(0.0 <= self.client_spread <= 1.0, f"{prefix}.client_spread", f"must be in [0, 1] (1 = the paper's Q), "
                                                                         f"got {self.client_spread}")


class FLoRGMethod(FederatedMethod):
    name = "florg"
    display_name = "FLoRG"
    adapter_param_marker = "florg_A"
    supports_privacy = True
    supports_client_ranks = True
    options_class = FLoRGOptions
    #: the adapter at train.lr (5e-3), the head at 1.25e-2: chosen on validation (docs/results/mechanism)
    recommended = {"train.head_lr": 1.25e-2}
    variants = {
        "florg-noalign": Variant("FLoRG w/o alignment", {"procrustes": "none"}, ablation=True),
        "florg-hetero": Variant("FLoRG, ranks 2/4/8", shared={"client_ranks": [2, 4, 8]}, ablation=True),
    }
    arrays_per_layer = (1, 1)

    def wire_numel(self, d_out: int, d_in: int, rank: int, client_rank: int | None = None,
                   round_ranks: Sequence[int] | None = None) -> tuple[int, int]:
        k = min(d_out, d_in)
        r = client_rank or rank
        return r * k, r * k  # A (r_n x k) both ways

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)

        o = cfg.method.options(self.name)
        if o.client_spread != 1.0 and (cfg.method.client_ranks or cfg.privacy.mode != "off"):
            raise ConfigError(
                f"config key 'method.florg.client_spread': {o.client_spread} needs one rank for every client and "
                "privacy.mode=off (the spread is taken around the mean factor); set it to 1.0"
            )
        if cfg.privacy.mode != "off":
            if cfg.method.client_ranks:
                raise ConfigError(
                    "config key 'method.client_ranks': FLoRG's differential privacy is calibrated for one rank "
                    f"(method.rank); heterogeneous ranks {list(cfg.method.client_ranks)} with privacy.mode="
                    f"{cfg.privacy.mode!r} are not supported; set method.client_ranks=[] or privacy.mode=off"
                )
            dp.check_accounting_available()

    # ---- ranks: one for every client (method.rank), or method.client_ranks ---------------
    def client_rank(self, partition_id: int) -> int:
        ranks = list(self.cfg.method.client_ranks)
        return int(ranks[partition_id % len(ranks)]) if ranks else int(self.cfg.method.rank)

    def build_rank(self) -> int:
        """Rows of the global factor: ``max(method.client_ranks)``, or ``method.rank``."""
        return max([int(r) for r in self.cfg.method.client_ranks] or [int(self.cfg.method.rank)])

    def _blocks(self) -> list[int] | None:
        ranks = sorted({int(r) for r in self.cfg.method.client_ranks})
        return ranks if len(ranks) > 1 else None

    @property
    def per_client_downlink(self) -> bool:
        return bool(self.cfg.method.client_ranks)

    def client_downlink(self, wire: Tensors, partition_id: int) -> Tensors:
        """The leading ``r_n`` rows of every layer's factor (the aligned top-``r_n`` eigen-factor), and the head."""
        r_n = self.client_rank(partition_id)
        return {k: v[:r_n].contiguous() if k.startswith(A_PREFIX) else v for k, v in wire.items()}

    def build(self, model: nn.Module, target_modules: list[str], head_modules: list[str]) -> nn.Module:
        from peft import get_peft_model  # lazy: peft (seconds); load_config imports the method registry

        # lazy: florg.adapters imports peft (seconds); load_config imports the method registry
        from florg.adapters import FLoRGConfig

        m, o = self.cfg.method, self.options
        config = FLoRGConfig(
            r=self.build_rank(),
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=list(target_modules),
            modules_to_save=list(head_modules) if m.train_head else None,
            seed=self.cfg.seed,
            init_scale=o.init_scale,
            compensate_init=o.compensate_init,
            bases=o.bases,
        )
        return get_peft_model(model, config)

    def adapter_state(self, model: nn.Module) -> Tensors:
        # lazy: florg.adapters imports peft (seconds); load_config imports the method registry
        from florg.adapters import florg_layers

        return {A_PREFIX + name: layer.florg_A["default"].detach().clone() for name, layer in florg_layers(model).items()}

    def initial_global(self, model: nn.Module) -> Tensors:
        state = super().initial_global(model)
        state.update(self.initial_server_state())
        return state

    def initial_server_state(self) -> Tensors:
        return {} if self.options.align_initial else {INITIAL_KEY: torch.ones(1)}

    def peft_keymap(self, state: Tensors) -> dict[str, str]:
        """``<layer>.florg_A`` -> ``A/<layer>`` (Gram + Procrustes); every other entry (``modules_to_save``,
        heads) -> ``head/<key>`` (weighted FedAvg)."""
        factors = {k: v for k, v in state.items() if k.endswith(PEFT_A_SUFFIX)}
        if not factors:
            shown = ", ".join(repr(k) for k in list(state)[:3]) or "nothing"
            lora = any(".lora_A" in k or ".lora_B" in k for k in state)
            raise ValueError(
                f"FLoRG: the arrays are not a FLoRG PEFT state dict: {len(state)} arrays ({shown}"
                f"{', ...' if len(state) > 3 else ''}), none ending in '{PEFT_A_SUFFIX}'"
                + (" (lora_A/lora_B: a LoRA adapter)" if lora else "")
                + ". Build the model with peft.get_peft_model(model, florg.FLoRGConfig(r=..., target_modules=[...])) "
                "and send ArrayRecord(peft.get_peft_model_state_dict(model))"
            )
        if self.cfg.method.client_ranks:
            raise ValueError("FLoRG: clients of different ranks (method.client_ranks) need florg's own ClientApp "
                             "(each client gets its own rows); use one rank with a ClientApp of your own")
        rank = self.build_rank()
        for key, value in factors.items():
            if value.ndim != 2 or int(value.shape[0]) != rank:
                raise ValueError(
                    f"FLoRG: '{key}' has shape {tuple(value.shape)}, the strategy's rank is {rank} (a factor is "
                    f"rank x k): give the strategy rank={int(value.shape[0]) if value.ndim == 2 else '...'} or "
                    f"build the model with florg.FLoRGConfig(r={rank})"
                )
        return {k: A_PREFIX + k[: -len(PEFT_A_SUFFIX)] if k in factors else HEAD_PREFIX + k for k in state}

    def load_adapter_state(self, model: nn.Module, state: Tensors) -> None:
        # lazy: florg.adapters imports peft (seconds); load_config imports the method registry
        from florg.adapters import florg_layers

        layers = florg_layers(model)
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith(SERVER_PREFIX):
                    continue  # bookkeeping (INITIAL_KEY)
                name = key[len(A_PREFIX):]
                if not key.startswith(A_PREFIX) or name not in layers:
                    raise KeyError(f"'{key}' is not an adapted layer of this model")
                param = layers[name].florg_A["default"]
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"layer '{name}': global A has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))

    # ---- clients of different ranks ---------------------------------------------------
    def client_load(self, model: nn.Module, state: Tensors, info: ClientInfo, local: Tensors) -> None:
        """Apply the downlink; with ``method.client_ranks`` the client's ``r_n`` rows, zero-padded to ``r_max``."""
        if self.cfg.method.client_ranks:
            r_n, r_max = self.client_rank(info.partition_id), self.build_rank()
            padded = {}
            for key, value in state.items():
                if key.startswith(A_PREFIX):
                    full = torch.zeros(r_max, value.shape[1], dtype=value.dtype)
                    full[: min(r_n, value.shape[0])] = value[:r_n]
                    value = full
                padded[key] = value
            state = padded
        self.load_global(model, state)

    def client_upload(self, model: nn.Module, info: ClientInfo, local: Tensors) -> Tensors:
        up = self.upload(model)
        if self.cfg.method.client_ranks:
            r_n = self.client_rank(info.partition_id)
            up = {k: v[:r_n].contiguous() if k.startswith(A_PREFIX) else v for k, v in up.items()}
        return up

    def check_upload(self, upload: Tensors, current: Tensors, max_norm: float = 0.0) -> list[str]:
        """The default check; with ``method.client_ranks`` each factor has as many rows as the client's rank
        (read from the upload: one of the configured ranks, the same for every layer)."""
        if not self.cfg.method.client_ranks:
            return super().check_upload(upload, current, max_norm)
        allowed = sorted({int(r) for r in self.cfg.method.client_ranks})
        names = [k for k in current if k.startswith(A_PREFIX)]
        first = upload.get(names[0]) if names else None
        r_n = int(first.shape[0]) if first is not None and first.ndim == 2 else allowed[0]
        problems = [] if r_n in allowed else [f"client rank {r_n} is not one of the configured ranks {allowed}"]
        expected = {k: ((r_n, int(v.shape[1])) if k.startswith(A_PREFIX) else tuple(v.shape))
                    for k, v in current.items() if not k.startswith(SERVER_PREFIX)}
        return problems + check_tensors(upload, expected, max_norm)

    def save_artifacts(self, model: nn.Module, run_path: Path) -> None:
        """``adapter/`` (FLoRG PEFT format) and ``adapter_lora/`` (the same adapter as a plain LoRA)."""
        # lazy: florg.adapters imports peft (seconds); load_config imports the method registry
        from florg.adapters import save_as_lora

        super().save_artifacts(model, run_path)
        save_as_lora(model, str(Path(run_path) / "adapter_lora"))

    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        keys = [key for key in current if not key.startswith(SERVER_PREFIX)]
        per_layer = {key: [u[key] for u in uploads] for key in keys}
        previous = self._reference(current)
        pv = self.cfg.privacy
        if pv.mode == "local" and pv.debias:
            # Local DP: remove the noise's expected Gram contribution sum_n p_n r_n (sigma C)^2 I.
            p = normalised_weights(weights, len(uploads))
            ranks = [int(u[keys[0]].shape[0]) for u in uploads]
            shift = dp.noise_bias(ranks, p, pv.noise_multiplier * pv.clip_norm)
            results = dp.dp_aggregate_layers(per_layer, p, previous=previous, rank=self.cfg.method.rank, shift=shift,
                                             **self._align_kw())
            return {key: res.factor for key, res in results.items()}, {**_summary(results.values()),
                                                                       "dp_debias_shift": shift}
        o = self.options
        extra: dict[str, Any] = {}
        if o.consensus_diagnostics and previous:
            p = normalised_weights(weights, len(uploads))
            stats = [consensus_stats(per_layer[key], p, previous[key]) for key in keys if key in previous]
            extra = {f"{name}_mean": sum(s[name] for s in stats) / len(stats) for name in stats[0]} if stats else {}
        if o.client_spread != 1.0:  # Q_gamma = Abar^T Abar + gamma S, on the same thin path (florg.core.consensus)
            p = normalised_weights(weights, len(uploads))
            dtype = uploads[0][keys[0]].dtype
            clients = per_layer
            spread = {key: spread_factors([f.double() for f in per_layer[key]], p, o.client_spread) for key in keys}
            weights = spread[keys[0]][1]
            per_layer = {key: pair[0] for key, pair in spread.items()}
            results = aggregate_model(per_layer, weights, previous={k: v.double() for k, v in previous.items()},
                                      rank=self.build_rank(), blocks=self._blocks(), **self._align_kw())
            for key, res in results.items():  # the errors stay those against the exact mean of the clients' updates
                res.diagnostics.update(errors_against_mean(res.factor, clients[key], p, previous.get(key)))
            new_state = {key: res.factor.to(dtype) for key, res in results.items()}
            return new_state, {**_summary(results.values()), **extra}
        results = aggregate_model(per_layer, weights, previous=previous, rank=self.build_rank(),
                                  blocks=self._blocks(), **self._align_kw())
        new_state = {key: res.factor for key, res in results.items()}
        return new_state, {**_summary(results.values()), **extra}

    def _reference(self, current: Tensors) -> Tensors:
        """The factors to align to: last round's global ``A`` (none in round 1 without ``align_initial``)."""
        if INITIAL_KEY in current and not self.options.align_initial:
            return {}
        return {key: value for key, value in current.items() if not key.startswith(SERVER_PREFIX)}

    def _align_kw(self) -> dict[str, Any]:
        o = self.options
        return {"variant": "top-r" if o.procrustes == "top-r" else "paper", "align": o.procrustes != "none",
                "eig_rtol": o.eig_rtol}

    # ---- differential privacy (docs/privacy.md; the math is in florg.core.privacy) ----------

    def _head_clip_norm(self) -> float:
        pv = self.cfg.privacy
        return pv.head_clip_norm or pv.clip_norm

    def privatize_upload(self, upload: Tensors, received: Tensors, generator: torch.Generator) -> Tensors:
        """Local DP at the client: clip all factors jointly to C and add N(0, (sigma C)^2) to every entry;
        the head goes up as ``h_global + clip(h - h_global, C_head) + N(0, (sigma C_head)^2)``."""
        pv = self.cfg.privacy
        adapter, head = split_head(upload)
        unknown = [key for key in adapter if not key.startswith(A_PREFIX)]
        if unknown:
            raise ValueError(f"local DP: cannot privatise upload keys {unknown}")
        clipped, _ = dp.clip_joint(adapter, pv.clip_norm)
        out = dp.add_gaussian(clipped, pv.noise_multiplier * pv.clip_norm, generator)
        if head:
            c_head = self._head_clip_norm()
            delta = {k: v.double() - received[k].double() for k, v in head.items()}
            clipped_head, _ = dp.clip_joint(delta, c_head)
            noisy = dp.add_gaussian(clipped_head, pv.noise_multiplier * c_head, generator)
            out.update({k: (received[k].double() + noisy[k]).to(head[k].dtype) for k in head})
        return out

    def aggregate_private(
        self, uploads: list[Tensors], current: Tensors, *, denominator: int, generator: torch.Generator
    ) -> tuple[Tensors, dict[str, Any]]:
        """Central DP at the server: clip each client's factors jointly to C, ``Q_l = (1/m) sum_n A_nl^T A_nl``
        plus symmetric noise of scale ``sigma C^2 / m`` (m = ``denominator``, the number of clients
        sampled), then factor and align as usual; the head moves by the mean clipped update plus
        ``N(0, (sigma C_head / m)^2)``."""
        pv, m = self.cfg.privacy, self.cfg.method
        if not uploads or denominator < len(uploads):
            raise ValueError(f"central DP: {len(uploads)} uploads for a denominator of {denominator}")
        cur_adapter, cur_head = split_head(current)
        clipped, norms, head_updates = [], [], []
        c_head = self._head_clip_norm()
        for upload in uploads:
            adapter, head = split_head(upload)
            factors, norm = dp.clip_joint(adapter, pv.clip_norm)
            clipped.append(factors)
            norms.append(norm)
            if head:
                head_updates.append(dp.clip_joint({k: v.double() - cur_head[k].double() for k, v in head.items()}, c_head)[0])
        p = [1.0 / denominator] * len(uploads)
        std = dp.central_gram_std(pv.clip_norm, pv.noise_multiplier, denominator)
        previous = self._reference(cur_adapter)
        per_layer = {key: [c[key] for c in clipped] for key in cur_adapter if not key.startswith(SERVER_PREFIX)}
        results = dp.dp_aggregate_layers(per_layer, p, previous=previous, rank=m.rank, noise_std=std,
                                         generator=generator, **self._align_kw())
        new_state: Tensors = {key: res.factor for key, res in results.items()}
        if head_updates:
            mean = dp.noisy_mean(head_updates, denominator, pv.noise_multiplier * c_head / denominator, generator)
            new_state.update({k: (cur_head[k].double() + mean[k]).to(cur_head[k].dtype) for k in mean})
        metrics = _summary(results.values())
        metrics.update(dp_gram_noise_std=std, dp_upload_norm_mean=sum(norms) / len(norms),
                       dp_clipped_fraction=sum(n > pv.clip_norm for n in norms) / len(norms))
        return new_state, metrics


def _summary(results: Iterable[AggregationResult]) -> dict[str, float]:
    """Per-round summary of the per-layer results (:func:`summarise_layers` of diagnostics + ``rank_q``)."""
    return summarise_layers([{**r.diagnostics, "rank_q": r.rank_q} for r in results])

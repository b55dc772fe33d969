"""FLoRG: one trainable ``A (r x k)`` per layer, exact Gram aggregation, Procrustes alignment.

Client shape: the FLoRG PEFT adapter (``florg.adapters``), ``dW = s L A^T A R`` with fixed bases
regenerated from the run seed. Upload and download: ``A`` per adapted layer (r*k numbers).
Server rule: :func:`florg.core.aggregate_model` -- ``Q = sum p_n A_n^T A_n`` (thin path when
``sum r_n < k``), rank-r factor, Procrustes-aligned to the previous global ``A``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from florg.config import RunConfig, need, option
from florg.core import AggregationResult, aggregate_model
from florg.core import privacy as dp

from .base import FederatedMethod, Tensors, Variant, normalised_weights, split_head, summarise_layers

A_PREFIX = "A/"


@dataclass
class FLoRGOptions:
    """``method.florg.*``: FLoRG's own choices where the paper is silent (docs/methods.md)."""

    procrustes: str = option("paper", "Procrustes alignment: 'paper' (keep all r' eigenpairs), 'top-r', or 'none' (ablation).",
                             choices=("paper", "top-r", "none"))
    init_scale: float = option(0.01, "A0 = init_scale * N(0, 1) from the seed (A must start non-zero).")
    compensate_init: bool = option(False, "Subtract the initial delta from W0 so training starts exactly at the "
                                          "pretrained model.")
    eig_rtol: float = option(1e-12, "Eigenvalues below eig_rtol * largest are treated as round-off.")
    bases: str = option("per-layer", "Bases L, R: 'per-layer' (drawn per layer, as in the paper) or 'per-shape' "
                                     "(memory-lean: one pair per layer shape, held once; docs/gpu.md).",
                        choices=("per-layer", "per-shape"))

    def check(self, prefix: str) -> None:
        need(self.init_scale > 0, f"{prefix}.init_scale", "must be > 0 (A = 0 never trains)")
        need(0 < self.eig_rtol < 1, f"{prefix}.eig_rtol", "must be in (0, 1)")


class FLoRGMethod(FederatedMethod):
    name = "florg"
    display_name = "FLoRG"
    adapter_param_marker = "florg_A"
    supports_privacy = True
    options_class = FLoRGOptions
    variants = {"florg-noalign": Variant("FLoRG w/o alignment", {"procrustes": "none"}, ablation=True)}
    arrays_per_layer = (1, 1)

    @classmethod
    def wire_numel(cls, d_out: int, d_in: int, rank: int, client_rank: int | None = None) -> tuple[int, int]:
        k = min(d_out, d_in)
        return rank * k, rank * k  # A (r x k) both ways

    def check_config(self, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.privacy.mode != "off":
            dp.check_accounting_available()

    def build(self, model: nn.Module, target_modules: list[str], head_modules: list[str]) -> nn.Module:
        from peft import get_peft_model

        from florg.adapters import FLoRGConfig

        m, o = self.cfg.method, self.options
        config = FLoRGConfig(
            r=m.rank,
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
        from florg.adapters import florg_layers

        return {A_PREFIX + name: layer.florg_A["default"].detach().clone() for name, layer in florg_layers(model).items()}

    def load_adapter_state(self, model: nn.Module, state: Tensors) -> None:
        from florg.adapters import florg_layers

        layers = florg_layers(model)
        with torch.no_grad():
            for key, value in state.items():
                name = key[len(A_PREFIX):]
                if not key.startswith(A_PREFIX) or name not in layers:
                    raise KeyError(f"'{key}' is not an adapted layer of this model")
                param = layers[name].florg_A["default"]
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(f"layer '{name}': global A has shape {tuple(value.shape)}, "
                                     f"the model expects {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))

    def save_artifacts(self, model: nn.Module, run_path: Path) -> None:
        """``adapter/`` (FLoRG PEFT format) and ``adapter_lora/`` (the same adapter as a plain LoRA)."""
        from florg.adapters import save_as_lora

        super().save_artifacts(model, run_path)
        save_as_lora(model, str(Path(run_path) / "adapter_lora"))

    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        keys = list(current)
        per_layer = {key: [u[key] for u in uploads] for key in keys}
        pv = self.cfg.privacy
        if pv.mode == "local" and pv.debias:
            # Local DP: remove the noise's expected Gram contribution sum_n p_n r_n (sigma C)^2 I.
            p = normalised_weights(weights, len(uploads))
            ranks = [int(u[keys[0]].shape[0]) for u in uploads]
            shift = dp.noise_bias(ranks, p, pv.noise_multiplier * pv.clip_norm)
            results = dp.dp_aggregate_layers(per_layer, p, previous=current, rank=self.cfg.method.rank, shift=shift,
                                             **self._align_kw())
            return {key: res.factor for key, res in results.items()}, {**_summary(results.values()),
                                                                       "dp_debias_shift": shift}
        results = aggregate_model(per_layer, weights, previous=current, rank=self.cfg.method.rank, **self._align_kw())
        new_state = {key: res.factor for key, res in results.items()}
        return new_state, _summary(results.values())

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
        per_layer = {key: [c[key] for c in clipped] for key in cur_adapter}
        results = dp.dp_aggregate_layers(per_layer, p, previous=cur_adapter, rank=m.rank, noise_std=std,
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

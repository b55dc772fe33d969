"""FLoRG: one trainable ``A (r x k)`` per layer, exact Gram aggregation, Procrustes alignment.

Client shape: the FLoRG PEFT adapter (``florg.adapters``), ``dW = s L A^T A R`` with fixed bases
regenerated from the run seed. Upload and download: ``A`` per adapted layer (r*k numbers).
Server rule: :func:`florg.core.aggregate_model` -- ``Q = sum p_n A_n^T A_n`` (thin path when
``sum r_n < k``), rank-r factor, Procrustes-aligned to the previous global ``A``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from florg.core import aggregate_model

from .base import FederatedMethod, Tensors

A_PREFIX = "A/"


class FLoRGMethod(FederatedMethod):
    name = "florg"
    display_name = "FLoRG"
    adapter_param_marker = "florg_A"

    def build(self, model: nn.Module, target_modules: list[str], head_modules: list[str]) -> nn.Module:
        from peft import get_peft_model

        from florg.adapters import FLoRGConfig

        m = self.cfg.method
        config = FLoRGConfig(
            r=m.rank,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=list(target_modules),
            modules_to_save=list(head_modules) if m.train_head else None,
            seed=self.cfg.seed,
            init_scale=m.init_scale,
            compensate_init=m.compensate_init,
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
                    raise ValueError(f"layer '{name}': global A has shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))

    def save_artifacts(self, model: nn.Module, run_path: Path) -> None:
        """``adapter/`` (FLoRG PEFT format) and ``adapter_lora/`` (the same adapter as a plain LoRA)."""
        from florg.adapters import save_as_lora

        super().save_artifacts(model, run_path)
        save_as_lora(model, str(Path(run_path) / "adapter_lora"))

    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        m = self.cfg.method
        keys = list(current)
        per_layer = {key: [u[key] for u in uploads] for key in keys}
        results = aggregate_model(
            per_layer,
            weights,
            previous=current,
            rank=m.rank,
            variant="top-r" if m.procrustes == "top-r" else "paper",
            align=m.procrustes != "none",
            eig_rtol=m.eig_rtol,
        )
        new_state = {key: res.factor for key, res in results.items()}
        return new_state, summarise_diagnostics(results.values())


def summarise_diagnostics(results) -> dict[str, float]:
    """Per-round summary of the per-layer diagnostics (max of the errors, mean of the rest)."""
    results = list(results)
    out: dict[str, float] = {"rank_q_mean": sum(r.rank_q for r in results) / len(results)}
    names = sorted({k for r in results for k in r.diagnostics})
    for name in names:
        vals = [r.diagnostics[name] for r in results if name in r.diagnostics]
        if name.endswith("rel_error"):
            out[name + "_max"] = max(vals)
            out[name + "_mean"] = sum(vals) / len(vals)
        else:
            out[name + "_mean"] = sum(vals) / len(vals)
    return out

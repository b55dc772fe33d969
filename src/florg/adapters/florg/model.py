"""The FLoRG tuner (``BaseTuner``) and helpers to reach its layers by clean module name."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import FLoRGConfig
from .layer import FLoRGLayer, Linear, SharedBases, _adapter_dtype_for

__all__ = ["FLoRGModel", "florg_layers", "get_florg_factors", "set_florg_factors"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _under_tuner_layers(named_modules: list[tuple[str, nn.Module]]) -> set[str]:
    """Names of modules that live inside an existing tuner layer (not the layer itself)."""
    tuner_names = [name + "." for name, mod in named_modules if isinstance(mod, BaseTunerLayer)]
    return {name for name, _ in named_modules if any(name.startswith(p) for p in tuner_names)}


def _linear_leaf_names(named_modules: list[tuple[str, nn.Module]]) -> list[str]:
    seen: dict[str, None] = {}
    for name, mod in named_modules:
        if isinstance(mod, BaseTunerLayer):
            mod = mod.get_base_layer()
        if isinstance(mod, (nn.Linear, Conv1D)) and name:
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in ("base_layer", "original_module") and not leaf.startswith("florg_"):
                seen.setdefault(leaf, None)
    return list(seen)


class FLoRGModel(BaseTuner):
    """PEFT tuner that wraps the targeted ``nn.Linear`` / ``Conv1D`` layers with FLoRG layers.

    Created by ``peft.get_peft_model(model, FLoRGConfig(...))`` once :mod:`florg.adapters` has
    been imported (which registers the ``"FLORG"`` PEFT type). Layers are seeded with their
    module path in the wrapped model (e.g. ``bert.encoder.layer.0.attention.self.query``).

    With ``compensate_init=True`` the base weights are modified in place; :meth:`unload` adds
    the compensation back, while :meth:`merge_and_unload` keeps it (the merged weight is then
    ``W0 + s L (A^T A - A0^T A0) R``, the adapted function).
    """

    prefix: str = "florg_"
    tuner_layer_cls = FLoRGLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # ---------------------------------------------------------------- validation
    def _prepare_model(self, peft_config: FLoRGConfig, model: nn.Module) -> None:
        """Check target names, module types and ``r <= k`` before any layer is replaced."""
        named = list(model.named_modules())
        inside = _under_tuner_layers(named)
        candidates = [(n, m) for n, m in named if n and n not in inside]

        targets = peft_config.target_modules
        if isinstance(targets, (set, list, tuple)):
            keys = [n for n, _ in candidates]
            for target in sorted(targets):
                if not any(key == target or key.endswith("." + target) for key in keys):
                    leaves = _linear_leaf_names(named)
                    raise ValueError(
                        f"target module {target!r} not found; linear modules in this model: {', '.join(leaves)}"
                    )

        if targets == "all-linear":
            return  # PEFT expands it to the Linear/Conv1D layers afterwards
        for name, module in candidates:
            matched = check_target_module_exists(peft_config, name)
            if not matched or isinstance(matched, _ExcludedModule):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if isinstance(base, nn.Linear):
                d_in, d_out = base.in_features, base.out_features
            elif isinstance(base, Conv1D):
                d_in, d_out = base.weight.shape
            else:
                leaves = _linear_leaf_names(named)
                raise ValueError(
                    f"target module {name!r} is a {type(base).__name__}; FLoRG supports only torch.nn.Linear and "
                    f"transformers Conv1D. Linear modules in this model: {', '.join(leaves)}"
                )
            k = min(d_in, d_out)
            if peft_config.r > k:
                raise ValueError(
                    f"FLoRG rank r={peft_config.r} is too large for layer {name!r}: "
                    f"k = min(d_in={d_in}, d_out={d_out}) = {k}; r must satisfy 1 <= r <= k"
                )

    # ---------------------------------------------------------------- creation
    def _create_and_replace(
        self,
        peft_config: FLoRGConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("FLoRG needs the module path (current_key) to seed the layer's bases")
        shared = self._shared_bases() if peft_config.bases == "per-shape" else None
        if isinstance(target, FLoRGLayer):
            if shared is not None and target.__dict__.get("_florg_shared_bases") is None:
                target.__dict__["_florg_shared_bases"] = shared
            target.update_layer(adapter_name, peft_config)
            return
        new_module = self._create_new_module(peft_config, adapter_name, target, layer_name=current_key,
                                             shared_bases=shared)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _shared_bases(self) -> SharedBases:
        """The tuner's per-shape bases (created on first use; a submodule, so they move with the model)."""
        shared = self._modules.get("florg_shared_bases")
        if shared is None:
            shared = SharedBases()
            self.add_module("florg_shared_bases", shared)
        return shared

    @staticmethod
    def _create_new_module(
        peft_config: FLoRGConfig, adapter_name: str, target: nn.Module, layer_name: str,
        shared_bases: SharedBases | None = None,
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D):
            if not peft_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to False but the target module is `Conv1D`. "
                    "Setting fan_in_fan_out to True.",
                    stacklevel=3,
                )
                peft_config.fan_in_fan_out = True
        elif isinstance(base, nn.Linear):
            if peft_config.fan_in_fan_out:
                warnings.warn(
                    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                    "Setting fan_in_fan_out to False.",
                    stacklevel=3,
                )
                peft_config.fan_in_fan_out = False
        else:
            raise ValueError(
                f"target module {layer_name!r} of type {type(base).__name__} is not supported; FLoRG supports "
                "torch.nn.Linear and transformers.pytorch_utils.Conv1D"
            )
        return Linear(target, adapter_name, config=peft_config, layer_name=layer_name, shared_bases=shared_bases)

    # ---------------------------------------------------------------- dtype
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Set ``A``'s dtype; the bases ``L``/``R`` always stay in the base weight's dtype.

        With ``autocast_adapter_dtype`` (PEFT's default) ``A`` is kept in float32 for half-precision
        models, otherwise it takes the base weight's dtype.
        """
        for module in self.model.modules():
            if not isinstance(module, FLoRGLayer) or adapter_name not in module.florg_A:
                continue
            param = module.florg_A[adapter_name]
            if param.device.type == "meta":
                continue
            weight_dtype = module.get_base_layer().weight.dtype
            if autocast_adapter_dtype:
                target = torch.float32 if param.dtype in _LOW_PRECISION else param.dtype
            else:
                target = weight_dtype if weight_dtype.is_floating_point else _adapter_dtype_for(weight_dtype)
            if param.dtype != target:
                module.florg_A[adapter_name] = nn.Parameter(
                    param.detach().to(target), requires_grad=param.requires_grad
                )

    # ---------------------------------------------------------------- unloading
    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        # Compensation belongs to the adapter: keep it only for adapters that end up merged.
        for module in self.model.modules():
            if not isinstance(module, FLoRGLayer):
                continue
            kept = set(module.merged_adapters)
            if merge:
                kept |= set(adapter_names if adapter_names is not None else module.active_adapters)
            module.undo_compensation(keep=kept)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    # ---------------------------------------------------------------- convenience
    def florg_layers(self, adapter_name: str = "default") -> dict[str, FLoRGLayer]:
        """See :func:`florg_layers`."""
        return florg_layers(self.model, adapter_name)


def florg_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, FLoRGLayer]:
    """Map clean module names to the FLoRG layers carrying adapter ``adapter_name``.

    Works on a ``PeftModel``, on its ``FLoRGModel`` and on the (injected) inner model alike. The
    names are the module paths of the original model (e.g.
    ``bert.encoder.layer.0.attention.self.query``), identical to the names the bases were seeded
    with, so server and clients can key per-layer factors by them. Order: module order.
    """
    layers: dict[str, FLoRGLayer] = {}
    for module in model.modules():
        if isinstance(module, FLoRGLayer) and adapter_name in module.florg_A:
            if module.layer_name in layers and layers[module.layer_name] is not module:
                raise RuntimeError(f"two FLoRG layers share the module name {module.layer_name!r}")
            layers[module.layer_name] = module
    if not layers:
        raise ValueError(f"model has no FLoRG layers with adapter {adapter_name!r}")
    return layers


def get_florg_factors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Detached copies of every layer's ``A`` (``r x k``), keyed by clean module name."""
    return {name: layer.get_factor(adapter_name) for name, layer in florg_layers(model, adapter_name).items()}


def set_florg_factors(
    model: nn.Module, factors: dict[str, torch.Tensor], adapter_name: str = "default", strict: bool = True
) -> None:
    """Copy ``factors`` (clean module name -> ``A``) into the model's FLoRG layers in place.

    With ``strict`` the key sets must match exactly.
    """
    layers = florg_layers(model, adapter_name)
    if strict:
        missing = sorted(set(layers) - set(factors))
        unexpected = sorted(set(factors) - set(layers))
        if missing or unexpected:
            raise KeyError(f"factor names do not match the model's FLoRG layers: missing={missing}, "
                           f"unexpected={unexpected}")  # fmt: skip
    for name, value in factors.items():
        if name in layers:
            layers[name].set_factor(value, adapter_name)

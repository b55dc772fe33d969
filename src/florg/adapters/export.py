"""Exact export of a FLoRG adapter to a standard PEFT LoRA adapter (no SVD needed).

FLoRG's update ``ΔW = s · L Aᵀ A R`` is already a rank-r product ``(L Aᵀ)(A R)``, so it maps
onto PEFT LoRA's ``ΔW = (lora_alpha / r) · lora_B @ lora_A`` exactly:

* ``lora_B = s · L Aᵀ`` (``d_out x r``), ``lora_A = A R`` (``r x d_in``), ``lora_alpha = r``.

  The whole scale ``s`` is folded into ``lora_B`` and PEFT's own scaling is 1 (``lora_alpha = r``,
  no rsLoRA), so the checkpoint does not depend on how a consumer interprets ``lora_alpha``.

* If the base weights were compensated at creation (``compensate_init=True``, ``W0 ← W0 − s·L A0ᵀA0 R``),
  the LoRA must apply to the *original* pretrained weights and carry ``s·L (AᵀA − A0ᵀA0) R``,
  exported as a rank-2r LoRA: ``lora_B = s·[L Aᵀ | L A0ᵀ]``, ``lora_A = [A R; −A0 R]``
  (``lora_alpha = 2r``). ``A0`` is regenerated from the seed.

The factors are formed in float64 and only then cast to the export dtype (float32 by default).
LoRA's ``lora_A``/``lora_B`` layouts do not depend on ``fan_in_fan_out``, so ``Conv1D`` layers
need no transposition; the exported config sets ``fan_in_fan_out=True`` when all adapted layers
are ``Conv1D`` (PEFT fixes the flag per layer otherwise). ``modules_to_save`` (e.g. a
classification head) are copied into the export unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .florg.config import FLoRGConfig
from .florg.model import FLoRGModel, florg_layers

__all__ = ["export_lora", "save_as_lora"]

_PEFT_PREFIX = "base_model.model."


def _florg_config(model: nn.Module, adapter_name: str) -> FLoRGConfig:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or adapter_name not in configs:
        raise ValueError(f"model has no PEFT adapter named {adapter_name!r}")
    config = configs[adapter_name]
    if not isinstance(config, FLoRGConfig):
        raise ValueError(f"adapter {adapter_name!r} is a {type(config).__name__}, not a FLoRGConfig")
    return config


def _extra_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Non-FLoRG entries of the adapter checkpoint (``modules_to_save`` etc.), PeftModel key format."""
    target = model.model if isinstance(model, FLoRGModel) else model
    state = get_peft_model_state_dict(target, adapter_name=adapter_name)
    extra: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".florg_" in key:
            continue
        if not key.startswith(_PEFT_PREFIX):
            key = _PEFT_PREFIX + key
        extra[key] = value.detach().clone().contiguous()
    return extra


@torch.no_grad()
def export_lora(
    model: nn.Module, adapter_name: str = "default", dtype: torch.dtype = torch.float32
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Convert the FLoRG adapter ``adapter_name`` into an equivalent PEFT LoRA adapter.

    Args:
        model: a ``PeftModel`` with a FLoRG adapter (or its ``FLoRGModel`` / inner model).
        adapter_name: the adapter to export.
        dtype: dtype of the exported tensors (factors are computed in float64 first).

    Returns:
        ``(lora_config, state_dict)`` where the keys follow PEFT's checkpoint format, e.g.
        ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``; the pair
        is what ``PeftModel.from_pretrained`` reads from ``adapter_config.json`` and
        ``adapter_model.safetensors`` (see :func:`save_as_lora`). Rank ``r``, or ``2r`` when the
        base weights were compensated (see the module docstring).
    """
    config = _florg_config(model, adapter_name)
    layers = florg_layers(model, adapter_name)
    merged = [name for name, layer in layers.items() if adapter_name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}...; call unmerge_adapter() first")

    rank = config.r
    compensated = any(layer.florg_compensated.get(adapter_name, False) for layer in layers.values())
    export_rank = 2 * rank if compensated else rank

    state: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        s = layer.scaling[adapter_name]
        b_eff, a_eff = layer.lora_factors(adapter_name, dtype=torch.float64)  # (d_out, r), (r, d_in)
        lora_b, lora_a = s * b_eff, a_eff
        if compensated:
            if layer.florg_compensated.get(adapter_name, False):
                a0 = layer.initial_factor(adapter_name, dtype=torch.float64).to(b_eff.device)
                b0, a0_eff = layer.lora_factors(adapter_name, dtype=torch.float64, factor=a0)
            else:  # layer was not compensated (e.g. created on the meta device): zero padding
                b0, a0_eff = torch.zeros_like(b_eff), torch.zeros_like(a_eff)
            lora_b = torch.cat([lora_b, s * b0], dim=1)
            lora_a = torch.cat([lora_a, -a0_eff], dim=0)
        key = f"{_PEFT_PREFIX}{name}"
        state[f"{key}.lora_A.weight"] = lora_a.to(dtype).cpu().contiguous()
        state[f"{key}.lora_B.weight"] = lora_b.to(dtype).cpu().contiguous()

    for key, value in _extra_state(model, adapter_name).items():
        state[key] = value.cpu()

    all_conv1d = all(layer.is_conv1d for layer in layers.values())
    lora_config = LoraConfig(
        r=export_rank,
        lora_alpha=export_rank,
        lora_dropout=config.lora_dropout,
        target_modules=list(layers),
        fan_in_fan_out=all_conv1d,
        bias="none",
        use_rslora=False,
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )
    return lora_config, state


def save_as_lora(
    model: nn.Module,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the FLoRG adapter as a standard PEFT LoRA adapter directory.

    The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with
    plain ``peft`` (``PeftModel.from_pretrained(base_model, out_dir)``) without florg installed,
    on top of the *original* pretrained base model. Returns the directory path.
    """
    lora_config, state = export_lora(model, adapter_name=adapter_name, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lora_config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out

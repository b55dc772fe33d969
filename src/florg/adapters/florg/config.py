"""Configuration of the FLoRG tuner (a PEFT-style ``PeftConfig``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

__all__ = ["FLORG_PEFT_TYPE", "FLoRGConfig"]

#: The string PEFT type under which FLoRG is registered in PEFT's mappings. PEFT's ``PeftType``
#: is a ``str`` enum, so a plain string key behaves like an enum member in its dictionaries.
FLORG_PEFT_TYPE = "FLORG"


@dataclass
class FLoRGConfig(PeftConfig):
    """Configuration of a :class:`~florg.adapters.FLoRGModel`.

    Every targeted weight ``W0`` of shape ``(d_out, d_in)`` is adapted as
    ``W = W0 + s * L @ A.T @ A @ R`` with ``k = min(d_in, d_out)``, fixed bases ``L``
    (``d_out x k``, orthonormal columns) and ``R`` (``k x d_in``, orthonormal rows) generated
    from ``seed`` and the layer's module path, and the only trainable tensor ``A`` (``r x k``).

    The scale follows LoRA: ``s = lora_alpha / r`` (or ``lora_alpha / sqrt(r)`` with
    ``use_rslora``). The FLoRG paper's "scaling 16" at rank 4 corresponds to ``lora_alpha=16``,
    ``r=4``, i.e. ``s = 4`` (the defaults).

    Example::

        import florg.adapters  # registers the "FLORG" PEFT type
        from peft import get_peft_model

        config = FLoRGConfig(r=4, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
        model = get_peft_model(base_model, config)
    """

    r: int = field(
        default=4,
        metadata={
            "help": "FLoRG rank r: A has shape (r, k) with k = min(d_in, d_out) of each adapted layer. "
            "Must satisfy 1 <= r <= k for every targeted layer."
        },
    )
    lora_alpha: float = field(
        default=16,
        metadata={
            "help": "Scale numerator as in LoRA: the update is s * L A^T A R with s = lora_alpha / r "
            "(lora_alpha / sqrt(r) with use_rslora). The paper's 'scaling 16' at r = 4 is lora_alpha=16, "
            "i.e. s = 4."
        },
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout probability applied to the input of the adapter path, as in LoRA."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Use the rank-stabilised scale s = lora_alpha / sqrt(r) instead of lora_alpha / r."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (or suffixes of module paths) to adapt, e.g. ['query', 'value'], or a regex "
            "string matched against the full module path, or 'all-linear'. Only torch.nn.Linear and "
            "transformers' Conv1D are supported. If None, PEFT's LoRA defaults for the architecture are used."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (or suffixes, or a regex string) to exclude from adaptation."},
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Global seed for the fixed bases L, R and the initial factor A0. Every party of a federated "
            "run must use the same seed: the per-layer matrices are derived from (seed, module path)."
        },
    )
    bases: Literal["per-layer", "per-shape"] = field(
        default="per-layer",
        metadata={
            "help": "'per-layer': every adapted layer has its own bases L, R, drawn from (seed, module path). "
            "'per-shape' (memory-lean): one pair of bases per distinct layer shape, drawn from (seed, shape) and "
            "stored once for all layers of that shape (Llama-3.2-3B, q_proj and v_proj: 46 MiB in bfloat16 "
            "instead of 1.2 GiB). Any fixed orthonormal bases give FLoRG's exact aggregation; A0 stays per layer."
        },
    )
    init_scale: float = field(
        default=0.01,
        metadata={
            "help": "Standard deviation of the initial factor A0 = init_scale * N(0, 1). Must be > 0: A = 0 is a "
            "stationary point of FLoRG and would never train."
        },
    )
    compensate_init: bool = field(
        default=False,
        metadata={
            "help": "Subtract the initial update s * L A0^T A0 R from the base weights when the adapter is "
            "created, so that the adapted model starts exactly at the pretrained function. The compensation is "
            "regenerated from the seed (identically on every client and on PeftModel.from_pretrained). Note "
            "that the base weights then differ from the pretrained ones: disabling the adapter gives "
            "W0 - s L A0^T A0 R; use export_lora/save_as_lora to obtain an adapter for the original weights."
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={
            "help": "Set to True if the layer stores its weight as (fan_in, fan_out), like GPT-2's Conv1D. It is "
            "set automatically (with a warning) for transformers' Conv1D layers."
        },
    )
    bias: Literal["none"] = field(
        default="none",
        metadata={"help": "Bias handling. Only 'none' is supported: biases stay frozen and are not saved."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules apart from the FLoRG layers that are fully trained and saved with the adapter, e.g. "
            "the randomly initialised classification head ('classifier' / 'score')."
        },
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only adapt the layers with these indices (needs list-valued target_modules)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Name of the nn.ModuleList holding the layers indexed by layers_to_transform, e.g. 'layer' "
            "or 'h'. Only used together with layers_to_transform."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = FLORG_PEFT_TYPE

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"FLoRGConfig.r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"FLoRGConfig.lora_alpha must be a number, got {self.lora_alpha!r}")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"FLoRGConfig.lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"FLoRGConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"FLoRGConfig.seed must be an integer, got {self.seed!r}")
        if (
            isinstance(self.init_scale, bool)
            or not isinstance(self.init_scale, (int, float))
            or not math.isfinite(self.init_scale)
            or self.init_scale <= 0
        ):
            raise ValueError(f"FLoRGConfig.init_scale must be a finite number > 0, got {self.init_scale!r}")
        if self.bases not in ("per-layer", "per-shape"):
            raise ValueError(f"FLoRGConfig.bases must be 'per-layer' or 'per-shape', got {self.bases!r}")
        if self.bias != "none":
            raise ValueError(f"FLoRGConfig.bias must be 'none' (the only supported value), got {self.bias!r}")

        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, set) and not self.target_modules:
            raise ValueError("FLoRGConfig.target_modules must not be empty")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            else:
                self.modules_to_save = list(self.modules_to_save)

        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "FLoRGConfig.layers_to_transform cannot be used when target_modules is a regex string"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("FLoRGConfig.layers_pattern requires layers_to_transform to be set as well")

    @property
    def scaling(self) -> float:
        """The scale ``s`` multiplying ``L A^T A R``."""
        return scaling_for(self.lora_alpha, self.r, self.use_rslora)


def scaling_for(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA's scale rule: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` for rank-stabilised scaling."""
    return float(lora_alpha) / (math.sqrt(r) if use_rslora else r)

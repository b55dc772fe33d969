"""FLoRG tuner layers: ``W = W0 + s * L A^T A R`` with only ``A`` trainable.

The forward pass never routes activations through the ``k``-dimensional bases. Once per call
it forms the LoRA-shaped factors ``B_eff = L A^T`` (``d_out x r``) and ``A_eff = A R``
(``r x d_in``) and computes ``y = base(x) + s * (dropout(x) @ A_eff^T) @ B_eff^T``; autograd
reaches ``A`` through both factors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...core.bases import init_factor
from .config import FLoRGConfig, scaling_for
from .stored_bases import get_bases

__all__ = ["FLoRGLayer", "Linear", "SharedBases", "clean_module_name"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def clean_module_name(name: str) -> str:
    """Strip PEFT/torch wrapper segments from a module path.

    Removes the ``base_model.model.`` prefix of a ``PeftModel``, ``_orig_mod.`` segments of
    ``torch.compile`` and ``.base_layer`` segments of nested tuner layers, so that the result is
    the path that ``named_modules()`` of the original model gives (the name the bases are
    seeded with).
    """
    parts = [p for p in name.split(".") if p not in ("_orig_mod", "base_layer")]
    cleaned = ".".join(parts)
    if cleaned.startswith("base_model.model."):
        cleaned = cleaned[len("base_model.model.") :]
    return cleaned


def _adapter_dtype_for(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``A`` is created in: the base dtype, but float32 for half-precision bases."""
    if weight_dtype in _LOW_PRECISION or not weight_dtype.is_floating_point:
        return torch.float32
    return weight_dtype


def _autocast_on(device: torch.device) -> bool:
    """Whether autocast is active for ``device``'s type (False for devices autocast does not know, e.g. meta)."""
    if device.type not in ("cpu", "cuda"):
        return False
    return torch.is_autocast_enabled(device.type)


class _EffectiveFactors(torch.autograd.Function):
    """``(L A^T, A R)`` with the bases kept in their storage dtype.

    Autograd would otherwise save the bases cast to ``A``'s dtype (e.g. float32 copies of
    bfloat16 ``L`` and ``R``) for the backward pass; this saves the stored tensors and casts
    inside ``backward`` instead, so no extra copy of the bases outlives the forward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, left: torch.Tensor, right: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(left, right)
        return left.to(a.dtype) @ a.T, a @ right.to(a.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_b: torch.Tensor | None, grad_a: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None]:
        left, right = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad = None
        if grad_b is not None:  # B_eff = L A^T  =>  dA = grad_b^T L
            grad = grad_b.T @ left.to(grad_b.dtype)
        if grad_a is not None:  # A_eff = A R  =>  dA = grad_a R^T
            term = grad_a @ right.to(grad_a.dtype).T
            grad = term if grad is None else grad + term
        return grad, None, None


class SharedBases(nn.Module):
    """The bases of ``FLoRGConfig(bases="per-shape")``: one ``(L, R)`` per layer shape, held once.

    A submodule of the tuner (so ``model.to(...)`` moves each pair once); the layers keep a plain
    reference to it, not a registered one, and look their pair up by key.
    """

    def __init__(self) -> None:
        super().__init__()
        self.left = BufferDict({}, persistent=False)
        self.right = BufferDict({}, persistent=False)

    @staticmethod
    def key(seed: int, d_out: int, d_in: int, dtype: torch.dtype) -> str:
        return f"s{int(seed)}_{int(d_out)}x{int(d_in)}_{str(dtype).removeprefix('torch.')}"


def shape_basis_name(d_out: int, d_in: int) -> str:
    """The name per-shape bases are seeded with (in place of a layer's module path)."""
    return f"shape/{int(d_out)}x{int(d_in)}"


class FLoRGLayer(BaseTunerLayer):
    """Mixin holding the FLoRG state of one adapted layer.

    Attributes (all keyed by adapter name, PEFT convention):

    * ``florg_A`` (``nn.ParameterDict``): the trainable ``r x k`` factor ``A``.
    * ``florg_L`` / ``florg_R`` (non-persistent ``BufferDict``): the fixed bases, stored once in
      the base weight's dtype and never saved (they are regenerated from the seed). With
      ``bases="per-shape"`` they live in the tuner's :class:`SharedBases` instead, under
      ``florg_basis_key[adapter]`` (:meth:`basis_pair` returns them either way).
    * ``r``, ``lora_alpha``, ``scaling``, ``florg_seed``, ``florg_init_scale``,
      ``florg_compensated`` and the dropout modules ``florg_dropout``.

    ``layer_name`` is the clean module path the bases were seeded with.
    """

    adapter_layer_names: tuple[str, ...] = ("florg_A",)
    other_param_names: tuple[str, ...] = (
        "florg_L",
        "florg_R",
        "florg_dropout",
        "r",
        "lora_alpha",
        "scaling",
        "florg_seed",
        "florg_init_scale",
        "florg_compensated",
        "florg_basis_key",
    )

    def __init__(self, base_layer: nn.Module, layer_name: str, shared_bases: SharedBases | None = None,
                 **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.layer_name = clean_module_name(layer_name)
        self.florg_A = nn.ParameterDict({})
        self.florg_L = BufferDict({}, persistent=False)
        self.florg_R = BufferDict({}, persistent=False)
        self.florg_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.florg_seed: dict[str, int] = {}
        self.florg_init_scale: dict[str, float] = {}
        self.florg_compensated: dict[str, bool] = {}
        self.florg_basis_key: dict[str, str] = {}
        # a plain reference (not a submodule): the tuner owns the shared bases and moves them once
        self.__dict__["_florg_shared_bases"] = shared_bases
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.is_conv1d = False
        elif isinstance(base, Conv1D):
            # GPT-2 style: weight stored as (d_in, d_out)
            self.in_features, self.out_features = base.weight.shape
            self.is_conv1d = True
        else:
            raise TypeError(
                f"FLoRG cannot adapt module {self.layer_name!r} of type {type(base).__name__}; "
                "supported: torch.nn.Linear and transformers.pytorch_utils.Conv1D"
            )
        self.fan_in_fan_out = self.is_conv1d

    # ------------------------------------------------------------------ shapes
    @property
    def k(self) -> int:
        """``min(d_in, d_out)``: the inner dimension of the bases."""
        return min(self.in_features, self.out_features)

    # ------------------------------------------------------------------ setup
    def update_layer(self, adapter_name: str, config: FLoRGConfig, **kwargs: Any) -> None:
        """Create adapter ``adapter_name`` on this layer from ``config``.

        Generates ``L``, ``R`` (base weight dtype) and ``A0`` from ``(config.seed, layer_name)``
        and, with ``config.compensate_init``, subtracts ``s * L A0^T A0 R`` from the base weight.
        """
        r = int(config.r)
        k = self.k
        if r < 1 or r > k:
            raise ValueError(
                f"FLoRG rank r={r} is too large for layer {self.layer_name!r}: k = min(d_in={self.in_features}, "
                f"d_out={self.out_features}) = {k}; r must satisfy 1 <= r <= k"
            )
        if adapter_name in self.florg_A:
            raise ValueError(f"adapter {adapter_name!r} already exists on layer {self.layer_name!r}")
        if config.compensate_init and any(self.florg_compensated.values()):
            others = [name for name, done in self.florg_compensated.items() if done]
            raise ValueError(
                f"layer {self.layer_name!r} already carries the init compensation of adapter(s) {others}; "
                "only one adapter per layer can use compensate_init=True"
            )

        weight = self.get_base_layer().weight
        device = weight.device
        base_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        on_meta = device.type == "meta"
        buf_device = torch.device("cpu") if on_meta else device

        per_shape = getattr(config, "bases", "per-layer") == "per-shape"
        shared = self.__dict__.get("_florg_shared_bases")
        if per_shape and shared is None:
            raise ValueError(f"layer {self.layer_name!r}: bases='per-shape' needs the tuner's shared bases")
        key = SharedBases.key(config.seed, self.out_features, self.in_features, base_dtype) if per_shape else ""
        if not per_shape or key not in shared.left:
            left, right = get_bases(
                self.out_features, self.in_features, seed=config.seed, dtype=base_dtype, device=buf_device,
                layer_name=shape_basis_name(self.out_features, self.in_features) if per_shape else self.layer_name,
            )  # fmt: skip (make_bases, or the active basis_store's copy of it)
            if per_shape:
                shared.left[key], shared.right[key] = left, right
        a0 = init_factor(
            r, k, seed=config.seed, layer_name=self.layer_name, scale=config.init_scale,
            dtype=_adapter_dtype_for(base_dtype), device=buf_device,
        )  # fmt: skip

        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.scaling[adapter_name] = scaling_for(config.lora_alpha, r, config.use_rslora)
        self.florg_seed[adapter_name] = int(config.seed)
        self.florg_init_scale[adapter_name] = float(config.init_scale)
        if per_shape:
            self.florg_basis_key[adapter_name] = key
        else:
            self.florg_L[adapter_name] = left
            self.florg_R[adapter_name] = right
        self.florg_A[adapter_name] = nn.Parameter(a0)
        self.florg_dropout[adapter_name] = (
            nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        )
        self.florg_compensated[adapter_name] = False
        if config.compensate_init:
            if on_meta:
                warnings.warn(
                    f"FLoRG: base weight of {self.layer_name!r} is on the meta device; compensate_init skipped",
                    stacklevel=2,
                )
            else:
                self._apply_compensation(adapter_name, sign=-1.0)
                self.florg_compensated[adapter_name] = True

        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def initial_factor(self, adapter_name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Regenerate the initial factor ``A0`` of ``adapter_name`` (on the CPU) from its seed."""
        return init_factor(
            self.r[adapter_name], self.k, seed=self.florg_seed[adapter_name], layer_name=self.layer_name,
            scale=self.florg_init_scale[adapter_name], dtype=dtype,
        )  # fmt: skip

    def _apply_compensation(self, adapter_name: str, sign: float) -> None:
        """Add ``sign * s * L A0^T A0 R`` (computed in float64) to the base weight."""
        weight = self.get_base_layer().weight
        a0 = self.initial_factor(adapter_name).to(weight.device)
        delta = self._delta_from_factor(adapter_name, a0, torch.float64)
        with torch.no_grad():
            new = weight.detach().to(torch.float64) + sign * delta
            weight.data.copy_(new.to(weight.dtype))

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move ``adapter_name``'s tensors to the base layer's device.

        Unlike PEFT's default this never changes ``A``'s dtype (a lossy round trip through a
        half-precision base dtype would break the bit-identical ``A0``); ``L``/``R`` keep the
        base weight's dtype.
        """
        weight = self.get_base_layer().weight
        target = torch.device(device) if device is not None else weight.device
        if target.type == "meta":
            return
        buf_dtype = weight.dtype if weight.dtype.is_floating_point else None
        for bufs in (self.florg_L, self.florg_R):
            if adapter_name in bufs and bufs[adapter_name].device.type != "meta":
                bufs[adapter_name] = bufs[adapter_name].to(device=target, dtype=buf_dtype)
        if adapter_name in self.florg_A:
            param = self.florg_A[adapter_name]
            if param.device.type != "meta" and param.device != target:
                moved = param.detach().to(target)
                self.florg_A[adapter_name] = nn.Parameter(moved, requires_grad=param.requires_grad)
        if adapter_name in self.florg_dropout:
            self.florg_dropout[adapter_name].to(target)

    # ------------------------------------------------------------------ math
    def lora_factors(
        self, adapter_name: str, dtype: torch.dtype | None = None, factor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(B_eff, A_eff) = (L A^T, A R)`` of shapes ``(d_out, r)`` and ``(r, d_in)``.

        ``ΔW = scaling * B_eff @ A_eff`` in ``(d_out, d_in)`` layout. Computed in ``dtype``
        (default: ``A``'s dtype); ``factor`` replaces ``A`` (e.g. with ``A0``). Differentiable in ``A``.
        """
        a = self.florg_A[adapter_name] if factor is None else factor
        dtype = a.dtype if dtype is None else dtype
        a = a.to(dtype)
        left, right = self.basis_pair(adapter_name)
        left, right = left.to(device=a.device), right.to(device=a.device)
        if _autocast_on(a.device):
            # Under mixed precision the small factors are formed in A's dtype (float32), not autocast's:
            # they are cheap (d x r), and the two products of the forward are cast by autocast anyway.
            with torch.autocast(device_type=a.device.type, enabled=False):
                return _EffectiveFactors.apply(a, left, right)
        return _EffectiveFactors.apply(a, left, right)

    def basis_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, R)`` of ``adapter_name``: the layer's own, or its shape's shared pair (``bases="per-shape"``)."""
        if adapter_name in self.florg_L:
            return self.florg_L[adapter_name], self.florg_R[adapter_name]
        key = self.florg_basis_key[adapter_name]
        shared = self.__dict__["_florg_shared_bases"]
        return shared.left[key], shared.right[key]

    def _delta_from_factor(self, adapter_name: str, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        b_eff, a_eff = self.lora_factors(adapter_name, dtype=dtype, factor=factor)
        delta = self.scaling[adapter_name] * (b_eff @ a_eff)
        return delta.T if self.fan_in_fan_out else delta

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``s * L A^T A R`` in the base weight's storage layout (transposed for Conv1D).

        Computed in float32 (or ``A``'s dtype if wider); callers cast to the weight dtype. This is
        the single source of truth for merge, unmerge and export.
        """
        if adapter not in self.florg_A:
            raise ValueError(f"adapter {adapter!r} not found on layer {self.layer_name!r}")
        a = self.florg_A[adapter]
        dtype = torch.promote_types(a.dtype, torch.float32)
        return self._delta_from_factor(adapter, a, dtype)

    # ------------------------------------------------------------------ factor access
    def get_factor(self, adapter_name: str = "default") -> torch.Tensor:
        """A detached copy of ``A`` (``r x k``)."""
        return self.florg_A[adapter_name].detach().clone()

    def set_factor(self, value: torch.Tensor, adapter_name: str = "default") -> None:
        """Overwrite ``A`` in place (keeps its dtype, device and ``requires_grad``)."""
        param = self.florg_A[adapter_name]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"layer {self.layer_name!r}: factor shape {tuple(value.shape)} does not match "
                f"(r, k) = {tuple(param.shape)}"
            )
        if self.merged and adapter_name in self.merged_adapters:
            raise RuntimeError(f"layer {self.layer_name!r}: unmerge adapter {adapter_name!r} before setting A")
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name``; a compensated base weight is restored first."""
        if self.florg_compensated.get(adapter_name, False) and adapter_name in self.florg_A:
            self._apply_compensation(adapter_name, sign=+1.0)
        super().delete_adapter(adapter_name)

    def undo_compensation(self, keep: Iterable[str] = ()) -> None:
        """Add the init compensation of every compensated adapter not in ``keep`` back to the base weight.

        Used before unloading, so that the unloaded model has the pretrained weights again (up to
        float rounding) except for the adapters that are merged (``keep``).
        """
        kept = set(keep)
        for name, done in list(self.florg_compensated.items()):
            if done and name not in kept and name in self.florg_A:
                self._apply_compensation(name, sign=+1.0)
                self.florg_compensated[name] = False


class Linear(nn.Module, FLoRGLayer):
    """FLoRG wrapper around ``torch.nn.Linear`` or transformers' ``Conv1D``."""

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: FLoRGConfig, layer_name: str,
        shared_bases: SharedBases | None = None, **kwargs: Any,
    ) -> None:
        super().__init__()
        FLoRGLayer.__init__(self, base_layer, layer_name=layer_name, shared_bases=shared_bases, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' ``get_delta_weight`` to the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.florg_A:
                continue
            delta = self.get_delta_weight(name).detach()
            with torch.no_grad():
                merged = (base.weight.detach().to(delta.dtype) + delta).to(base.weight.dtype)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {name!r} seems to be broken")
                base.weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract all merged adapters' deltas from the base weight (reverse order)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.florg_A:
                continue
            delta = self.get_delta_weight(name).detach()
            with torch.no_grad():
                base.weight.data.copy_((base.weight.detach().to(delta.dtype) - delta).to(base.weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)

        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.florg_A:
                continue
            a = self.florg_A[name]
            b_eff, a_eff = self.lora_factors(name)  # (d_out, r), (r, d_in), in A's dtype
            xa = self._cast_input_dtype(x, a.dtype)
            h = nn.functional.linear(self.florg_dropout[name](xa), a_eff)
            h = nn.functional.linear(h, b_eff * self.scaling[name])  # scale the small factor, not the output
            result = result + h.to(result_dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "florg." + super().__repr__()

"""Shared plumbing of the LoRA-based methods (PEFT ``LoraConfig`` and LoRA layers).

Not a method itself: each method (``fedit.py``, ``federa.py``, ...) owns its client shape and
server rule and uses these pieces.

State keys (per adapted layer, ``<layer>`` = the module path without PEFT's
``base_model.model.`` prefix, e.g. ``bert.encoder.layer.0.attention.self.query``):

* ``<layer>.lora_A.weight`` (``r x d_in``) and ``<layer>.lora_B.weight`` (``d_out x r``): PEFT's
  own state-dict names, so ``B @ A`` has the shape of ``nn.Linear.weight`` (``d_out x d_in``);
* ``<layer>.w0_delta`` (``d_out x d_in``, the ``B @ A`` orientation): the cumulative correction
  of the frozen base weight relative to the pretrained one (FedEx-LoRA, FLoRA).

The pretrained base weight is kept on every adapted layer (``florg_w0_pretrained``) by the
methods that change it, so any process can rebuild ``W0 = W0_pretrained + delta`` from a message
alone: simulated clients share one cached model per process, so nothing client-specific may live
in the model between rounds.

Half-precision bases (``model.dtype`` bfloat16/float16) with a correction from the message
(FedEx-LoRA, FLoRA): rounding ``W0_pretrained + delta`` to 8 (bfloat16) or 11 (float16)
significant bits would lose most of a correction that is small against W0's entries (measured in
benchmarks/RESULTS.md, section *Half-precision bases and base weights*). So the base weight stays
the pretrained one and the correction is kept apart, in the base dtype, as the buffer
``florg_w0_delta`` (``d_out x d_in``, ``B @ A`` orientation) that a forward hook on the base layer
adds: ``y = W0 x + delta x + LoRA(x)``. It is rounded relative to itself only, and it takes the
place of the pretrained copy, which this mode does not need (the same memory).

Orientation: everything is computed in the ``B @ A`` (``d_out x d_in``) orientation and converted
to the base layer's storage layout by :func:`to_weight_layout`, which transposes only for
``fan_in_fan_out`` layers (GPT-2 ``Conv1D``). Adding a ``B @ A``-shaped residual transposed to an
``nn.Linear`` weight is the orientation bug of FedEx-LoRA's reference GLUE code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import nn

from florg.core import layer_seed

from .base import HEAD_PREFIX, SERVER_PREFIX, FederatedMethod, Tensors, normalised_weights, summarise_layers, weighted_mean
from .lora_math import Factored, weighted_products

if TYPE_CHECKING:
    pass

__all__ = [
    "A_SUFFIX",
    "B_SUFFIX",
    "W0_SUFFIX",
    "LayerRound",
    "LoRAMethod",
    "a_key",
    "b_key",
    "layer_names",
    "lora_layers",
    "seeded_lora_A",
    "to_weight_layout",
    "w0_key",
]

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
W0_SUFFIX = ".w0_delta"
_F64 = torch.float64


def a_key(layer: str) -> str:
    return layer + A_SUFFIX


def b_key(layer: str) -> str:
    return layer + B_SUFFIX


def w0_key(layer: str) -> str:
    return layer + W0_SUFFIX


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """``{clean layer name: PEFT LoraLayer}`` for every layer carrying the ``default`` LoRA adapter."""
    from peft.tuners.lora import LoraLayer  # lazy: peft (seconds); load_config imports the method registry

    # lazy: florg.adapters imports peft (seconds); load_config imports the method registry
    from florg.adapters import clean_module_name

    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[clean_module_name(name)] = module
    if not out:
        raise ValueError("the model has no LoRA layers; build it with the method first")
    return out


def to_weight_layout(layer: Any, delta: torch.Tensor) -> torch.Tensor:
    """A ``d_out x d_in`` (``B @ A``-shaped) matrix in the base layer's storage layout.

    ``nn.Linear`` stores ``(d_out, d_in)``: no transpose. Only ``fan_in_fan_out`` layers (GPT-2
    ``Conv1D``, ``(d_in, d_out)``) need ``delta.T``.
    """
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def seeded_lora_A(rank: int, d_in: int, *, seed: int, tag: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PEFT's default LoRA ``A`` init, ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` (``rank x d_in``), from a seed.

    Drawn in float64 on the CPU from :func:`florg.core.layer_seed` of ``(seed, tag)``, so every
    process obtains the byte-identical matrix (PEFT itself draws from the global RNG).
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(layer_seed(seed, tag))
    bound = 1.0 / math.sqrt(d_in)
    a = (torch.rand(rank, d_in, generator=gen, dtype=_F64) * 2.0 - 1.0) * bound
    return a.to(dtype)


# --------------------------------------------------------------------------------- the per-layer skeleton


@dataclass
class LayerRound:
    """One adapted layer in one round: the clients' uploads and their weights.

    ``p`` are the normalised aggregation weights and ``s`` the scale ``alpha / r``; ``a``/``b`` the
    clients' ``A`` (``r x d_in``) and ``B`` (``d_out x r``) in upload order, or ``None`` when the
    protocol does not upload that factor.
    """

    name: str
    p: list[float]
    s: float
    uploads: list[Tensors]

    def collect(self, key: str) -> list[torch.Tensor] | None:
        """Every client's tensor under ``key`` (None unless every upload has it)."""
        values = [u.get(key) for u in self.uploads]
        return None if any(v is None for v in values) else values

    @cached_property
    def a(self) -> list[torch.Tensor] | None:
        return self.collect(a_key(self.name))

    @cached_property
    def b(self) -> list[torch.Tensor] | None:
        return self.collect(b_key(self.name))

    @cached_property
    def a_mean(self) -> torch.Tensor:
        """``sum_n p_n A_n``."""
        return weighted_mean(self.a, self.p)

    @cached_property
    def b_mean(self) -> torch.Tensor:
        """``sum_n p_n B_n``."""
        return weighted_mean(self.b, self.p)

    def clients(self, a: Sequence[torch.Tensor] | None = None, b: Sequence[torch.Tensor] | None = None) -> Factored:
        """``sum_n p_n s B_n A_n`` (the weighted mean of the client updates), never formed densely.

        ``a``/``b`` replace the uploaded factors (e.g. FFA-LoRA's frozen, shared ``A``)."""
        return weighted_products(self.b if b is None else b, self.a if a is None else a, [self.s * w for w in self.p])


# --------------------------------------------------------------------------------- the base class


class LoRAMethod(FederatedMethod):
    """Common client side of the LoRA-based methods: PEFT ``LoraConfig``, seeded ``A``, key handling.

    Subclasses set the class attributes and implement ``adapter_state`` / ``aggregate_adapter``.
    """

    adapter_param_marker = "lora_"
    #: the head at 1.25e-2, the adapter at train.lr (5e-3): chosen on validation (docs/results/mechanism)
    recommended = {"train.head_lr": 1.25e-2}
    #: PEFT ``init_lora_weights`` ("pissa" = SVD of W0 with the principal part subtracted)
    init_lora_weights: ClassVar[Any] = True
    #: keep the pretrained W0 on each layer and let states carry ``<layer>.w0_delta``
    modifies_base: ClassVar[bool] = False
    #: train ``A`` (False: A is frozen at its seeded init)
    train_A: ClassVar[bool] = True
    #: the LoRA factors a ClientApp of the user's own exchanges (:meth:`peft_keymap`; docs/flower.md)
    peft_factors: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")

    @property
    def peft_problem(self) -> str | None:
        """Why this method's server rule cannot serve a ClientApp of the user's own (None: it can)."""
        return None

    def peft_keymap(self, state: Tensors) -> dict[str, str]:
        """``<layer>.lora_A.weight`` / ``<layer>.lora_B.weight`` (those of :attr:`peft_factors`) keep their
        keys; every other entry (``modules_to_save``, heads) -> ``head/<key>`` (weighted FedAvg)."""
        label = self.display_name or self.name
        if (problem := self.peft_problem) is not None:
            raise ValueError(f"{label}: {problem}; use florg's own ClientApp (florg run), see docs/flower.md")
        suffixes = {"lora_A": A_SUFFIX, "lora_B": B_SUFFIX}
        wanted = tuple(suffixes[f] for f in self.peft_factors)
        unwanted = tuple(v for f, v in suffixes.items() if f not in self.peft_factors)
        factors = {k: v for k, v in state.items() if k.endswith(wanted)}
        send = " and ".join(self.peft_factors)
        how = (f"send {{k: v for k, v in peft.get_peft_model_state_dict(model).items()}} of a PEFT LoRA model "
               f"(peft.LoraConfig) restricted to its {send} entries" + (" and heads" if self.shares_head else ""))
        if not factors:
            shown = ", ".join(repr(k) for k in list(state)[:3]) or "nothing"
            raise ValueError(f"{label}: the arrays are not a LoRA state dict with {send} entries: {len(state)} arrays "
                             f"({shown}{', ...' if len(state) > 3 else ''}); {how}")
        if extra := [k for k in state if k.endswith(unwanted) or (".lora_" in k and k not in factors)]:
            raise ValueError(f"{label} exchanges only {send}, the arrays also hold {extra[0]!r}; {how}")
        if not self.shares_head and (heads := [k for k in state if k not in factors]):
            raise ValueError(f"{label} keeps every client's head local, the arrays hold {heads[0]!r}; {how}")
        rank = int(self.cfg.method.rank)
        for key, value in factors.items():
            rows = value.shape[0] if key.endswith(A_SUFFIX) else value.shape[-1]
            if value.ndim != 2 or int(rows) != rank:
                raise ValueError(f"{label}: '{key}' has shape {tuple(value.shape)}, the strategy's rank is {rank}: "
                                 f"give the strategy rank={int(rows)} or build the model with LoraConfig(r={rank})")
        return {k: k if k in factors else HEAD_PREFIX + k for k in state}

    # ------------------------------------------------------------------ client model
    @property
    def scale(self) -> float:
        """``s = alpha / r`` (PEFT's LoRA scaling)."""
        return float(self.cfg.method.alpha) / float(self.cfg.method.rank)

    def build_rank(self) -> int:
        """The rank of the PEFT adapter built into the (shared) model."""
        return int(self.cfg.method.rank)

    def build(self, model: nn.Module, target_modules: list[str], head_modules: list[str]) -> nn.Module:
        # lazy: peft (seconds); load_config imports the method registry
        from peft import LoraConfig, get_peft_model

        m = self.cfg.method
        config = LoraConfig(
            r=self.build_rank(),
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=list(target_modules),
            modules_to_save=list(head_modules) if (m.train_head and head_modules) else None,
            init_lora_weights=self.init_lora_weights,
        )
        model = get_peft_model(model, config)
        layers = lora_layers(model)
        for name, layer in layers.items():
            r = layer.r["default"]
            if r > min(layer.in_features, layer.out_features):
                raise ValueError(
                    f"LoRA rank {r} is larger than layer {name!r} allows (min(d_in={layer.in_features}, "
                    f"d_out={layer.out_features})); lower method.rank"
                )
        with torch.no_grad():
            for name, layer in layers.items():
                a = layer.lora_A["default"].weight
                if self.init_lora_weights is True:
                    a.copy_(seeded_lora_A(a.shape[0], a.shape[1], seed=self.cfg.seed, tag=name + "#lora_A",
                                          dtype=a.dtype))
                a.requires_grad_(self.train_A)
                if self.modifies_base:
                    w = layer.get_base_layer().weight
                    if w.dtype in (torch.bfloat16, torch.float16) and self.init_lora_weights != "pissa":
                        _add_separate_delta(layer)
                        continue
                    pre = w.detach().clone()
                    if self.init_lora_weights == "pissa":  # W_res + s B0 A0 (get_delta_weight is in weight layout)
                        pre = (w.detach().float() + layer.get_delta_weight("default").float()).to(w.dtype)
                    layer.register_buffer("florg_w0_pretrained", pre, persistent=False)
        return model

    # ------------------------------------------------------------------ state access
    def layers(self, model: nn.Module) -> dict[str, Any]:
        return lora_layers(model)

    @staticmethod
    def get_A(layer: Any) -> torch.Tensor:
        return layer.lora_A["default"].weight.detach().clone()

    @staticmethod
    def get_B(layer: Any) -> torch.Tensor:
        return layer.lora_B["default"].weight.detach().clone()

    @staticmethod
    def _copy(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"{what}: got shape {tuple(value.shape)}, the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(device=param.device, dtype=param.dtype))

    def set_A(self, layer: Any, value: torch.Tensor, name: str = "") -> None:
        self._copy(layer.lora_A["default"].weight, value, f"layer '{name}' lora_A")

    def set_B(self, layer: Any, value: torch.Tensor, name: str = "") -> None:
        self._copy(layer.lora_B["default"].weight, value, f"layer '{name}' lora_B")

    def base_delta(self, layer: Any) -> torch.Tensor:
        """Current ``W0 - W0_pretrained`` in the ``B @ A`` orientation (``d_out x d_in``), in float32 at least.

        Formed in float64 and returned in the wider of float32 and the weight's dtype: the
        difference of two bfloat16/float16 weights is exact there, so ``W0_pretrained + delta``
        gives back the stored ``W0`` bit for bit.
        """
        w = layer.get_base_layer().weight.detach()
        wide = torch.promote_types(w.dtype, torch.float32)
        if hasattr(layer, "florg_w0_delta"):  # half-precision base: the correction is kept apart
            return layer.florg_w0_delta.detach().to(wide)
        delta = w.to(_F64) - layer.florg_w0_pretrained.to(device=w.device, dtype=_F64)
        return to_weight_layout(layer, delta.to(wide))

    def set_base_delta(self, layer: Any, delta: torch.Tensor, name: str = "") -> None:
        """``W0 <- W0_pretrained + delta`` (``delta`` in the ``B @ A`` orientation).

        Rebuilt from the pretrained copy every time, the sum formed in float64 and rounded once to
        the weight's dtype: with bfloat16/float16 base weights the rounding error is that of one
        rounding of ``W0_pretrained + delta`` and does not compound over rounds (the server keeps
        the cumulative ``delta`` in float32; docs/gpu.md measures the error).
        """
        expected = (layer.out_features, layer.in_features)
        if hasattr(layer, "florg_w0_delta"):  # half-precision base: W0 stays, the correction is kept apart
            if tuple(delta.shape) != expected:
                raise ValueError(f"layer '{name}': W0 delta has shape {tuple(delta.shape)}, expected {expected}")
            with torch.no_grad():
                layer.florg_w0_delta.copy_(delta.to(device=layer.florg_w0_delta.device, dtype=layer.florg_w0_delta.dtype))
            return
        if not hasattr(layer, "florg_w0_pretrained"):
            raise ValueError(f"layer '{name}': method '{self.name}' does not change W0 (no pretrained copy)")
        if tuple(delta.shape) != expected:
            raise ValueError(f"layer '{name}': W0 delta has shape {tuple(delta.shape)}, expected {expected}")
        w = layer.get_base_layer().weight
        pre = layer.florg_w0_pretrained.to(w.device)
        with torch.no_grad():
            w.copy_((pre.to(_F64) + to_weight_layout(layer, delta.to(device=w.device, dtype=_F64))).to(w.dtype))

    def lora_state(self, model: nn.Module, *, a: bool = True, b: bool = True) -> Tensors:
        out: Tensors = {}
        for name, layer in self.layers(model).items():
            if a:
                out[a_key(name)] = self.get_A(layer)
            if b:
                out[b_key(name)] = self.get_B(layer)
        return out

    def load_adapter_state(self, model: nn.Module, state: Tensors) -> None:
        """Apply ``lora_A``/``lora_B``/``w0_delta`` keys (also under ``server/``); other ``server/`` keys are bookkeeping."""
        layers = self.layers(model)
        for key, value in state.items():
            plain = key[len(SERVER_PREFIX):] if key.startswith(SERVER_PREFIX) else key
            for suffix, setter in ((A_SUFFIX, self.set_A), (B_SUFFIX, self.set_B), (W0_SUFFIX, self.set_base_delta)):
                if plain.endswith(suffix):
                    name = plain[: -len(suffix)]
                    if name not in layers:
                        raise KeyError(f"'{key}' is not an adapted layer of this model")
                    setter(layers[name], value, name)
                    break
            else:
                if not key.startswith(SERVER_PREFIX):
                    raise KeyError(f"'{key}' is not a state key of method '{self.name}'")

    def expected_upload(self, current: Tensors) -> dict[str, tuple[int, ...]]:
        """The global state's keys and shapes, less ``server/`` keys and the W0 corrections (never uploaded)."""
        return {k: tuple(v.shape) for k, v in current.items()
                if not k.startswith(SERVER_PREFIX) and not k.endswith(W0_SUFFIX)}

    # ------------------------------------------------------------------ server rule
    def layer_rounds(self, uploads: list[Tensors], current: Tensors, p: list[float]) -> Iterator[LayerRound]:
        """Each adapted layer of ``current`` (in state order) with this round's uploads."""
        names: dict[str, None] = {}
        for key in current:
            if key.startswith(SERVER_PREFIX):
                continue
            for suffix in (A_SUFFIX, B_SUFFIX, W0_SUFFIX):
                if key.endswith(suffix):
                    names.setdefault(key[: -len(suffix)], None)
        for name in names:
            yield LayerRound(name, p, self.scale, uploads)

    def aggregate_layer(self, layer: LayerRound, current: Tensors, new: Tensors) -> dict[str, float]:
        """One layer's server rule: write the layer's new global tensors into ``new``; return its
        diagnostics (:func:`layer_errors`; ``{}`` when the method has none for this layer)."""
        raise TypeError(f"method '{self.name}' does not implement aggregate_layer")

    def round_metrics(self, uploads: list[Tensors]) -> dict[str, float]:
        """Extra per-round metrics besides the per-layer diagnostics (default: none)."""
        return {}

    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        """The shared skeleton: ``server/`` keys carried over, then :meth:`aggregate_layer` per layer."""
        p = normalised_weights(weights, len(uploads))
        new: Tensors = {k: v for k, v in current.items() if k.startswith(SERVER_PREFIX)}
        diags = [d for layer in self.layer_rounds(uploads, current, p) if (d := self.aggregate_layer(layer, current, new))]
        out = summarise_layers(diags)
        out.update(self.round_metrics(uploads) if diags else {})
        return new, out

    def save_artifacts(self, model: nn.Module, run_path: Path) -> None:
        """``adapter/`` (PEFT LoRA) and, when W0 changed, ``base_delta.safetensors``.

        ``base_delta.safetensors`` holds ``W0_final - W0_pretrained`` per adapted layer in the
        base layer's storage layout (key = ``<layer>.weight``): add it to the pretrained weights,
        then apply the adapter, to obtain the final global model.
        """
        super().save_artifacts(model, run_path)
        if self.modifies_base:
            deltas = {name + ".weight": to_weight_layout(layer, self.base_delta(layer)).contiguous().cpu()
                      for name, layer in self.layers(model).items()}
            save_file(deltas, str(Path(run_path) / "base_delta.safetensors"))


def _add_separate_delta(layer: Any) -> None:
    """Half-precision base: keep W0's correction apart (buffer ``florg_w0_delta``), added by a forward hook."""
    base = layer.get_base_layer()
    w = base.weight
    layer.register_buffer("florg_w0_delta", torch.zeros(layer.out_features, layer.in_features, dtype=w.dtype,
                                                        device=w.device), persistent=False)

    def add_delta(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        delta = layer.florg_w0_delta
        return out + nn.functional.linear(args[0].to(delta.dtype), delta).to(out.dtype)

    base.register_forward_hook(add_delta)


def layer_names(state: Tensors, suffix: str) -> list[str]:
    """Layer names of the keys of ``state`` that end with ``suffix`` (``server/`` keys excluded)."""
    return [k[: -len(suffix)] for k in state if k.endswith(suffix) and not k.startswith(SERVER_PREFIX)]

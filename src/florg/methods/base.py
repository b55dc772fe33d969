"""The contract every federated method implements: the client's adapter shape and the server's rule.

A method turns a plain transformers model into the client model (``build``), says what the
global state is (``initial_global``), how a client applies it (``load_global``), what a client
uploads (``upload``) and how the server combines uploads (``aggregate``). Tensors travel as flat
``{key: tensor}`` dicts; keys under ``head/`` are the classification head, which every method
trains and, unless it keeps the head local (``shares_head = False``), FedAvgs the same way
(weighted mean); it is counted separately on the wire.

Two more key prefixes have a fixed meaning for the Flower glue:

* ``server/``: part of the global state that stays on the server (e.g. the state it needs to
  evaluate a global model that the protocol never sends down); stripped from every downlink.
* ``eval/``: part of an upload that exists only so that the server can evaluate a global model
  (not part of the method's protocol); counted as ``bytes_up_eval``, not as ``bytes_up``.

Methods know nothing about Flower: ``florg.fl`` converts these dicts to and from Flower records.
A client's persistent per-client state (``Context.state`` in Flower) reaches the client hooks
(:meth:`FederatedMethod.client_load`, :meth:`FederatedMethod.client_upload`) as a plain dict.

A method declares, next to its code: its own options (``options_class``, a dataclass that becomes
the config section ``method.<name>``), its byte formula (:meth:`FederatedMethod.wire_numel`), its
named variants (rows of ``florg compare``) and, if it supports differential privacy, the two DP
hooks. Adding a method is one file, one line in :mod:`florg.methods.registry`, one row of the
shared test matrix and one row of docs/methods.md (see docs/methods.md).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from florg.options import ConfigError

if TYPE_CHECKING:
    from florg.config import RunConfig

__all__ = [
    "ClientInfo",
    "Variant",
    "EVAL_PREFIX",
    "check_tensors",
    "FederatedMethod",
    "HEAD_PREFIX",
    "SERVER_PREFIX",
    "head_state",
    "load_head",
    "normalised_weights",
    "split_eval",
    "split_head",
    "summarise_layers",
    "weighted_mean",
    "wire_state",
]

HEAD_PREFIX = "head/"
SERVER_PREFIX = "server/"
EVAL_PREFIX = "eval/"
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Variant:
    """A named variant of a method: a row of ``florg compare`` that changes some of its options.

    ``options`` are values for the method's own options (``method.<name>.*``), ``shared`` for the
    options every method shares (``method.*``, e.g. ``client_ranks``); an ``ablation`` row is
    listed after the main rows and in the ablation table.
    """

    display_name: str
    options: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    ablation: bool = False


@dataclass(frozen=True)
class ClientInfo:
    """Who is training: the client's partition id and the (1-based) server round."""

    partition_id: int
    server_round: int


def wire_state(state: Tensors) -> Tensors:
    """The part of a global state that is sent down to clients (``server/`` keys removed)."""
    return {k: v for k, v in state.items() if not k.startswith(SERVER_PREFIX)}


def split_eval(upload: Tensors) -> tuple[Tensors, Tensors]:
    """``(protocol_part, eval_only_part)`` of an upload."""
    ev = {k: v for k, v in upload.items() if k.startswith(EVAL_PREFIX)}
    rest = {k: v for k, v in upload.items() if not k.startswith(EVAL_PREFIX)}
    return rest, ev


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """``p_n = w_n / sum w`` (uniform ``1/n`` when ``weights`` is None)."""
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n or any(not x > 0 for x in w):
        raise ValueError(f"need {n} positive aggregation weights, got {weights!r}")
    total = math.fsum(w)
    return [x / total for x in w]


def head_state(model: nn.Module, adapter_param_marker: str) -> Tensors:
    """Trainable parameters that are not adapter parameters (the classification head), keyed ``head/<name>``."""
    return {
        HEAD_PREFIX + name: p.detach().clone()
        for name, p in model.named_parameters()
        if p.requires_grad and adapter_param_marker not in name
    }


def load_head(model: nn.Module, state: Tensors) -> None:
    """Copy ``head/<name>`` tensors of ``state`` into the model's parameters of the same name."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            if not key.startswith(HEAD_PREFIX):
                continue
            name = key[len(HEAD_PREFIX):]
            if name not in params:
                raise KeyError(f"head parameter '{name}' is not in the model; the client and server models differ")
            params[name].copy_(value.to(params[name].dtype))


def split_head(state: Tensors) -> tuple[Tensors, Tensors]:
    """``(adapter_part, head_part)`` of a flat state dict."""
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    return rest, head


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """``sum_n p_n t_n`` with ``p_n = w_n / sum w`` (uniform when ``weights`` is None), in float64, cast back."""
    n = len(tensors)
    w = torch.tensor([1.0] * n if weights is None else list(weights), dtype=torch.float64)
    w = w / w.sum()
    acc = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, p in zip(tensors, w):
        acc += p * t.to(torch.float64)
    return acc.to(tensors[0].dtype)


def check_tensors(upload: Tensors, expected: dict[str, tuple[int, ...]], max_norm: float = 0.0) -> list[str]:
    """Problems of ``upload`` against the ``expected`` keys and shapes (see :meth:`FederatedMethod.check_upload`)."""
    problems = [f"{key}: missing" for key in expected if key not in upload]
    problems += [f"{key}: unexpected key" for key in upload if key not in expected]
    dtype = None
    for key in expected:
        value = upload.get(key)
        if value is None:
            continue
        if tuple(value.shape) != expected[key]:
            problems.append(f"{key}: shape {tuple(value.shape)}, expected {expected[key]}")
            continue
        if not value.is_floating_point():
            problems.append(f"{key}: dtype {value.dtype} is not floating point")
            continue
        if dtype is not None and value.dtype != dtype:
            problems.append(f"{key}: dtype {value.dtype} differs from {dtype}")
        dtype = dtype or value.dtype
        if not bool(torch.isfinite(value).all()):
            problems.append(f"{key}: contains NaN or Inf")
        elif max_norm > 0 and float(torch.linalg.vector_norm(value.double())) > max_norm:
            problems.append(f"{key}: norm {float(torch.linalg.vector_norm(value.double())):.4g} exceeds {max_norm:g}")
    return problems


def summarise_layers(per_layer: Sequence[dict[str, float]]) -> dict[str, float]:
    """One round's summary of per-layer diagnostics: ``<name>_max`` and ``<name>_mean`` over layers for
    every ``*_rel_error``, ``<name>_mean`` for the rest (e.g. ``rank_q``)."""
    out: dict[str, float] = {}
    names = sorted({k for d in per_layer for k in d})
    for name in names:
        vals = [d[name] for d in per_layer if name in d]
        if name.endswith("rel_error"):
            out[name + "_max"] = max(vals)
        out[name + "_mean"] = sum(vals) / len(vals)
    return out


class FederatedMethod(ABC):
    """Base class of a federated fine-tuning method (client shape + server rule)."""

    name: ClassVar[str]
    #: the name used in tables and plots (e.g. "FedSA-LoRA")
    display_name: ClassVar[str] = ""
    #: substring that identifies adapter parameters in ``model.named_parameters()``
    adapter_param_marker: ClassVar[str]
    #: whether clients may use different ranks (``method.client_ranks``)
    supports_client_ranks: ClassVar[bool] = False
    #: whether the server asks every client to evaluate its own (personalised) model each round
    client_evaluation: ClassVar[bool] = False
    #: whether the method implements differential privacy (``privacy.mode`` local/central; docs/privacy.md):
    #: then it overrides :meth:`privatize_upload` and :meth:`aggregate_private`
    supports_privacy: ClassVar[bool] = False
    #: the dataclass of this method's own options (config section ``method.<name>``), or None
    options_class: ClassVar[type | None] = None
    #: named variants, rows of ``florg compare`` next to the method's own (label -> Variant)
    variants: ClassVar[dict[str, Variant]] = {}
    #: arrays per adapted layer on the wire (uplink, downlink), besides the head's
    arrays_per_layer: ClassVar[tuple[int, int]] = (2, 2)
    #: whether the classification head travels through the protocol (FedAvg of ``head/`` keys);
    #: False: every client keeps its own head (FedSA-LoRA), which then never crosses the wire
    shares_head: ClassVar[bool] = True
    #: the method's own score: ``"global"`` (``test_<metric>``, the global model on the test split) or
    #: ``"personal"`` (``personal_<metric>``, the clients' own models; needs ``client_evaluation``)
    headline: ClassVar[str] = "global"
    #: the settings this method recommends (dotted config key -> value: lr, head lr, alpha, init ...), applied
    #: wherever a config leaves the key to the library (:func:`florg.config.resolve_defaults`);
    #: chosen on validation (docs/results/study-v2), shown by ``florg config --keys``
    recommended: ClassVar[dict[str, Any]] = {}

    def is_adapter_param(self, name: str) -> bool:
        """Whether the trainable parameter ``name`` belongs to the adapter (else: head / ``modules_to_save``)."""
        return self.adapter_param_marker in name

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.check_config(cfg)

    @property
    def options(self) -> Any:
        """This method's own options (``cfg.method.<name>``; None if it declares none)."""
        return self.cfg.method.options(self.name)

    def wire_numel(self, d_out: int, d_in: int, rank: int, client_rank: int | None = None,
                   round_ranks: Sequence[int] | None = None) -> tuple[int, int]:
        """Numbers sent per adapted ``d_out x d_in`` layer, per client and round: ``(uplink, downlink)``.

        The protocol's own formula (baselines.md section 3, method.md section 5.2), without the head
        (which methods that share it send both ways) and without Flower's fixed per-array overhead.
        ``client_rank`` is this client's rank where ranks differ (``method.client_ranks``);
        ``round_ranks`` the ranks of the uploads that this round's downlink carries, for a downlink
        that depends on them (FLoRA's stacked pair: the previous round's participants; empty in
        round 1).
        """
        raise TypeError(f"method {type(self).__name__} declares no byte formula (wire_numel)")

    def wire_extra_numel(self) -> tuple[int, int]:
        """Numbers per message ``(uplink, downlink)`` besides the adapted layers and the head (default none)."""
        return 0, 0

    @property
    def resume_problem(self) -> str | None:
        """Why a run of this method cannot resume from a checkpoint (None: it can). ``florg run --resume``
        restores the server's state, not the clients' ``Context.state``."""
        return None

    @property
    def per_client_downlink(self) -> bool:
        """Whether clients receive different downlinks (:meth:`client_downlink`; e.g. FLoRG with mixed ranks)."""
        return False

    def client_downlink(self, wire: Tensors, partition_id: int) -> Tensors:
        """What client ``partition_id`` receives of the downlink ``wire`` (default: all of it)."""
        return wire

    def check_config(self, cfg: RunConfig) -> None:
        """Raise :class:`florg.config.ConfigError` for settings this method cannot honour.

        Called on construction, i.e. before any data or model is loaded and before training.
        """
        # lazy: breaks the import cycle florg.methods.base -> .registry -> .base
        from .registry import METHODS

        if cfg.method.client_ranks and not self.supports_client_ranks:
            able = " or ".join(repr(n) for n, c in METHODS.items() if c.supports_client_ranks)
            raise ConfigError(
                f"config key 'method.client_ranks': method '{self.name}' trains one rank for every client "
                f"(method.rank); heterogeneous ranks {list(cfg.method.client_ranks)} need method.name={able}. "
                "Set method.client_ranks=[] or choose one of those"
            )
        if cfg.privacy.mode != "off" and not self.supports_privacy:
            able = " or ".join(repr(n) for n, c in METHODS.items() if c.supports_privacy)
            raise ConfigError(
                f"config key 'privacy.mode': method '{self.name}' has no differential-privacy support "
                f"(privacy.mode={cfg.privacy.mode!r}); set privacy.mode=off or method.name={able}"
            )

    @property
    def client_eval_examples(self) -> int:
        """Examples of the global test split each client evaluates its own model on (``client_evaluation``;
        0 = all)."""
        return 0

    @property
    def uses_example_weights(self) -> bool:
        return self.cfg.method.weighting == "examples"

    # ---- client side -------------------------------------------------------------------
    @abstractmethod
    def build(self, model: nn.Module, target_modules: list[str], head_modules: list[str]) -> nn.Module:
        """Wrap ``model`` with this method's adapter; only adapter (and head) parameters train."""

    @abstractmethod
    def adapter_state(self, model: nn.Module) -> Tensors:
        """The adapter tensors that make up the global state (no head)."""

    @abstractmethod
    def load_adapter_state(self, model: nn.Module, state: Tensors) -> None:
        """Write the adapter part of a global state into the model."""

    def initial_global(self, model: nn.Module) -> Tensors:
        """The global state broadcast in round 1 (adapter + head, if the head trains)."""
        state = self.adapter_state(model)
        if self.cfg.method.train_head:
            state.update(head_state(model, self.adapter_param_marker))
        return state

    def load_global(self, model: nn.Module, state: Tensors) -> None:
        """Apply what came down from the server."""
        adapter, head = split_head(state)
        self.load_adapter_state(model, adapter)
        load_head(model, head)

    def upload(self, model: nn.Module) -> Tensors:
        """What a client sends up after local training."""
        state = self.adapter_state(model)
        if self.cfg.method.train_head:
            state.update(head_state(model, self.adapter_param_marker))
        return state

    def client_load(self, model: nn.Module, state: Tensors, info: ClientInfo, local: Tensors) -> None:
        """Prepare the (shared, cached) client model for one client's round.

        ``state`` is what came down; ``local`` is this client's own persistent state (empty at
        its first round; the method may read and update it). The default applies ``state``.
        """
        self.load_global(model, state)

    def client_upload(self, model: nn.Module, info: ClientInfo, local: Tensors) -> Tensors:
        """What the client sends up after local training (may update ``local``)."""
        return self.upload(model)

    def save_artifacts(self, model: nn.Module, run_path: Path) -> None:
        """Save the final global model's adapter into the run directory (``adapter/``)."""
        model.save_pretrained(str(Path(run_path) / "adapter"))

    # ---- differential privacy (supports_privacy; docs/privacy.md) ------------------------------
    def privatize_upload(self, upload: Tensors, received: Tensors, generator: torch.Generator) -> Tensors:
        """Local DP at the client: clip and noise ``upload`` before it leaves (``received`` = what came down)."""
        raise TypeError(f"method '{self.name}' has no local differential privacy (supports_privacy is False)")

    def aggregate_private(
        self, uploads: list[Tensors], current: Tensors, *, denominator: int, generator: torch.Generator
    ) -> tuple[Tensors, dict[str, Any]]:
        """Central DP at the server: clip each upload, aggregate with calibrated noise (``denominator`` = sampled clients)."""
        raise TypeError(f"method '{self.name}' has no central differential privacy (supports_privacy is False)")

    # ---- a user's own ClientApp (PEFT state dicts; docs/flower.md) --------------------------
    def peft_keymap(self, state: Tensors) -> dict[str, str]:
        """This method's state key for every key of a PEFT state dict (``get_peft_model_state_dict``).

        Lets a strategy aggregate the ``ArrayRecord(get_peft_model_state_dict(model))`` of a user's
        own ClientApp with this method's server rule. Raises ``ValueError`` (saying what was found and
        how to make a valid state dict) when ``state`` is not one; the default: the method's server
        rule needs florg's own ClientApp.
        """
        raise ValueError(
            f"method '{self.name}' aggregates florg's own client uploads only (florg.fl.client_app); "
            "see docs/flower.md for what a ClientApp of your own must do"
        )

    def initial_server_state(self) -> Tensors:
        """Server-only (``server/``) entries of the initial global state that need no model (default none)."""
        return {}

    # ---- server side -------------------------------------------------------------------
    def expected_upload(self, current: Tensors) -> dict[str, tuple[int, ...]]:
        """Keys and shapes a valid upload must have (default: those of the global state, less its
        server-only ``server/`` entries, which never reach a client)."""
        return {key: tuple(value.shape) for key, value in current.items() if not key.startswith(SERVER_PREFIX)}

    def check_upload(self, upload: Tensors, current: Tensors, max_norm: float = 0.0) -> list[str]:
        """Problems with one client's upload (empty list = valid): missing or unexpected keys,
        wrong shapes, a non-floating or mixed dtype, NaN/Inf, a Frobenius norm above ``max_norm``
        (``0`` = no bound)."""
        return check_tensors(upload, self.expected_upload(current), max_norm)

    @abstractmethod
    def aggregate_adapter(
        self, uploads: list[Tensors], weights: list[float] | None, current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        """Combine the adapter parts of the uploads into the next global adapter state."""

    def aggregate(
        self, uploads: list[Tensors], num_examples: list[int], current: Tensors
    ) -> tuple[Tensors, dict[str, Any]]:
        """The server rule: adapter by the method's rule, head by weighted mean."""
        weights = [float(n) for n in num_examples] if self.uses_example_weights else None
        split = [split_head(u) for u in uploads]
        cur_adapter, _ = split_head(current)
        new_state, metrics = self.aggregate_adapter([a for a, _ in split], weights, cur_adapter)
        heads = [h for _, h in split]
        for key in heads[0] if heads else {}:
            new_state[key] = weighted_mean([h[key] for h in heads], weights)
        return new_state, metrics

"""Drop-in Flower strategies (use them where you would use ``FedAvg``): ``FLoRG`` and the LoRA baselines.

Each takes FedAvg's parameters plus its method's, and works with any ClientApp that sends
``ArrayRecord(get_peft_model_state_dict(model))`` (docs/flower.md), or with florg's own ClientApp.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, get_type_hints

from flwr.app import MetricRecord, RecordDict

from florg.config import RunConfig, field_aliases
from florg.methods import get_method

from .strategy import AdapterStrategy, RoundLog, config_settings

__all__ = ["FLoRG", "FeDeRA", "FedIT", "FedSALoRA", "FFALoRA", "DropInStrategy"]

#: keyword argument -> dotted config key, for every method: the config fields whose metadata names a
#: ``strategy_keyword`` (``option(..., strategy_keyword="rank")``; a method's own under ``method.<name>.*``)
_FIELDS = field_aliases("strategy_keyword")

#: FedAvg's own keyword arguments with their defaults (passed through to ``FedAvg``)
_FEDAVG: dict[str, tuple[Any, Any]] = {
    "fraction_evaluate": (0.0, float),
    "min_evaluate_nodes": (0, int),
    "weighted_by_key": ("num-examples", str),
    "arrayrecord_key": ("arrays", str),
    "configrecord_key": ("config", str),
    "train_metrics_aggr_fn": (None, Callable[[list[RecordDict], str], MetricRecord] | None),
    "evaluate_metrics_aggr_fn": (None, Callable[[list[RecordDict], str], MetricRecord] | None),
}


def strategy_keywords(method: str) -> dict[str, str]:
    """``{keyword: dotted config key}`` of the drop-in strategy for ``method``: the shared shortcuts plus
    the method's own (``method.<method>.*`` fields with a ``strategy_keyword``), in config order (``seed`` last)."""
    def section(key: str) -> str | None:
        parts = key.split(".")
        return parts[1] if len(parts) == 3 and parts[0] == "method" else None

    mine = [(kw, key) for kw, key in field_aliases("strategy_keyword").items() if section(key) in (None, method)]
    return dict(sorted(mine, key=lambda item: "." not in item[1]))  # top-level keys (seed) after the sections


def _signature(method: str) -> inspect.Signature:
    """The keyword-only signature of ``method``'s drop-in strategy (what ``help()`` and IDEs show)."""
    cfg = RunConfig()
    params = []
    for kw, key in strategy_keywords(method).items():
        *path, leaf = key.split(".")
        owner: Any = cfg
        for part in path:
            owner = getattr(owner, part)
        params.append(inspect.Parameter(kw, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=get_type_hints(type(owner))[leaf] | None))
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typ)
               for name, (default, typ) in _FEDAVG.items()]
    params += [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RunConfig | None),
               inspect.Parameter("round_log", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RoundLog | None)]
    return inspect.Signature(params, return_annotation=None)


class DropInStrategy(AdapterStrategy):
    """The shared part of the drop-in strategies: settings from keywords or a config, never both disagreeing.

    A subclass names its method (``method_name``); its keyword arguments are that method's
    :func:`strategy_keywords` (each ``None`` by default: the config's value), FedAvg's own (``_FEDAVG``),
    ``config`` and ``round_log``. Its ``__signature__`` lists them.
    """

    method_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method_name" in cls.__dict__:
            cls.__signature__ = _signature(cls.method_name)  # type: ignore[attr-defined]

    def __init__(self, *, config: RunConfig | None = None, round_log: RoundLog | None = None, **keywords: Any) -> None:
        fedavg = {name: keywords.pop(name, default) for name, (default, _) in _FEDAVG.items()}
        shortcuts = strategy_keywords(self.method_name)
        for name in keywords:
            if name not in shortcuts:
                raise TypeError(f"{type(self).__name__}() got an unexpected keyword argument {name!r}")
        cfg = _resolve(self.method_name, type(self).__name__, config,
                       {k: v for k, v in keywords.items() if v is not None}, shortcuts)
        self.config = cfg
        AdapterStrategy.__init__(self, get_method(cfg), **config_settings(cfg), round_log=round_log,
                                 client_format="auto", **fedavg)


class FLoRG(DropInStrategy):
    """Federated fine-tuning with FLoRG: exact Gram aggregation and Procrustes alignment.

    A drop-in for ``FedAvg`` with any ClientApp that trains a PEFT FLoRG model
    (``get_peft_model(model, florg.FLoRGConfig(...))``) and replies with
    ``ArrayRecord(get_peft_model_state_dict(model))`` and its example count under
    ``weighted_by_key``: every ``florg_A`` entry is aggregated by Gram aggregation plus Procrustes
    alignment to the previous global factor, every other entry (``modules_to_save``, heads) by
    weighted FedAvg. ``start`` checks the initial arrays before round 1 and returns a ``Result``
    whose arrays load with ``set_peft_model_state_dict``. Given florg's own state (the ``A/...``
    keys of :mod:`florg.fl.records`), it talks to florg's own ClientApp instead (docs/flower.md).

    Every setting comes from ``config`` (a :class:`florg.config.RunConfig`; default: florg's
    defaults), exactly as florg's own ServerApp reads it (:meth:`AdapterStrategy.from_config`),
    including ``federation.wire_dtype`` and ``federation.round_timeout``. The keyword arguments
    below are shortcuts for the most common fields: without ``config`` they change the defaults;
    with ``config`` they may only repeat its values (a contradicting one is a ``ValueError``).

    Parameters
    ----------
    rank : int
        Adapter rank r (``method.rank``, default 4).
    alpha : float
        Scale numerator: ``s = alpha / rank`` (``method.alpha``, default 16).
    procrustes : {"paper", "top-r", "none"}
        Alignment variant (``method.florg.procrustes``; ``"none"`` is the paper's ablation).
    eig_rtol : float
        Eigenvalues below ``eig_rtol`` times the largest are round-off (``method.florg.eig_rtol``).
    align_initial : bool
        Align round 1's factor to the initial ``A0`` (``method.florg.align_initial``).
    weighting : {"examples", "uniform"}
        Aggregation weights: client example counts, or ``1/N`` (``method.weighting``).
    fraction_train, min_train_nodes, min_available_nodes :
        Client sampling, as in ``FedAvg`` (``federation.*``; defaults 1.0, 2, 2).
    lr, lr_schedule, lr_min, num_rounds :
        The per-round learning rate the server sends as ``lr`` in every training message
        (``constant`` or ``cosine`` over ``num_rounds``; ``train.lr``, ``train.lr_schedule``,
        ``train.lr_min``, ``train.rounds``). Default: the method's recommended lr (``florg config --keys``).
    head_lr : float
        The head's (``modules_to_save``) peak lr, sent as ``head-lr`` on the same schedule (``train.head_lr``;
        0 = ``lr``). A ClientApp puts its head parameters in their own optimizer group at this lr.
    wire_dtype : {"float32", "float16", "bfloat16"}
        Dtype of the factors on the wire both ways (``federation.wire_dtype``); ``bfloat16`` arrays
        travel bit-cast (decode them with :func:`florg.fl.records.from_record`).
    round_timeout : float
        Seconds to wait for a round's replies and for enough nodes (``federation.round_timeout``);
        ``start``'s ``timeout`` when it is not given.
    max_norm : float
        Replies with a tensor whose norm exceeds this are dropped (``federation.max_norm``; 0: no bound).
    seed : int
        Seeds the client sampling (``seed``).
    fraction_evaluate, min_evaluate_nodes, weighted_by_key, arrayrecord_key, configrecord_key, \
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg` (client-side evaluation as in FedAvg; off by
        default, as florg evaluates the global model centrally with ``evaluate_fn``).
    config : RunConfig, optional
        The whole run (model, data, local training, federation); its ``method.name`` must be
        ``florg``.
    round_log : RoundLog, optional
        Receives per-round measurements.
    """

    method_name = "florg"


class _LoRAStrategy(DropInStrategy):
    """A LoRA baseline as a drop-in strategy (see the subclasses; the server rule is the method's).

    Parameters
    ----------
    rank, alpha :
        LoRA rank and alpha (``method.rank``, ``method.alpha``); the factors' shapes must match ``rank``.
    weighting, fraction_train, min_train_nodes, min_available_nodes, lr, head_lr, lr_schedule, lr_min, num_rounds, \
    wire_dtype, round_timeout, max_norm, seed, config, round_log :
        As in :class:`FLoRG`.
    fraction_evaluate, min_evaluate_nodes, weighted_by_key, arrayrecord_key, configrecord_key, \
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg`.
    """


class FedIT(_LoRAStrategy):
    """FedIT: FedAvg of ``lora_A`` and of ``lora_B`` separately (clients send both, and their heads)."""

    method_name = "fedit"


class FFALoRA(_LoRAStrategy):
    """FFA-LoRA: FedAvg of ``lora_B``; every client freezes ``lora_A`` at the same seeded init and sends
    only its ``lora_B`` entries (and heads)."""

    method_name = "ffa-lora"


class FedSALoRA(_LoRAStrategy):
    """FedSA-LoRA: FedAvg of ``lora_A`` only; every client keeps its ``lora_B`` and head, and sends only its
    ``lora_A`` entries."""

    method_name = "fedsa-lora"


class FeDeRA(_LoRAStrategy):
    """FeDeRA: clients initialise LoRA from the SVD of W0 (``LoraConfig(init_lora_weights="pissa")``),
    the server averages ``lora_A`` and ``lora_B`` (``federa_mode="fedavg"``, the paper's rule) or
    re-splits the exact mean product by an SVD (``federa_mode="product_svd"``)."""

    method_name = "federa"


def _resolve(method: str, strategy: str, config: RunConfig | None, keywords: dict[str, Any],
             fields: dict[str, str]) -> RunConfig:
    """The run config: ``config`` checked against ``keywords``, or the defaults with ``keywords`` applied
    (``fields``: keyword -> dotted config key)."""
    if config is None:  # florg's defaults for this method (its recommended settings) with the keywords applied
        data: dict[str, Any] = {"method": {"name": method}}
        for name, value in keywords.items():
            *path, leaf = fields[name].split(".")
            cur = data
            for part in path:
                cur = cur.setdefault(part, {})
            cur[leaf] = value
        return RunConfig.from_dict(data)
    if config.method.name != method:
        raise ValueError(
            f"{strategy} needs a config with method.name = {method!r}, got {config.method.name!r}; for other methods "
            "use AdapterStrategy.from_config(florg.methods.get_method(config), config)"
        )
    for name, value in keywords.items():
        owner, leaf = _owner(config, fields[name])
        have = getattr(owner, leaf)
        if value != have:
            raise ValueError(
                f"{strategy}({name}={value!r}) contradicts config.{fields[name]} = {have!r}; pass the value in one "
                f"place only (drop {name}= or change the config)"
            )
    cfg = RunConfig.from_dict(config.to_dict())  # a validated copy: later changes to `config` do not leak in
    return cfg


def _owner(cfg: RunConfig, key: str) -> tuple[Any, str]:
    """The config object holding the dotted ``key`` and the field's name in it."""
    *path, leaf = key.split(".")
    owner: Any = cfg
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf

"""Drop-in Flower strategies (use them where you would use ``FedAvg``): ``FLoRG`` and the LoRA baselines.

Each takes FedAvg's parameters plus its method's, and works with any ClientApp that sends
``ArrayRecord(get_peft_model_state_dict(model))`` (docs/flower.md), or with florg's own ClientApp.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from flwr.app import MetricRecord, RecordDict

from florg.config import RunConfig
from florg.methods import get_method

from .strategy import AdapterStrategy, RoundLog, config_settings

__all__ = ["FLoRG", "FeDeRA", "FedIT", "FedSALoRA", "FFALoRA", "DropInStrategy"]

# keyword argument -> dotted config key
_FIELDS = {
    "rank": "method.rank",
    "alpha": "method.alpha",
    "procrustes": "method.florg.procrustes",
    "eig_rtol": "method.florg.eig_rtol",
    "align_initial": "method.florg.align_initial",
    "federa_mode": "method.federa.mode",
    "weighting": "method.weighting",
    "fraction_train": "federation.fraction_train",
    "min_train_nodes": "federation.min_train_nodes",
    "min_available_nodes": "federation.min_available_nodes",
    "lr": "train.lr",
    "head_lr": "train.head_lr",
    "lr_schedule": "train.lr_schedule",
    "lr_min": "train.lr_min",
    "num_rounds": "train.rounds",
    "wire_dtype": "federation.wire_dtype",
    "round_timeout": "federation.round_timeout",
    "max_norm": "federation.max_norm",
    "seed": "seed",
}


class DropInStrategy(AdapterStrategy):
    """The shared part of the drop-in strategies: settings from keywords or a config, never both disagreeing."""

    method_name: ClassVar[str]

    def _setup(self, keywords: dict[str, Any], config: RunConfig | None, round_log: RoundLog | None,
               fedavg: dict[str, Any]) -> None:
        cfg = _resolve(self.method_name, type(self).__name__, config,
                       {k: v for k, v in keywords.items() if v is not None})
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

    def __init__(
        self,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        procrustes: str | None = None,
        weighting: str | None = None,
        fraction_train: float | None = None,
        min_train_nodes: int | None = None,
        min_available_nodes: int | None = None,
        lr: float | None = None,
        head_lr: float | None = None,
        lr_schedule: str | None = None,
        lr_min: float | None = None,
        num_rounds: int | None = None,
        eig_rtol: float | None = None,
        align_initial: bool | None = None,
        wire_dtype: str | None = None,
        round_timeout: float | None = None,
        max_norm: float | None = None,
        seed: int | None = None,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        config: RunConfig | None = None,
        round_log: RoundLog | None = None,
    ) -> None:
        given = {
            "rank": rank, "alpha": alpha, "procrustes": procrustes, "weighting": weighting,
            "fraction_train": fraction_train, "min_train_nodes": min_train_nodes,
            "min_available_nodes": min_available_nodes, "lr": lr, "head_lr": head_lr,
            "lr_schedule": lr_schedule, "lr_min": lr_min,
            "num_rounds": num_rounds, "eig_rtol": eig_rtol, "align_initial": align_initial,
            "wire_dtype": wire_dtype, "round_timeout": round_timeout, "max_norm": max_norm, "seed": seed,
        }
        self._setup(given, config, round_log, dict(
            fraction_evaluate=fraction_evaluate, min_evaluate_nodes=min_evaluate_nodes,
            weighted_by_key=weighted_by_key, arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        ))


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

    def __init__(
        self,
        *,
        rank: int | None = None,
        alpha: float | None = None,
        weighting: str | None = None,
        fraction_train: float | None = None,
        min_train_nodes: int | None = None,
        min_available_nodes: int | None = None,
        lr: float | None = None,
        head_lr: float | None = None,
        lr_schedule: str | None = None,
        lr_min: float | None = None,
        num_rounds: int | None = None,
        wire_dtype: str | None = None,
        round_timeout: float | None = None,
        max_norm: float | None = None,
        seed: int | None = None,
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        config: RunConfig | None = None,
        round_log: RoundLog | None = None,
        **method_keywords: Any,
    ) -> None:
        given = {
            "rank": rank, "alpha": alpha, "weighting": weighting, "fraction_train": fraction_train,
            "min_train_nodes": min_train_nodes, "min_available_nodes": min_available_nodes, "lr": lr,
            "head_lr": head_lr, "lr_schedule": lr_schedule, "lr_min": lr_min, "num_rounds": num_rounds, "wire_dtype": wire_dtype,
            "round_timeout": round_timeout, "max_norm": max_norm, "seed": seed, **method_keywords,
        }
        self._setup(given, config, round_log, dict(
            fraction_evaluate=fraction_evaluate, min_evaluate_nodes=min_evaluate_nodes,
            weighted_by_key=weighted_by_key, arrayrecord_key=arrayrecord_key, configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn, evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        ))


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

    def __init__(self, *, federa_mode: str | None = None, **keywords: Any) -> None:
        super().__init__(federa_mode=federa_mode, **keywords)


def _resolve(method: str, strategy: str, config: RunConfig | None, keywords: dict[str, Any]) -> RunConfig:
    """The run config: ``config`` checked against ``keywords``, or the defaults with ``keywords`` applied."""
    if config is None:  # florg's defaults for this method (its recommended settings) with the keywords applied
        data: dict[str, Any] = {"method": {"name": method}}
        for name, value in keywords.items():
            *path, leaf = _FIELDS[name].split(".")
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
        owner, leaf = _owner(config, _FIELDS[name])
        have = getattr(owner, leaf)
        if value != have:
            raise ValueError(
                f"{strategy}({name}={value!r}) contradicts config.{_FIELDS[name]} = {have!r}; pass the value in one "
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

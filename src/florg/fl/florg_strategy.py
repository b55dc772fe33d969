"""``FLoRG``: the drop-in Flower strategy (use it where you would use ``FedAvg``)."""

from __future__ import annotations

from typing import Any

from florg.config import RunConfig, validate
from florg.methods import FLoRGMethod

from .strategy import AdapterStrategy, RoundLog, config_settings

__all__ = ["FLoRG"]

# keyword argument -> dotted config key
_FIELDS = {
    "rank": "method.rank",
    "alpha": "method.alpha",
    "procrustes": "method.florg.procrustes",
    "weighting": "method.weighting",
    "fraction_train": "federation.fraction_train",
    "min_train_nodes": "federation.min_train_nodes",
    "min_available_nodes": "federation.min_available_nodes",
    "lr": "train.lr",
    "lr_schedule": "train.lr_schedule",
    "lr_min": "train.lr_min",
    "num_rounds": "train.rounds",
}


class FLoRG(AdapterStrategy):
    """Federated fine-tuning with FLoRG: exact Gram aggregation and Procrustes alignment.

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
    weighting : {"examples", "uniform"}
        Aggregation weights: client example counts, or ``1/N`` (``method.weighting``).
    fraction_train, min_train_nodes, min_available_nodes :
        Client sampling, as in ``FedAvg`` (``federation.*``; defaults 1.0, 2, 2).
    lr, lr_schedule, lr_min, num_rounds :
        The per-round learning rate the server sends (``constant`` or ``cosine`` over
        ``num_rounds``; ``train.lr``, ``train.lr_schedule``, ``train.lr_min``, ``train.rounds``).
    config : RunConfig, optional
        The whole run (model, data, local training, federation); its ``method.name`` must be
        ``florg``.
    round_log : RoundLog, optional
        Receives per-round measurements.
    """

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
        lr_schedule: str | None = None,
        lr_min: float | None = None,
        num_rounds: int | None = None,
        config: RunConfig | None = None,
        round_log: RoundLog | None = None,
    ) -> None:
        given = {
            "rank": rank, "alpha": alpha, "procrustes": procrustes, "weighting": weighting,
            "fraction_train": fraction_train, "min_train_nodes": min_train_nodes,
            "min_available_nodes": min_available_nodes, "lr": lr, "lr_schedule": lr_schedule, "lr_min": lr_min,
            "num_rounds": num_rounds,
        }
        cfg = _resolve(config, {k: v for k, v in given.items() if v is not None})
        self.config = cfg
        super().__init__(FLoRGMethod(cfg), **config_settings(cfg), round_log=round_log)


def _resolve(config: RunConfig | None, keywords: dict[str, Any]) -> RunConfig:
    """The run config: ``config`` checked against ``keywords``, or the defaults with ``keywords`` applied."""
    if config is None:
        cfg = RunConfig()
        for name, value in keywords.items():
            owner, leaf = _owner(cfg, _FIELDS[name])
            setattr(owner, leaf, value)
        validate(cfg)
        return cfg
    if config.method.name != "florg":
        raise ValueError(
            f"FLoRG needs a config with method.name = 'florg', got {config.method.name!r}; for other methods use "
            "AdapterStrategy.from_config(florg.methods.get_method(config), config)"
        )
    for name, value in keywords.items():
        owner, leaf = _owner(config, _FIELDS[name])
        have = getattr(owner, leaf)
        if value != have:
            raise ValueError(
                f"FLoRG({name}={value!r}) contradicts config.{_FIELDS[name]} = {have!r}; pass the value in one "
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

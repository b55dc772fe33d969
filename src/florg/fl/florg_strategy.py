"""``FLoRG``: the drop-in Flower strategy (use it where you would use ``FedAvg``)."""

from __future__ import annotations

from florg.config import RunConfig, validate
from florg.methods import FLoRGMethod
from florg.train import round_lr

from .strategy import AdapterStrategy, RoundLog

__all__ = ["FLoRG"]


class FLoRG(AdapterStrategy):
    """Federated fine-tuning with FLoRG: exact Gram aggregation and Procrustes alignment.

    Parameters
    ----------
    rank : int
        Adapter rank r.
    alpha : float
        Scale numerator: ``s = alpha / rank``.
    procrustes : {"paper", "top-r", "none"}
        Alignment variant (``"none"`` is the paper's ablation).
    weighting : {"examples", "uniform"}
        Aggregation weights: client example counts, or ``1/N``.
    fraction_train, min_train_nodes, min_available_nodes :
        Client sampling, as in ``FedAvg``.
    lr, lr_schedule, lr_min, num_rounds :
        The per-round learning rate the server sends (``constant`` or ``cosine`` over ``num_rounds``).
    config : RunConfig, optional
        The rest of the run (model, data, local training); the arguments above override it.
    """

    def __init__(
        self,
        *,
        rank: int = 4,
        alpha: float = 16.0,
        procrustes: str = "paper",
        weighting: str = "examples",
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        lr: float | None = None,
        lr_schedule: str | None = None,
        lr_min: float | None = None,
        num_rounds: int | None = None,
        config: RunConfig | None = None,
        round_log: RoundLog | None = None,
    ) -> None:
        cfg = RunConfig.from_dict(config.to_dict()) if config is not None else RunConfig()
        cfg.method.name = "florg"
        cfg.method.rank, cfg.method.alpha = rank, alpha
        cfg.method.florg.procrustes, cfg.method.weighting = procrustes, weighting
        cfg.federation.fraction_train = fraction_train
        cfg.federation.min_train_nodes, cfg.federation.min_available_nodes = min_train_nodes, min_available_nodes
        if lr is not None:
            cfg.train.lr = lr
        if lr_schedule is not None:
            cfg.train.lr_schedule = lr_schedule
        if lr_min is not None:
            cfg.train.lr_min = lr_min
        if num_rounds is not None:
            cfg.train.rounds = num_rounds
        validate(cfg)
        self.config = cfg
        super().__init__(
            FLoRGMethod(cfg),
            lr_fn=lambda rnd: round_lr(cfg.train, rnd),
            run_config_json=cfg.to_json(),
            seed=cfg.seed,
            fraction_train=cfg.federation.fraction_train,
            min_train_nodes=cfg.federation.min_train_nodes,
            min_available_nodes=cfg.federation.min_available_nodes,
            round_log=round_log,
            max_norm=cfg.federation.max_norm,
        )

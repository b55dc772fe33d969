"""Everything one process needs for a run: the adapted model, the encoded data, the method, the task family.

Both the server (central evaluation) and the clients build an :class:`Experiment` from the
same resolved config, so they hold identical bases, initial factors and partitions. Building
one is expensive (model load, tokenisation), so it is cached per process and per config:
simulated clients that share a worker process reuse it across rounds and partitions.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from florg.config import ConfigError, RunConfig
from florg.core.seeds import derive_seed
from florg.methods import FederatedMethod, get_method
from florg.tasks import TaskFamily

__all__ = ["Experiment", "get_experiment", "build_experiment", "set_offline_env"]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def set_offline_env(force: bool = False) -> None:
    """Set the offline/quiet environment variables (unless the user set them) and silence known noise."""
    for key, value in OFFLINE_ENV.items():
        if force or key not in os.environ:
            os.environ[key] = value
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers 5.24 warns about its own internal use of a renamed method on every load
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class Experiment:
    cfg: RunConfig
    method: FederatedMethod
    family: TaskFamily
    model: nn.Module
    tokenizer: Any
    label_names: list[str]  # names of the partitioning label (the classes, for classification)
    partitions: list[Any]  # each client's training features
    test: Any  # the global test split as the family evaluates it
    #: the validation split held out from the training data (None without data.validation_fraction)
    validation: Any = None
    partition_summary: list[dict[str, Any]] = field(default_factory=list)
    target_modules: list[str] = field(default_factory=list)
    #: the global state before any training (captured when the model is built, so a cached
    #: experiment that has since loaded other states still starts new runs from here)
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def client_loader(self, partition_id: int, server_round: int) -> DataLoader:
        from florg.models import make_loader

        if not 0 <= partition_id < len(self.partitions):
            raise ValueError(
                f"partition-id {partition_id} is out of range: the run has {len(self.partitions)} "
                "partitions (data.num_clients)"
            )
        seed = derive_seed(self.cfg.seed, server_round, partition_id)
        return make_loader(self.partitions[partition_id], self.cfg.train.batch_size, shuffle=True, seed=seed,
                           collate_fn=self.family.collate(self.tokenizer))

    def evaluate(self, data: Any = None, device: torch.device | None = None) -> dict[str, Any]:
        """The family's metrics of the current model on ``data`` (default: the global test split)."""
        return self.family.evaluate(self.model, self.test if data is None else data,
                                    batch_size=self.cfg.eval.batch_size, tokenizer=self.tokenizer, device=device)

    def personal_eval_set(self) -> Any:
        """The subset of the global test split on which clients evaluate their own models.

        The method's ``client_eval_examples`` examples drawn once with the run seed (the same
        subset on every client; all of the test split when 0 or larger than it).
        """
        n = self.family.size(self.test)
        m = int(self.method.client_eval_examples)
        if m <= 0 or m >= n:
            return self.test
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "personal-eval"))
        idx = torch.randperm(n, generator=gen)[:m].sort().values.tolist()
        return self.family.select(self.test, idx)


def _cache_key(cfg: RunConfig) -> str:
    """Everything the cached objects depend on: the seed (bases, initial factors, partition, head
    init), the model, the data and the method with all its options (the adapter it builds)."""
    d = cfg.to_dict()
    return json.dumps({k: d[k] for k in ("seed", "model", "data", "method")}, sort_keys=True)


def build_experiment(cfg: RunConfig) -> Experiment:
    """Load data and model, partition, encode and wrap the model with the method's adapter."""
    from florg.data import partition_dataset, partition_stats
    from florg.data.tasks import random_subset, stratified_holdout
    from florg.tasks import get_family

    set_offline_env()
    method = get_method(cfg)
    family = get_family(cfg)
    task = family.load_data()
    if cfg.data.validation_fraction > 0 and task.validation is None:
        task.train, task.validation = stratified_holdout(task.train, derive_seed(cfg.seed, "validation"),
                                                         cfg.data.validation_fraction)
    if task.validation is not None and cfg.data.max_validation_examples:
        task.validation = random_subset(task.validation, cfg.data.max_validation_examples, derive_seed(cfg.seed, "validation"))
    n_train = len(task.train)
    if cfg.data.num_clients > n_train:
        raise ConfigError(
            f"config key 'data.num_clients': {cfg.data.num_clients} clients but only {n_train} training "
            "examples; lower data.num_clients or raise data.max_train_examples"
        )
    parts = partition_dataset(
        task.train,
        cfg.data.num_clients,
        scheme=cfg.data.partition,
        alpha=cfg.data.alpha,
        classes_per_partition=cfg.data.classes_per_client,
        seed=cfg.seed,
    )
    torch.manual_seed(cfg.seed)  # the head's random init is identical everywhere
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model, tokenizer = family.load_model(task, dtype)
    targets = list(cfg.model.target_modules) or family.target_modules(model)
    model = method.build(model, targets, family.head_modules(model))
    return Experiment(
        cfg=cfg,
        method=method,
        family=family,
        model=model,
        tokenizer=tokenizer,
        label_names=list(task.label_names),
        partitions=[family.encode(p, tokenizer, train=True) for p in parts],
        test=family.encode(task.test, tokenizer, train=False),
        validation=None if task.validation is None else family.encode(task.validation, tokenizer, train=False),
        partition_summary=partition_stats(parts, task.num_labels),
        target_modules=targets,
        initial_state=method.initial_global(model),
    )


_CACHE: dict[str, Experiment] = {}
_LOCK = threading.Lock()


def get_experiment(cfg: RunConfig) -> Experiment:
    """The process-wide cached :class:`Experiment` for ``cfg`` (built on first use).

    A cache hit shares the model and data (same seed, model, data and method options) but gets a
    method object of its own, built from ``cfg`` with all of the method's checks (they also read
    the training, privacy and model settings, which may differ between hits).
    """
    key = _cache_key(cfg)
    with _LOCK:
        exp = _CACHE.get(key)
        if exp is None:
            _CACHE.clear()  # one experiment per process at a time keeps memory bounded
            exp = build_experiment(cfg)
            _CACHE[key] = exp
        else:
            exp.method = get_method(cfg)  # validates cfg (ConfigError) before anything else happens
        exp.cfg = cfg
        return exp

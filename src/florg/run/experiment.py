"""Everything one process needs for a run: the adapted model, the encoded data, the method, the task family.

Both the server (central evaluation) and the clients build an :class:`Experiment` from the
same resolved config, so they hold identical bases, initial factors and partitions. Building
one is expensive (model load, tokenisation), so it is cached per process and per config:
simulated clients that share a worker process reuse it across rounds and partitions. Across
processes (a deployment's ClientApp starts afresh every round) the tokenised data and FLoRG's
bases are cached on disk (:mod:`florg.run.cache`, ``cache.enabled``).

The model is always built on the CPU (every random draw, e.g. the head's init, is the same on
every machine) in the base dtype (``model.dtype``), with the trainable tensors in float32, and
then moved to the device a process uses (:meth:`Experiment.use_device`; ``train.device``).
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

from florg.adapters import basis_store
from florg.config import ConfigError, RunConfig, client_view
from florg.core.seeds import derive_seed
from florg.data import partition_dataset, partition_stats
from florg.data.loaders import make_loader
from florg.data.splits import random_subset, stratified_holdout
from florg.device import EVAL_MEMORY_FIX, autocast, base_dtype, check_dtype, memory_guard
from florg.env import OFFLINE_ENV
from florg.methods import FederatedMethod, get_method
from florg.tasks import TaskFamily, get_family

__all__ = ["Experiment", "build_experiment", "float32_trainables", "get_experiment", "set_offline_env"]



def set_offline_env(force: bool = False) -> None:
    """Set the offline/quiet environment variables (unless the user set them) and silence known noise."""
    for key, value in OFFLINE_ENV.items():
        if force or key not in os.environ:
            os.environ[key] = value
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
    #: where the model lives now (:meth:`use_device`)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def dtype(self) -> torch.dtype:
        """The base model's dtype (``model.dtype``)."""
        return base_dtype(self.cfg.model.dtype)

    def use_device(self, device: torch.device) -> torch.device:
        """Move the model to ``device`` (if it is not there yet) after checking that the base dtype works there."""
        check_dtype(self.dtype, device)
        if device != self.device:
            with memory_guard(device, "loading the model", ("model.dtype", "use a smaller model.dtype (bfloat16) "
                                                                          "or a device with more memory")):
                self.model.to(device)
            self.device = device
        return device

    def client_loader(self, partition_id: int, server_round: int) -> DataLoader:
        if not 0 <= partition_id < len(self.partitions):
            raise ValueError(
                f"partition-id {partition_id} is out of range: the run has {len(self.partitions)} "
                "partitions (data.num_clients)"
            )
        seed = derive_seed(self.cfg.seed, server_round, partition_id)
        return make_loader(self.partitions[partition_id], self.cfg.train.batch_size, shuffle=True, seed=seed,
                           collate_fn=self.family.collate(self.tokenizer))

    def evaluate(self, data: Any = None, device: torch.device | None = None) -> dict[str, Any]:
        """The family's metrics of the current model on ``data`` (default: the global test split).

        Runs on ``device`` (default: where the model is), under autocast for a half-precision base.
        """
        device = self.device if device is None else self.use_device(device)
        with memory_guard(device, "evaluation", EVAL_MEMORY_FIX), autocast(device, self.dtype):
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
    init), the model, the data and the method with its options (the adapter it builds); not the
    server-only ones (:func:`florg.config.client_view`), which build nothing on a client."""
    d = client_view(cfg).to_dict()
    return json.dumps({k: d[k] for k in ("seed", "model", "data", "method")}, sort_keys=True)


def build_experiment(cfg: RunConfig) -> Experiment:
    """Load data and model, partition, encode and wrap the model with the method's adapter (on the CPU).

    With ``cache.enabled`` the data (raw splits, encoded partitions and evaluation splits) and
    FLoRG's bases come from the disk cache when an earlier process stored them, and are stored
    otherwise (:mod:`florg.run.cache`); the result is the same either way.
    """
    # lazy: florg.run.cache imports datasets; this module must not load it (test_gpu_check.py)
    from florg.run.cache import CachedData, DataCache, bases_path

    set_offline_env()
    method = get_method(cfg)
    family = get_family(cfg)
    data_cache = DataCache(cfg, family) if cfg.cache.enabled and family.cache_encoded else None
    cached = data_cache.load() if data_cache is not None else None
    if cached is None:
        task, parts = _load_and_partition(cfg, family)
    else:
        task, parts = cached.task, None
    torch.manual_seed(cfg.seed)  # the head's random init is identical everywhere
    model, tokenizer = family.load_model(task, base_dtype(cfg.model.dtype))
    _check_max_length(cfg, model)
    targets = list(cfg.model.target_modules) or family.target_modules(model)
    with basis_store(bases_path(cfg, targets) if cfg.cache.enabled else None):
        model = method.build(model, targets, family.head_modules(model))
    float32_trainables(model)
    if cached is None:
        cached = CachedData(
            task=task,
            partitions=[family.encode(p, tokenizer, train=True) for p in parts],
            test=family.encode(task.test, tokenizer, train=False),
            validation=None if task.validation is None else family.encode(task.validation, tokenizer, train=False),
            partition_summary=partition_stats(parts, task.num_labels),
        )
        if data_cache is not None:
            data_cache.save(cached)
    return Experiment(
        cfg=cfg,
        method=method,
        family=family,
        model=model,
        tokenizer=tokenizer,
        label_names=list(task.label_names),
        partitions=cached.partitions,
        test=cached.test,
        validation=cached.validation,
        partition_summary=cached.partition_summary,
        target_modules=targets,
        initial_state=method.initial_global(model),
    )


def _load_and_partition(cfg: RunConfig, family: TaskFamily) -> tuple[Any, list[Any]]:
    """The family's raw splits (with the validation split held out) and the clients' partitions."""
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
    return task, parts


def _check_max_length(cfg: RunConfig, model: nn.Module) -> None:
    """``model.max_length`` must fit the model's position embeddings (e.g. 512 for BERT-like encoders)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.model.max_length > limit:
        raise ConfigError(f"config key 'model.max_length': {cfg.model.max_length} tokens but {cfg.model.name!r} has "
                          f"position embeddings for {limit}; set model.max_length <= {limit}")


def float32_trainables(model: nn.Module) -> None:
    """Keep every trainable tensor (adapter factors, the head) in float32 whatever the base dtype.

    PEFT already upcasts LoRA factors and FLoRG creates ``A`` in float32; this covers the trained
    copies of the head (``modules_to_save``), which PEFT copies in the base dtype.
    """
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


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

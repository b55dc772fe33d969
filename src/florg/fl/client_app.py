"""The florg ClientApp: receive the global adapter, train locally, reply with the upload.

The run config arrives in every message (``florg-config``: the client's view of it, without the
server-only options, :func:`florg.config.client_view`); it is parsed and validated once per process
(:func:`run_settings`), and the model and data are built once per process and cached
(:func:`florg.run.experiment.get_experiment`; across processes the data and bases come from the disk
cache, :mod:`florg.run.cache`). Each client reads its shard
from ``context.node_config["partition-id"]``.

Device: ``train.device`` of the run config, unless the node config has a ``device`` key (a
SuperNode started with ``--node-config "partition-id=0 num-partitions=2 device='cuda:1'"`` uses
its own GPU). A simulated client sees only the GPU Ray gave it (``federation.client_gpus``).

A setting the client cannot run with (no such device, a dtype the device cannot do, running out
of device memory) is not a crash of this one client: the reply is an error whose reason starts
with :data:`SETTING_ERROR`, and the server stops the run with that reason (status ``failed``).

``app`` is the production ClientApp: it never injects faults. A run config with
``federation.faults`` set (the server decides the run config) changes nothing here; the client
replies normally and logs a warning that fault injection is off. Fault injection for
reliability tests lives in a separate, test-only ClientApp, :data:`florg.fl.faults.app` (the
same ``query`` / ``train`` / ``evaluate`` functions plus the fault mod).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from florg.config import ConfigError, RunConfig
from florg.core.privacy import noise_generator
from florg.core.seeds import derive_seed
from florg.device import resolve_device
from florg.methods.base import ClientInfo
from florg.run.experiment import get_experiment
from florg.train import cycle, local_steps, make_optimizer, param_groups, set_gradient_checkpointing, train_steps

from .client_state import get_state, put_state
from .records import CONFIG_KEY, from_record, to_record

__all__ = ["EMPTY_CLIENT", "SETTING_ERROR", "app", "client_device", "evaluate_local", "faults_off_mod", "query",
           "run_settings", "train"]

#: prefix of the error reason of a reply that failed because of a setting (the server stops the run)
SETTING_ERROR = "florg setting error: "
#: prefix of the error reason of a client with no training examples: it sits the round out (the server
#: counts it in the round's ``empty_clients`` and goes on with the others)
EMPTY_CLIENT = "florg empty client: "

app = ClientApp()  # no mods: the production ClientApp injects no faults (see florg.fl.faults for the test-only one)

_OPTIM_KEY = "florg.optimizer"
_LOCAL_KEY = "florg.local"  # the method's own per-client state (e.g. FedSA-LoRA's local B)


@functools.lru_cache(maxsize=4)
def _parse(text: str) -> RunConfig:
    return RunConfig.from_json(text)


def run_settings(msg: Message) -> RunConfig:
    """The run config a message carries, parsed and validated once per process for each distinct text
    (every round of a run sends the same one). Shared between messages: read it, never change it."""
    return _parse(str(msg.content["config"][CONFIG_KEY]))


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from None


def _check_partitions(context: Context, cfg: RunConfig, pid: int) -> None:
    """The federation's partitions must be florg's clients: ``num-partitions`` = ``data.num_clients``."""
    parts = context.node_config.get("num-partitions")
    n = cfg.data.num_clients
    if parts is not None and int(parts) != n:
        raise ConfigError(
            f"config key 'data.num_clients' is {n}, but this federation has {int(parts)} partitions (SuperNodes): "
            f"set data.num_clients={int(parts)} (florg's Flower App: --run-config \"num-clients={int(parts)}\") or "
            f"run {n} SuperNodes (local simulation: --federation-config \"num-supernodes={n}\")"
        )
    if not 0 <= pid < n:
        raise ConfigError(f"config key 'data.num_clients' is {n}, but this SuperNode has partition-id {pid}; "
                          f"partition ids run from 0 to {n - 1}")


def faults_off_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Warn when the server asks for fault injection, which this ClientApp never does; change nothing."""
    if msg.metadata.message_type == "train" and (faults := _requested_faults(msg)):
        log(WARNING, "fault injection is off on this client: the run config sets federation.faults=%s, which "
                     "the production ClientApp (florg.fl.client_app:app) ignores; only the test-only ClientApp "
                     "florg.fl.faults:app injects faults. This client replies normally.", ",".join(faults))
    return call_next(msg, context)


def _requested_faults(msg: Message) -> list[str]:
    """``federation.faults`` of the run config in ``msg`` (empty if absent or unreadable)."""
    try:
        faults: Any = json.loads(str(msg.content["config"][CONFIG_KEY]))["federation"]["faults"]
    except Exception:  # noqa: BLE001 - an unreadable config is train()'s error to report, not this warning's
        return []
    return [str(f) for f in faults] if isinstance(faults, list) else []


def client_device(context: Context, cfg: RunConfig) -> torch.device:
    """This client's device: the node config's ``device`` if set, else ``train.device``."""
    node = str(context.node_config.get("device", "") or "").strip()
    if node:
        return resolve_device(node, key="node config key 'device'")
    return resolve_device(cfg.train.device)


def _setting_errors(fn: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Reply with a :data:`SETTING_ERROR` error instead of raising when a setting cannot be honoured."""

    @functools.wraps(fn)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return fn(msg, context)
        except ConfigError as exc:
            where = f"partition {context.node_config.get('partition-id', '?')}"
            log(WARNING, "%s: %s", where, exc)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{SETTING_ERROR}{where}: {exc}"),
                           reply_to=msg)

    return wrapper


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (used for reproducible client sampling)."""
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": _partition_id(context)})}), reply_to=msg)


@app.train(mods=[faults_off_mod])
@_setting_errors
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = run_settings(msg)
    server_round = int(config["server-round"])
    lr = float(config["lr"])
    head_lr = float(config["head-lr"]) if "head-lr" in config else lr
    pid = _partition_id(context)
    _check_partitions(context, cfg, pid)
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))

    device = client_device(context, cfg)
    exp = get_experiment(cfg)
    if not len(exp.partitions[pid]):
        return _empty_client(msg, pid)
    exp.use_device(device)
    model, method = exp.model, exp.method
    set_gradient_checkpointing(model, cfg.train.gradient_checkpointing)
    info = ClientInfo(partition_id=pid, server_round=server_round)
    local = _local_state(context, pid)
    received = from_record(msg.content["arrays"])
    method.client_load(model, received, info, local)

    torch.manual_seed(derive_seed(cfg.seed, server_round, pid))  # adapter dropout etc. (CPU and CUDA generators)
    optimizer = make_optimizer(param_groups(model.named_parameters(), lr, head_lr, method.is_adapter_param),
                               cfg.train, lr)
    saved = None if cfg.train.reset_optimizer else get_state(context, _OPTIM_KEY, pid)
    if saved is not None:
        _load_optimizer(optimizer, saved, [lr, head_lr])
    loader = exp.client_loader(pid, server_round)
    stats = train_steps(model, cycle(loader), optimizer, local_steps(cfg.train, len(loader)),
                        device=device, grad_accum=cfg.train.grad_accum, dtype=exp.dtype)
    if not cfg.train.reset_optimizer:
        put_state(context, _OPTIM_KEY, pid, _save_optimizer(optimizer))

    metrics = MetricRecord({
        "num-examples": len(exp.partitions[pid]),
        "train_loss": stats["train_loss"],
        "partition-id": pid,
    })
    # on the CPU from here: differential privacy draws its noise from a CPU generator
    upload = {k: v.detach().cpu() for k, v in method.client_upload(model, info, local).items()}
    if cfg.privacy.mode == "local":  # clip and noise before anything leaves the client (docs/privacy.md)
        gen = noise_generator(cfg.privacy.reproducible_noise, cfg.seed, server_round, pid, "local")
        upload = method.privatize_upload(upload, received, gen)
    if local:
        put_state(context, _LOCAL_KEY, pid, to_record(local))
    return Message(RecordDict({"arrays": to_record(upload, cfg.federation.wire_dtype), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
@_setting_errors
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate this client's own model (e.g. FedSA-LoRA's personalised one: its own state + the global state).

    The model is evaluated on the personal-evaluation subset of the global test split
    (:meth:`florg.run.experiment.Experiment.personal_eval_set`) and scored by the task family
    (:meth:`florg.tasks.base.TaskFamily.client_score`: for classification, each class weighted by this
    client's share of it in its training data), reported under the family's primary metric name;
    ``num-examples`` is the client's training-set size (the server's averaging weight).
    """
    config = msg.content["config"]
    cfg = run_settings(msg)
    pid = _partition_id(context)
    device = client_device(context, cfg)
    exp = get_experiment(cfg)
    if not len(exp.partitions[pid]):
        return _empty_client(msg, pid)
    exp.use_device(device)
    info = ClientInfo(partition_id=pid, server_round=int(config.get("server-round", 0)))
    exp.method.client_load(exp.model, from_record(msg.content["arrays"]), info, _local_state(context, pid))
    res = exp.evaluate(exp.personal_eval_set())
    score = exp.family.client_score(res, exp.partition_summary[pid]["label_counts"])
    metrics = MetricRecord({"num-examples": len(exp.partitions[pid]), exp.family.primary_metric: score,
                            "partition-id": pid})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _empty_client(msg: Message, pid: int) -> Message:
    """The reply of a client whose partition holds no training examples: an :data:`EMPTY_CLIENT` error, logged."""
    reason = (f"partition {pid} has no training examples; it sits this round out (lower data.num_clients or "
              "raise data.max_train_examples to give every client data)")
    log(WARNING, "%s", reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{EMPTY_CLIENT}{reason}"), reply_to=msg)


def _local_state(context: Context, pid: int) -> dict[str, torch.Tensor]:
    """This client's persistent method state (a plain dict; empty before its first round); in the Context, or
    on disk in the embedded simulation (:mod:`florg.fl.client_state`)."""
    record = get_state(context, _LOCAL_KEY, pid)
    return from_record(record) if record is not None else {}


def _save_optimizer(optimizer: torch.optim.Optimizer) -> ArrayRecord:
    state = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            for name, value in optimizer.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                state[f"{gi}.{pi}.{name}"] = t.detach().clone().reshape(t.shape)
    return to_record(state)


def _load_optimizer(optimizer: torch.optim.Optimizer, record: ArrayRecord, lrs: list[float]) -> None:
    """Carried optimizer state into ``optimizer``; each group's lr is this round's (adapter, then head)."""
    saved = from_record(record)
    for gi, group in enumerate(optimizer.param_groups):
        group["lr"] = lrs[0] if group.get("name") == "adapter" else lrs[-1]
        for pi, p in enumerate(group["params"]):
            entries = {k.split(".", 2)[2]: v for k, v in saved.items() if k.startswith(f"{gi}.{pi}.")}
            if entries:  # moments next to their parameter; scalar entries (AdamW's step) stay on the CPU
                optimizer.state[p] = {k: v.to(p.device, copy=True) if v.ndim else v.clone() for k, v in entries.items()}

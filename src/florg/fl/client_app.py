"""The florg ClientApp: receive the global adapter, train locally, reply with the upload.

The run config arrives in every training message (``florg-config``); the model and data are
built once per process and cached (:func:`florg.experiment.get_experiment`). Each client reads
its shard from ``context.node_config["partition-id"]``.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from florg.config import RunConfig
from florg.experiment import get_experiment
from florg.train import cycle, evaluate, make_optimizer, train_steps

from .faults import fault_mod
from .records import CONFIG_KEY, from_record, to_record

app = ClientApp(mods=[fault_mod])

_OPTIM_KEY = "florg.optimizer"


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "this SuperNode has no 'partition-id' in its node config; start it with "
            "--node-config \"partition-id=<i> num-partitions=<n>\""
        ) from None


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (used for reproducible client sampling)."""
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": _partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    cfg = RunConfig.from_json(str(config[CONFIG_KEY]))
    server_round = int(config["server-round"])
    lr = float(config["lr"])
    pid = _partition_id(context)
    torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))

    exp = get_experiment(cfg)
    model, method = exp.model, exp.method
    method.load_global(model, from_record(msg.content["arrays"]))

    torch.manual_seed((cfg.seed * 1_000_003 + server_round) * 10_007 + pid)  # dropout etc.
    optimizer = make_optimizer(model.parameters(), cfg.train, lr)
    if not cfg.train.reset_optimizer and _OPTIM_KEY in context.state:
        _load_optimizer(optimizer, context.state[_OPTIM_KEY], lr)
    stats = train_steps(model, cycle(exp.client_loader(pid, server_round)), optimizer, cfg.train.local_steps)
    if not cfg.train.reset_optimizer:
        context.state[_OPTIM_KEY] = _save_optimizer(optimizer)

    metrics = MetricRecord({
        "num-examples": len(exp.partitions[pid]),
        "train_loss": stats["train_loss"],
        "partition-id": pid,
    })
    return Message(RecordDict({"arrays": to_record(method.upload(model)), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this client's own data."""
    config = msg.content["config"]
    cfg = RunConfig.from_json(str(config[CONFIG_KEY]))
    pid = _partition_id(context)
    exp = get_experiment(cfg)
    exp.method.load_global(exp.model, from_record(msg.content["arrays"]))
    res = evaluate(exp.model, exp.eval_loader(exp.partitions[pid]))
    metrics = MetricRecord({"num-examples": int(res["examples"]), "loss": res["loss"], "accuracy": res["accuracy"]})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _save_optimizer(optimizer: torch.optim.Optimizer) -> ArrayRecord:
    state = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            for name, value in optimizer.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                state[f"{gi}.{pi}.{name}"] = t.detach().clone().reshape(t.shape)
    return to_record(state)


def _load_optimizer(optimizer: torch.optim.Optimizer, record: ArrayRecord, lr: float) -> None:
    saved = from_record(record)
    for gi, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        for pi, p in enumerate(group["params"]):
            entries = {k.split(".", 2)[2]: v for k, v in saved.items() if k.startswith(f"{gi}.{pi}.")}
            if entries:
                optimizer.state[p] = {k: v.clone() for k, v in entries.items()}

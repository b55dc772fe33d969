"""Fault injection for reliability testing: a Flower ClientApp mod and the test-only ClientApp ``app``.

Opt-in on the client side. Florg's production ClientApp (:data:`florg.fl.client_app.app`, the
one its Flower App and the simulation use by default) carries no fault mod: a server that sets
``federation.faults`` in the run config cannot make it crash, stall or corrupt its replies (it
logs a warning that fault injection is off and replies normally). Faults are injected only by
the ClientApp in this module, ``florg.fl.faults:app`` -- the production ``query`` / ``train`` /
``evaluate`` functions plus :func:`fault_mod` -- and only where it is chosen explicitly:

* the embedded simulation: ``run_simulation_engine(cfg, run_dir, client_app=florg.fl.faults.app)``
  (``florg run`` never does this);
* a deployment: a Flower App whose ``clientapp`` component is ``florg.fl.faults:app`` (florg's
  own App in ``florg/fl/app`` names the production one). In a Flower deployment the App is
  what ``flwr run`` submits, so whoever may submit Apps to your SuperNodes can run code on them
  anyway: accept only Apps you trust.

In that ClientApp, the run config key ``federation.faults`` (empty by default, so the mod is a
no-op) decides what goes wrong. Entries:

* ``KIND@PARTITION`` -- the client with that partition id misbehaves every round. Kinds:
  ``nan`` / ``inf`` (a non-finite value in its first tensor), ``shape`` (an extra row in its
  first tensor), ``missing`` (its first tensor left out), ``dtype`` (its first tensor as
  float64), ``norm`` (its first tensor scaled to a huge norm), ``examples`` (``num-examples = 0``),
  ``error`` (the ClientApp raises, so Flower returns an error reply), ``stall`` (the client
  sleeps past the round timeout before answering), ``oom`` (the model's forward pass raises
  ``torch.OutOfMemoryError`` as a GPU that runs out of memory does; the client then replies with
  a setting error and the server stops the run).
* ``dropout:FRACTION`` -- each round, that share of the clients (chosen by a seeded draw per
  round, the same in every run) raises instead of training.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from florg.config import FAULT_KINDS, RunConfig, parse_faults
from florg.core.seeds import derive_seed
from florg.run.experiment import get_experiment

from . import client_app as _production
from .records import from_record, to_record

__all__ = ["FAULT_KINDS", "InjectedFault", "app", "dropped_out", "fault_mod", "parse_faults"]


class InjectedFault(RuntimeError):
    """Raised by a client that the fault spec tells to fail."""


def dropped_out(cfg: RunConfig, server_round: int, partition_id: int, fraction: float) -> bool:
    """Whether ``partition_id`` drops out in ``server_round`` (a seeded draw shared by all clients)."""
    n = cfg.data.num_clients
    rng = random.Random(derive_seed(cfg.seed, "dropout", server_round))
    return partition_id in set(rng.sample(range(n), int(round(fraction * n))))


def _corrupt(reply: Message, kind: str) -> Message:
    tensors = from_record(reply.content["arrays"])
    first = sorted(tensors)[0]
    t = tensors[first]
    if kind == "nan":
        t = t.clone()
        t.view(-1)[0] = float("nan")
    elif kind == "inf":
        t = t.clone()
        t.view(-1)[0] = float("inf")
    elif kind == "shape":
        t = torch.cat([t, t[:1]], dim=0)
    elif kind == "dtype":
        t = t.double()
    elif kind == "norm":
        t = t / (t.norm() + 1e-12) * 1e9
    if kind == "missing":
        del tensors[first]
    else:
        tensors[first] = t
    reply.content["arrays"] = to_record(tensors)
    return reply


def fault_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Apply ``federation.faults`` to training replies; pass everything else through."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    cfg = _production.run_settings(msg)
    if not cfg.federation.faults:
        return call_next(msg, context)
    per_client, dropout = parse_faults(cfg.federation.faults)
    pid = int(context.node_config.get("partition-id", -1))
    server_round = int(msg.content["config"]["server-round"])
    kind = per_client.get(pid)
    if kind == "error" or (dropout and dropped_out(cfg, server_round, pid, dropout)):
        raise InjectedFault(f"injected failure of partition {pid} in round {server_round}")
    if kind == "stall":
        time.sleep(cfg.federation.round_timeout + 5.0)
    if kind == "oom":
        return _out_of_memory(cfg, msg, context, call_next)
    reply = call_next(msg, context)
    if kind in (None, "stall"):
        return reply
    if kind == "examples":
        reply.content["metrics"]["num-examples"] = 0
        return reply
    return _corrupt(reply, kind)


def _out_of_memory(cfg: RunConfig, msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
    """Run the client with a model whose forward pass runs out of device memory."""
    def boom(module, args, kwargs):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected fault)")

    handle = get_experiment(cfg).model.register_forward_pre_hook(boom, with_kwargs=True)
    try:
        return call_next(msg, context)
    finally:
        handle.remove()


#: The test-only ClientApp: florg's client functions with :func:`fault_mod` in front of them.
app = ClientApp(mods=[fault_mod])
app.query()(_production.query)
app.train()(_production.train)
app.evaluate()(_production.evaluate_local)

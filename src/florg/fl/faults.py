"""Fault injection for reliability testing, as a Flower ClientApp mod.

Enabled only by the run config key ``federation.faults`` (empty by default, so the mod is a
no-op). Entries:

* ``KIND@PARTITION`` -- the client with that partition id misbehaves every round. Kinds:
  ``nan`` / ``inf`` (a non-finite value in its first tensor), ``shape`` (an extra row in its
  first tensor), ``missing`` (its first tensor left out), ``dtype`` (its first tensor as
  float64), ``norm`` (its first tensor scaled to a huge norm), ``examples`` (``num-examples = 0``),
  ``error`` (the ClientApp raises, so Flower returns an error reply), ``stall`` (the client
  sleeps past the round timeout before answering).
* ``dropout:FRACTION`` -- each round, that share of the clients (chosen by a seeded draw per
  round, the same in every run) raises instead of training.
"""

from __future__ import annotations

import random
import time

import torch
from flwr.app import Context, Message

from florg.config import FAULT_KINDS, RunConfig, parse_faults

from .records import CONFIG_KEY, from_record, to_record

__all__ = ["FAULT_KINDS", "InjectedFault", "dropped_out", "fault_mod", "parse_faults"]


class InjectedFault(RuntimeError):
    """Raised by a client that the fault spec tells to fail."""


def dropped_out(cfg: RunConfig, server_round: int, partition_id: int, fraction: float) -> bool:
    """Whether ``partition_id`` drops out in ``server_round`` (a seeded draw shared by all clients)."""
    n = cfg.data.num_clients
    rng = random.Random(cfg.seed * 7919 + server_round)
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


def fault_mod(msg: Message, context: Context, call_next) -> Message:  # noqa: ANN001
    """Apply ``federation.faults`` to training replies; pass everything else through."""
    if msg.metadata.message_type != "train":
        return call_next(msg, context)
    cfg = RunConfig.from_json(str(msg.content["config"][CONFIG_KEY]))
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
    reply = call_next(msg, context)
    if kind in (None, "stall"):
        return reply
    if kind == "examples":
        reply.content["metrics"]["num-examples"] = 0
        return reply
    return _corrupt(reply, kind)

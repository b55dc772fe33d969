"""One federated round without Flower: the calls a ClientApp and the strategy make, in their order.

For every client: the downlink it receives (:meth:`~florg.methods.base.FederatedMethod.client_downlink`
of the wire state), ``client_load`` into the one shared model, local training (the caller's
``train``), ``client_upload``, and the server's check of the upload; then the server rule
(:meth:`~florg.methods.base.FederatedMethod.aggregate`). This is what :mod:`florg.fl.client_app` and
:class:`florg.fl.strategy.AdapterStrategy` do around Flower's messages, without the messages, so a
test or a benchmark can run rounds of any method on any model in one process (the methods test
matrix, the pipeline tests, ``benchmarks/gpu_check.py``).

``train(model, info)`` trains the loaded model in place for client ``info.partition_id`` in round
``info.server_round`` (e.g. :func:`florg.train.train_steps` over that client's batches).
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import ClientInfo, FederatedMethod, Tensors, wire_state

__all__ = ["RoundResult", "run_round"]


@dataclass
class RoundResult:
    """What one round produced."""

    state: Tensors  #: the new global state (on the CPU)
    diagnostics: dict[str, Any]  #: the server rule's diagnostics
    uploads: list[Tensors] = field(default_factory=list)  #: each client's upload (CPU), in client order
    received: list[Tensors] = field(default_factory=list)  #: each client's downlink, in client order
    #: wall time of the server's step: uploads to ``server_device``, the rule, the new state back to the CPU
    server_seconds: float = 0.0


def _on(state: Tensors, device: torch.device | str | None) -> Tensors:
    return state if device is None else {k: v.to(device) for k, v in state.items()}


def run_round(
    method: FederatedMethod,
    model: nn.Module,
    state: Tensors,
    train: Callable[[nn.Module, ClientInfo], Any],
    *,
    server_round: int,
    clients: Sequence[int],
    weights: Sequence[int],
    local: MutableMapping[int, Tensors] | None = None,
    max_norm: float = 1e4,
    server_device: torch.device | str | None = None,
) -> RoundResult:
    """One round of ``method`` for ``clients`` (partition ids, trained one after another on ``model``).

    ``weights`` are the clients' example counts (the server's averaging weights); ``local`` holds each
    client's persistent method state across rounds (a dict per partition id, filled in place; a fresh
    one per call when omitted). Uploads are checked as the server checks them (shapes, dtypes,
    finiteness, ``max_norm``): a bad one raises ``ValueError`` naming the client. ``server_device``
    runs the server rule on that device (the strategy's aggregation device); the result comes back
    to the CPU.
    """
    if len(weights) != len(clients):
        raise ValueError(f"run_round: {len(clients)} clients but {len(weights)} weights")
    local = {} if local is None else local
    wire = wire_state(state)
    out = RoundResult(state={}, diagnostics={})
    for pid in clients:
        info = ClientInfo(partition_id=int(pid), server_round=int(server_round))
        down = method.client_downlink(wire, info.partition_id)
        out.received.append(down)
        mine = local.setdefault(info.partition_id, {})
        method.client_load(model, down, info, mine)
        train(model, info)
        upload = {k: v.detach().cpu() for k, v in method.client_upload(model, info, mine).items()}
        problems = method.check_upload(upload, state, max_norm)
        if problems:
            raise ValueError(f"run_round: client {info.partition_id}'s upload is invalid: {'; '.join(problems)}")
        out.uploads.append(upload)
    t0 = time.perf_counter()
    new, out.diagnostics = method.aggregate([_on(u, server_device) for u in out.uploads], list(weights),
                                            _on(state, server_device))
    out.state = {k: v.detach().cpu() for k, v in new.items()}  # the copy to the CPU waits for the device
    out.server_seconds = time.perf_counter() - t0
    return out

"""``AdapterStrategy``: a FedAvg subclass that hands aggregation to a florg method.

It overrides ``configure_train`` (deterministic client sampling, the round's learning rate and
the run config in every message) and ``aggregate_train`` (records -> tensors -> the method's
server rule -> records). The math lives in ``florg.methods`` / ``florg.core``; this file only
moves records and counts bytes.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from florg.config import ConfigError, RunConfig, client_view
from florg.core.privacy import noise_generator
from florg.core.seeds import derive_seed
from florg.device import resolve_device
from florg.methods import FederatedMethod
from florg.methods.base import EVAL_PREFIX, HEAD_PREFIX, SERVER_PREFIX
from florg.tasks import family_class
from florg.train import round_head_lr, round_lr

from .privacy import PrivacyLedger
from .records import BF16_SUFFIX, CONFIG_KEY, from_record, quantize, to_record

__all__ = ["AdapterStrategy", "ClientSettingError", "RoundLog"]

#: the reason prefix of a client's setting error (:data:`florg.fl.client_app.SETTING_ERROR`)
_SETTING_ERROR = "florg setting error: "
#: the reason prefix of a client with no training examples (:data:`florg.fl.client_app.EMPTY_CLIENT`)
_EMPTY_CLIENT = "florg empty client: "
#: partition-id queries sent at a time (see ``AdapterStrategy._partition_ids``)
QUERY_BATCH = 64
#: the client formats a strategy can talk to (``client_format``)
CLIENT_FORMATS = ("florg", "peft", "auto")


class ClientSettingError(ConfigError):
    """A client cannot run with the run's settings; the message is the client's (it names the setting)."""


class RoundLog:
    """What the strategy measured in each round: bytes, participants, timings, diagnostics."""

    def __init__(self) -> None:
        self.rounds: dict[int, dict[str, Any]] = {}

    def update(self, server_round: int, **values: Any) -> None:
        self.rounds.setdefault(server_round, {}).update(values)

    def get(self, server_round: int) -> dict[str, Any]:
        return dict(self.rounds.get(server_round, {}))


class AdapterStrategy(FedAvg):
    """Federated adapter fine-tuning with a pluggable server rule.

    Parameters
    ----------
    method : FederatedMethod
        Client adapter shape and server rule (e.g. :class:`florg.methods.FLoRGMethod`).
    lr_fn : Callable[[int], float]
        Learning rate of each (1-based) round; sent to the clients in the round's config (``lr``).
    head_lr_fn : Callable[[int], float], optional
        Learning rate of the head (``modules_to_save``) in each round, sent as ``head-lr``; default: ``lr_fn``'s.
    run_config_json : str
        The resolved run config, sent to clients so that they build the same model and data.
    seed : int
        Seeds the client sampling (partial participation is reproducible).
    fraction_train, min_train_nodes, min_available_nodes :
        As in :class:`flwr.serverapp.strategy.FedAvg`.
    round_log : RoundLog, optional
        Receives per-round measurements (bytes up/down, participants, aggregation time).
    wire_dtype : str
        Dtype of adapter tensors on the wire both ways (``float32``, ``float16``, ``bfloat16``):
        whatever arrays ``start`` is given, the clients receive them in this dtype, and the
        global state is kept exactly as the clients decode it.
    node_wait_timeout : float
        Seconds to wait for ``min_available_nodes`` nodes before a round gives up with an error.
    round_offset : int
        Rounds already done before ``start`` (a resumed run): Flower's round ``i`` is round
        ``i + round_offset`` of the run (learning rate, sampling and client seeds follow it).
    max_norm : float
        Replies with an uploaded tensor whose Frobenius norm exceeds this are dropped (0 = no bound).
    device : str
        Where the server rule runs (``train.device``: ``auto``, ``cpu``, ``cuda``, ``cuda:N``); the
        uploads are moved there and the new state back to the CPU. Under differential privacy
        (``privacy.mode`` local or central) the server rule runs on the CPU, where
        :mod:`florg.core.privacy` computes and draws its noise.
    round_timeout : float
        ``start``'s ``timeout`` (seconds to wait for a round's replies) when it is not given.
    client_format : {"florg", "peft", "auto"}
        What the clients send and receive. ``"florg"``: florg's own ClientApp (the method's state
        keys; the run config travels in every message). ``"peft"``: any ClientApp that sends
        ``ArrayRecord(get_peft_model_state_dict(model))`` and its example count under
        ``weighted_by_key``; the method maps the keys (:meth:`FederatedMethod.peft_keymap`), the
        downlinks are PEFT state dicts, the result loads with ``set_peft_model_state_dict``.
        ``"auto"``: decided by ``start`` from the initial arrays.
    fraction_evaluate, min_evaluate_nodes, weighted_by_key, arrayrecord_key, configrecord_key, \
    train_metrics_aggr_fn, evaluate_metrics_aggr_fn :
        As in :class:`flwr.serverapp.strategy.FedAvg`. Client-side evaluation follows FedAvg for
        PEFT clients; with florg's own client only methods with ``client_evaluation`` evaluate there.

    A reply whose error reason starts with :data:`florg.fl.client_app.SETTING_ERROR` (a client
    that cannot run with the run's settings: no such device, out of device memory, ...) stops the
    run with :class:`ClientSettingError`, which names the setting to change.

    Every reply is validated before aggregation (keys, shapes, dtype, finite values, the norm
    bound, a positive integer example count); an invalid reply is dropped with a logged reason
    and counted in the round's ``rejected``; with no valid reply the global adapter stays
    unchanged and the round is recorded as ``failed``.

    :meth:`from_config` builds one from a run config (florg's ServerApp and :class:`florg.fl.FLoRG`
    both do).
    """

    def __init__(
        self,
        method: FederatedMethod,
        *,
        lr_fn: Callable[[int], float],
        run_config_json: str,
        head_lr_fn: Callable[[int], float] | None = None,
        seed: int = 0,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        round_log: RoundLog | None = None,
        max_norm: float = 1e4,
        round_offset: int = 0,
        node_wait_timeout: float = 600.0,
        wire_dtype: str = "float32",
        device: str = "cpu",
        round_timeout: float = 3600.0,
        client_format: str = "florg",
        fraction_evaluate: float = 0.0,
        min_evaluate_nodes: int = 0,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if client_format not in CLIENT_FORMATS:
            raise ValueError(f"client_format must be one of {', '.join(CLIENT_FORMATS)}, got {client_format!r}")
        self.method = method
        #: the task family's primary metric: clients report their own model's score under it (personal_<metric>)
        self.personal_metric = family_class(method.cfg.data.task).metrics[0]
        self.lr_fn = lr_fn
        self.head_lr_fn = head_lr_fn
        self.run_config_json = run_config_json
        self.seed = seed
        self.round_log = round_log or RoundLog()
        self.max_norm = max_norm
        self.round_offset = round_offset
        self.node_wait_timeout = node_wait_timeout
        self.wire_dtype = wire_dtype
        self.device = device
        self.round_timeout = round_timeout
        self.client_format = client_format
        #: PEFT clients: PEFT state-dict key -> the method's state key (set by ``start``), and back
        self._to_method: dict[str, str] = {}
        self._to_peft: dict[str, str] = {}
        #: PEFT clients: the server-only entries of the global state (they never travel)
        self._server_state: dict[str, torch.Tensor] = {}
        self._current: dict[str, Any] = {}
        self._node_partition: dict[int, int] = {}
        # Differential privacy (privacy.mode local/central): epsilon in every round's row.
        self.privacy = PrivacyLedger.from_config(method.cfg)
        self._sample_size = 0
        if self.privacy is not None and round_offset == 0:
            self.round_log.update(0, **self.privacy.row())

    @classmethod
    def from_config(
        cls, method: FederatedMethod, cfg: RunConfig, *, round_log: RoundLog | None = None, round_offset: int = 0
    ) -> AdapterStrategy:
        """The strategy for the run ``cfg`` (learning rate schedule, seed, sampling, timeouts, wire dtype)."""
        return cls(method, **config_settings(cfg), round_log=round_log, round_offset=round_offset)

    def summary(self) -> None:
        log(INFO, "\t├── Method: %s", self.method.name)
        super().summary()

    # ------------------------------------------------------------------ start
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """FedAvg's ``start``, after checking ``initial_arrays`` (one clear ``ValueError`` before round 1
        when they are not what the clients exchange); ``timeout`` defaults to ``round_timeout``."""
        self._check_initial(initial_arrays)
        return super().start(
            grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds,
            timeout=self.round_timeout if timeout is None else timeout,
            train_config=train_config, evaluate_config=evaluate_config, evaluate_fn=evaluate_fn,
        )

    @property
    def peft_clients(self) -> bool:
        """Whether the clients exchange PEFT state dicts (``client_format`` ``"peft"``, or ``"auto"`` resolved so)."""
        return self.client_format == "peft"

    def _check_initial(self, arrays: ArrayRecord) -> None:
        try:
            state = from_record(arrays)
        except Exception as exc:  # any undecodable record is the same user error
            raise ValueError(f"{type(self).__name__}: the initial arrays cannot be decoded: {exc}") from exc
        if self.client_format == "auto":
            own = bool(state) and all(k.startswith(("A/", HEAD_PREFIX, SERVER_PREFIX)) for k in state)
            self.client_format = "florg" if own else "peft"
        if not self.peft_clients:
            return
        self._to_method = self.method.peft_keymap(state)  # raises ValueError: what was found, how to fix it
        self._to_peft = {v: k for k, v in self._to_method.items()}
        self._server_state = self.method.initial_server_state()
        if self.method.per_client_downlink:
            raise ValueError(f"method '{self.method.name}' sends each client its own downlink here; that needs "
                             "florg's own ClientApp (docs/flower.md)")

    def _method_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A decoded PEFT state dict under the method's keys (PEFT clients); unknown keys raise ``KeyError``."""
        return {self._to_method[k]: v for k, v in state.items()}

    def _peft_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's state under PEFT keys, without its server-only entries."""
        return {self._to_peft[k]: v for k, v in state.items() if not k.startswith(SERVER_PREFIX)}

    # ------------------------------------------------------------------ sampling
    def _partition_ids(self, grid: Grid, nodes: list[int]) -> dict[int, int]:
        """Ask nodes we have not seen for their partition id (a small query message each).

        The queries go out :data:`QUERY_BATCH` at a time: Flower's simulation engine scans every
        undelivered message for every node each 0.1 s, so 1000 queries at once cost a million
        checks per scan (for 1000 nodes on 2 cores: 1.5-4 times the driver's CPU of batches of 64,
        and more wall time). Each batch may take as long as a round (``round_timeout``, at least
        60 s): a fixed minute for all of them was too short for 1000 nodes on a busy 2-core machine
        (70 s) and left nodes unknown, sampled in no reproducible order and asked again every round.
        """
        unknown = [n for n in nodes if n not in self._node_partition]
        if unknown:
            for start in range(0, len(unknown), QUERY_BATCH):
                msgs = [
                    Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY,
                            dst_node_id=n)
                    for n in unknown[start:start + QUERY_BATCH]
                ]
                for reply in grid.send_and_receive(msgs, timeout=max(60.0, self.round_timeout)):
                    if not reply.has_error():
                        pid = int(reply.content["metrics"]["partition-id"])
                        self._node_partition[reply.metadata.src_node_id] = pid
            missing = sum(n not in self._node_partition for n in unknown)
            if missing:
                log(WARNING, "%d of %d nodes did not report their partition id; they are sampled after the others",
                    missing, len(unknown))
        return {n: self._node_partition.get(n, 1 << 40) for n in nodes}

    def _sample(self, grid: Grid, server_round: int) -> list[int]:
        """Sample reproducibly: wait for enough nodes, order them by partition id, draw with a seeded RNG.

        Node ids are random in Flower's simulation, partition ids are not, so the same seed
        selects the same clients in every run.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        while len(nodes := sorted(grid.get_node_ids())) < self.min_available_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} nodes connected after {self.node_wait_timeout:.0f} s; "
                    f"federation.min_available_nodes is {self.min_available_nodes} (start more SuperNodes or lower it)"
                )
            log(INFO, "Waiting for nodes: %d connected (minimum %d)", len(nodes), self.min_available_nodes)
            time.sleep(1.0)
        size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
        size = min(size, len(nodes))
        if size >= len(nodes):
            return nodes
        if self.peft_clients:  # a ClientApp of the user's own answers no partition-id query
            return random.Random(derive_seed(self.seed, server_round)).sample(nodes, size)
        pids = self._partition_ids(grid, nodes)
        ordered = sorted(nodes, key=lambda n: (pids[n], n))
        rng = random.Random(derive_seed(self.seed, server_round))
        return rng.sample(ordered, size)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self.peft_clients:
            self._current = {**self._method_state(self._quantize(from_record(arrays))), **self._server_state}
        else:
            self._current = quantize(from_record(arrays), self.wire_dtype)  # as the clients will decode it
        node_ids = self._sample(grid, server_round)
        self._sample_size = len(node_ids)
        lr = float(self.lr_fn(server_round))
        head_lr = float(self.head_lr_fn(server_round)) if self.head_lr_fn is not None else lr
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        config["lr"] = lr
        config["head-lr"] = head_lr
        if not self.peft_clients:  # florg's own ClientApp builds its model and data from the run config
            config[CONFIG_KEY] = self.run_config_json
        sends = self._downlinks(arrays, grid, node_ids)
        self.round_log.update(
            server_round,
            lr=lr,
            **({"head_lr": head_lr} if head_lr != lr else {}),
            sampled=len(sends),
            bytes_down=sum(w.count_bytes() for _, w in sends),
            bytes_down_head=sum(_head_bytes(w) for _, w in sends),
        )
        log(INFO, "configure_train: round %d, %d clients, lr %.3g", server_round, len(sends), lr)
        return [Message(content=RecordDict({self.arrayrecord_key: w, self.configrecord_key: config}),
                        message_type=MessageType.TRAIN, dst_node_id=n) for n, w in sends]

    def _downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        """What is sent down: the global state in the wire dtype, without its server-only (``server/``) arrays."""
        if self.peft_clients:
            return self._encode_peft(from_record(arrays), self.wire_dtype)
        return to_record(from_record(_wire(arrays)), self.wire_dtype)

    def _encode_peft(self, state: dict[str, torch.Tensor], wire_dtype: str) -> ArrayRecord:
        """A PEFT state dict as a record, encoded as its method-keyed twin would be (head entries in float32)."""
        record = to_record({self._to_method[k]: v for k, v in state.items()}, wire_dtype)
        out = OrderedDict()
        for key, array in record.items():
            base, suffix = (key[: -len(BF16_SUFFIX)], BF16_SUFFIX) if key.endswith(BF16_SUFFIX) else (key, "")
            out[self._to_peft[base] + suffix] = array
        return ArrayRecord(out)

    def _quantize(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A PEFT state dict exactly as the clients decode it after a trip through the wire."""
        return state if self.wire_dtype == "float32" else from_record(self._encode_peft(state, self.wire_dtype))

    def _downlinks(self, arrays: ArrayRecord, grid: Grid, node_ids: list[int]) -> list[tuple[int, ArrayRecord]]:
        """``(node, downlink)`` pairs: the same record for every node, or each client's own part when the
        method sends clients different downlinks (:meth:`FederatedMethod.client_downlink`); a node
        whose partition id is unknown then gets nothing this round (logged)."""
        if not self.method.per_client_downlink:
            wire = self._downlink(arrays)
            return [(n, wire) for n in node_ids]
        state = from_record(_wire(arrays))
        pids = self._partition_ids(grid, node_ids)
        sends = []
        for n in node_ids:
            if n not in self._node_partition:
                log(WARNING, "node %d did not report its partition id; it gets no message this round", n)
                continue
            sends.append((n, to_record(self.method.client_downlink(state, pids[n]), self.wire_dtype)))
        return sends

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        good: list[tuple[int, dict, int, float]] = []
        bytes_up = bytes_up_head = bytes_up_eval = 0
        failures = rejected = empty = 0
        contents: list[RecordDict] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                if str(msg.error.reason).startswith(_SETTING_ERROR):
                    raise ClientSettingError(str(msg.error.reason)[len(_SETTING_ERROR):])
                if str(msg.error.reason).startswith(_EMPTY_CLIENT):  # no data: it sat the round out
                    empty += 1
                    log(WARNING, "round %d: node %d skipped: %s", server_round, node,
                        str(msg.error.reason)[len(_EMPTY_CLIENT):])
                    continue
                failures += 1
                log(WARNING, "round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            arrays = msg.content.get(self.arrayrecord_key)
            if isinstance(arrays, ArrayRecord):
                eval_only = _prefixed_bytes(arrays, EVAL_PREFIX)  # evaluation-only payload, not protocol traffic
                bytes_up += arrays.count_bytes() - eval_only
                bytes_up_eval += eval_only
                bytes_up_head += _head_bytes(arrays)
            parsed, problems = self._parse_reply(msg)
            if problems:
                rejected += 1
                for problem in problems:
                    log(WARNING, "round %d: dropped the reply of node %d: %s", server_round, node, problem)
                continue
            good.append(parsed)
            contents.append(msg.content)
        # A fixed order (by partition id; PEFT clients report none: by their content) makes the
        # floating-point sums reproducible.
        good.sort(key=(lambda item: (item[0], _fingerprint(item[1]))) if self.peft_clients else (lambda item: item[0]))
        self.round_log.update(server_round, participants=len(good), failures=failures, rejected=rejected,
                              bytes_up=bytes_up, bytes_up_head=bytes_up_head, failed=not good)
        if bytes_up_eval:
            self.round_log.update(server_round, bytes_up_eval=bytes_up_eval)
        if empty:
            self.round_log.update(server_round, empty_clients=empty)
        if not good:
            log(WARNING, "round %d: no valid reply; the global adapter is unchanged", server_round)
            # Local DP: clients that replied did release their noisy uploads to the server.
            self._account(server_round, released=self.privacy is not None and self.privacy.mode == "local"
                          and failures + empty < len(replies))
            return None, None
        t0 = time.perf_counter()
        if self.privacy is not None and self.privacy.mode == "central":
            new_state, diagnostics = self.method.aggregate_private(
                [g[1] for g in good], self._current, denominator=max(self._sample_size, len(good)),
                generator=noise_generator(self.privacy.reproducible, self.seed, server_round, "central"),
            )
        else:
            device = self._aggregation_device()
            new_state, diagnostics = self.method.aggregate(
                [_on(g[1], device) for g in good], [g[2] for g in good], _on(self._current, device)
            )
            new_state = _on(new_state, torch.device("cpu"))
        self._account(server_round, released=True)
        agg_seconds = time.perf_counter() - t0
        examples = sum(g[2] for g in good)
        train_loss = sum(g[3] * g[2] for g in good) / examples
        self.round_log.update(server_round, agg_seconds=agg_seconds, train_loss=train_loss,
                              train_examples=examples, **diagnostics)
        if not self.peft_clients:
            metrics = MetricRecord({"train_loss": train_loss, "num-examples": examples, "agg_seconds": agg_seconds})
            return to_record(new_state, self.wire_dtype), metrics
        # PEFT clients: FedAvg's metrics; the new global state as the clients will decode it, in float32
        # (a record that set_peft_model_state_dict loads as it is); server-only entries stay here.
        self._server_state = {k: v for k, v in new_state.items() if k.startswith(SERVER_PREFIX)}
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics["agg_seconds"] = agg_seconds
        return to_record(self._quantize(self._peft_state(new_state)), "float32"), metrics


    def _aggregation_device(self) -> torch.device:
        """``train.device``; the CPU under differential privacy (florg.core.privacy works on the CPU)."""
        return torch.device("cpu") if self.privacy is not None else resolve_device(self.device)

    def _account(self, server_round: int, released: bool) -> None:
        """Compose this round's privacy release (if any) and put the cumulative epsilon in its row."""
        if self.privacy is None:
            return
        if released:
            self.privacy.release(self._sample_size)
        self.round_log.update(server_round, **self.privacy.row())

    def _parse_reply(self, msg: Message) -> tuple[tuple[int, dict, int, float] | None, list[str]]:
        """``((partition id, tensors, num examples, train loss), [])`` or ``(None, problems)``."""
        content = msg.content
        arrays = content.get(self.arrayrecord_key)
        metrics = content.get("metrics")
        if not isinstance(arrays, ArrayRecord):
            return None, [f"no ArrayRecord under '{self.arrayrecord_key}'"]
        if not isinstance(metrics, MetricRecord):
            return None, ["no MetricRecord under 'metrics'"]
        n = metrics.get(self.weighted_by_key)
        if isinstance(n, bool) or not isinstance(n, (int, float)) or n != int(n) or n < 1:
            return None, [f"{self.weighted_by_key} must be a positive integer, got {n!r}"]
        try:
            tensors = from_record(arrays)
        except Exception as exc:  # noqa: BLE001 - any undecodable payload is a bad reply
            return None, [f"arrays cannot be decoded: {exc}"]
        if self.peft_clients:
            unknown = [k for k in tensors if k not in self._to_method]
            if unknown:
                return None, [f"{k}: not in the global state dict" for k in unknown]
            tensors = self._method_state(tensors)
        problems = self.method.check_upload(tensors, self._current, self.max_norm)
        if problems:
            return None, problems
        pid = int(metrics.get("partition-id", -1))
        return (pid, tensors, int(n), float(metrics.get("train_loss", float("nan")))), []


    # ------------------------------------------------------------------ client-side evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Every client evaluates its own model, for methods that define one (``method.client_evaluation``);
        PEFT clients: FedAvg's client-side evaluation (``fraction_evaluate``)."""
        if self.peft_clients:
            return super().configure_evaluate(server_round, arrays, config, grid)
        if not self.method.client_evaluation:
            return []
        server_round += self.round_offset
        node_ids = sorted(grid.get_node_ids())
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        config[CONFIG_KEY] = self.run_config_json
        sends = self._downlinks(arrays, grid, node_ids)
        self.round_log.update(server_round, bytes_down_eval=sum(w.count_bytes() for _, w in sends))
        return [Message(content=RecordDict({self.arrayrecord_key: w, self.configrecord_key: config}),
                        message_type=MessageType.EVALUATE, dst_node_id=n) for n, w in sends]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' own scores -> ``personal_<metric>`` in the round row
        (``personal_accuracy`` for classification, ``personal_loss`` for instruction tuning); PEFT clients:
        FedAvg's."""
        if self.peft_clients:
            return super().aggregate_evaluate(server_round, replies)
        server_round += self.round_offset
        results = []
        for msg in replies:
            if msg.has_error():
                log(WARNING, "round %d: evaluation on node %d failed: %s", server_round, msg.metadata.src_node_id,
                    msg.error.reason)
                continue
            m = msg.content["metrics"]
            results.append((float(m[self.personal_metric]), int(m["num-examples"])))
        if not results:
            return None
        total = sum(n for _, n in results)
        score = sum(a * n for a, n in results) / total
        name = f"personal_{self.personal_metric}"
        self.round_log.update(server_round, **{name: score, "personal_clients": len(results),
                                               f"{name}_min": min(a for a, _ in results),
                                               f"{name}_max": max(a for a, _ in results)})
        return MetricRecord({name: score})


def config_settings(cfg: RunConfig) -> dict[str, Any]:
    """The :class:`AdapterStrategy` keyword arguments that a run config decides (one place for all of them)."""
    fed = cfg.federation
    return {
        "lr_fn": lambda rnd: round_lr(cfg.train, rnd),
        "head_lr_fn": lambda rnd: round_head_lr(cfg.train, rnd),
        "run_config_json": client_view(cfg).to_json(),  # what a client needs: no server-only option
        "seed": cfg.seed,
        "fraction_train": fed.fraction_train,
        "min_train_nodes": fed.min_train_nodes,
        "min_available_nodes": fed.min_available_nodes,
        "max_norm": fed.max_norm,
        "node_wait_timeout": fed.round_timeout,
        "wire_dtype": fed.wire_dtype,
        "device": cfg.train.device,
        "round_timeout": fed.round_timeout,
    }


def _fingerprint(state: dict[str, torch.Tensor]) -> tuple[float, ...]:
    """A content key for ordering uploads that carry no partition id (the sums of their tensors)."""
    return tuple(float(v.double().sum()) for _, v in sorted(state.items()))


def _on(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``state`` with its tensors on ``device`` (the same dict when they are all there already)."""
    if all(v.device == device for v in state.values()):
        return state
    return {k: v.to(device) for k, v in state.items()}


def _wire(record: ArrayRecord) -> ArrayRecord:
    """The global state without its server-only (``server/``) arrays."""
    if not any(k.startswith(SERVER_PREFIX) for k in record):
        return record
    return ArrayRecord(OrderedDict((k, v) for k, v in record.items() if not k.startswith(SERVER_PREFIX)))


def _prefixed_bytes(record: ArrayRecord, prefix: str) -> int:
    return sum(len(v.data) + len(k) for k, v in record.items() if k.startswith(prefix))


def _head_bytes(record: ArrayRecord) -> int:
    return _prefixed_bytes(record, "head/")

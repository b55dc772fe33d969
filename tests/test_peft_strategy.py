"""``florg.fl.FLoRG`` as a drop-in strategy for a ClientApp of the user's own (PEFT state dicts).

The grid here runs each training message through a small PEFT client in this process (no Ray):
the client builds a tiny BERT with ``get_peft_model(model, FLoRGConfig(...))``, loads the
downlink with ``set_peft_model_state_dict``, trains a few steps and replies with
``ArrayRecord(get_peft_model_state_dict(model))``, exactly as a user's ClientApp does.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from florg import FLoRGConfig
from florg.core import aggregate_model
from florg.fl import FLoRG
from florg.fl.records import CONFIG_KEY, from_record
from florg.methods.base import weighted_mean
from helpers import tiny_bert

RANK = 4


def _peft_model(rank: int = RANK) -> torch.nn.Module:
    cfg = FLoRGConfig(r=rank, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], seed=3)
    return get_peft_model(tiny_bert(seed=0), cfg)


class _ClientGrid:
    """Enough of a Flower Grid for ``start``: node ids, and a PEFT client answering every training message."""

    def __init__(self, node_ids, examples, key="num-examples", build=None, keep=lambda k: True, reverse=False):
        self.node_ids, self.examples, self.key, self.reverse = list(node_ids), examples, key, reverse
        self.build, self.keep = build or _peft_model, keep
        self.sent: list[Message] = []
        self.timeouts: list[float | None] = []
        self.uploads: list[dict[int, dict[str, torch.Tensor]]] = []

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.timeouts.append(timeout)
        if messages:
            self.sent.extend(messages)
            self.uploads.append({})
        replies = [self._train(m) for m in messages]
        return replies[::-1] if self.reverse else replies

    def _train(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        model = self.build()
        received = msg.content["arrays"].to_torch_state_dict()
        # a protocol that exchanges part of the adapter: the client keeps its own values of the rest
        set_peft_model_state_dict(model, {**get_peft_model_state_dict(model), **received})
        g = torch.Generator().manual_seed(node)
        n = self.examples[node]
        ids = torch.randint(1, 97, (n, 12), generator=g)
        labels = torch.randint(0, 3, (n,), generator=g)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(msg.content["config"]["lr"]))
        model.train()
        for _ in range(3):
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v for k, v in get_peft_model_state_dict(model).items() if self.keep(k)}
        self.uploads[-1][node] = {k: v.detach().clone() for k, v in state.items()}
        content = RecordDict({"arrays": ArrayRecord(state),
                              "metrics": MetricRecord({self.key: n, "train_loss": float(loss.detach())})})
        return Message(content=content, reply_to=msg)


def test_florg_aggregates_a_users_peft_state_dicts_and_returns_a_loadable_result(flower_task):
    initial = get_peft_model_state_dict(_peft_model())
    assert any(k.endswith(".florg_A") for k in initial) and any("classifier" in k for k in initial)
    examples = {11: 8, 12: 24}
    grid = _ClientGrid(examples, examples)
    strategy = FLoRG(rank=RANK, lr=0.5, min_train_nodes=2, min_available_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=2)

    # the clients got PEFT state dicts, the round's learning rate, and no florg run config
    config = grid.sent[0].content["config"]
    assert set(grid.sent[0].content["arrays"]) == set(initial) and config["lr"] == pytest.approx(0.5)
    assert CONFIG_KEY not in config and config["server-round"] == 1

    final = result.arrays.to_torch_state_dict()
    assert set(final) == set(initial)
    model = _peft_model()
    set_peft_model_state_dict(model, final)  # loads as it is
    assert torch.equal(get_peft_model_state_dict(model)[next(iter(initial))], final[next(iter(initial))])

    # round 2 = Gram aggregation + Procrustes (against round 1's global factor) of every florg_A, FedAvg of the rest
    previous = grid.sent[-1].content["arrays"].to_torch_state_dict()
    ups = [grid.uploads[-1][n] for n in sorted(examples)]
    weights = [float(examples[n]) for n in sorted(examples)]
    factors = [k for k in initial if k.endswith(".florg_A")]
    ref = aggregate_model({k: [u[k] for u in ups] for k in factors}, weights,
                          previous={k: previous[k] for k in factors}, rank=RANK)
    for key in factors:
        assert torch.allclose(final[key], ref[key].factor, atol=1e-6)
        assert not torch.equal(final[key], initial[key])  # it trained
    for key in set(initial) - set(factors):
        assert torch.allclose(final[key], weighted_mean([u[key] for u in ups], weights), atol=1e-6)
    assert set(result.train_metrics_clientapp) == {1, 2}  # FedAvg's metric aggregation of the replies
    assert "train_loss" in result.train_metrics_clientapp[2] and "agg_seconds" in result.train_metrics_clientapp[2]


def test_florg_without_align_initial_skips_only_round_1s_alignment(flower_task):
    initial = get_peft_model_state_dict(_peft_model())
    examples = {11: 8, 12: 24}
    grid = _ClientGrid(examples, examples)
    final = FLoRG(rank=RANK, align_initial=False).start(
        grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1).arrays.to_torch_state_dict()
    ups = [grid.uploads[-1][n] for n in sorted(examples)]
    factors = [k for k in initial if k.endswith(".florg_A")]
    ref = aggregate_model({k: [u[k] for u in ups] for k in factors}, [8.0, 24.0], previous={}, rank=RANK)
    for key in factors:  # every reply counted (the server-only marker is not asked of the clients), no alignment
        assert torch.allclose(final[key], ref[key].factor, atol=1e-6)


def test_florg_weights_by_fedavgs_weighted_by_key(flower_task):
    initial = get_peft_model_state_dict(_peft_model())
    examples = {11: 1, 12: 99}
    grid = _ClientGrid(examples, examples, key="n")
    result = FLoRG(rank=RANK, weighted_by_key="n").start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1)
    final = result.arrays.to_torch_state_dict()
    ups = [grid.uploads[-1][n] for n in sorted(examples)]
    head = [k for k in initial if not k.endswith(".florg_A")][0]
    assert torch.allclose(final[head], weighted_mean([u[head] for u in ups], [1.0, 99.0]), atol=1e-6)


def test_florg_with_peft_clients_is_reproducible_whatever_the_reply_order(flower_task):
    initial = ArrayRecord(get_peft_model_state_dict(_peft_model()))
    examples = {11: 8, 12: 24, 13: 16}
    finals = []
    for reverse in (False, True):
        grid = _ClientGrid(examples, examples, reverse=reverse)
        result = FLoRG(rank=RANK, lr=0.5).start(grid=grid, initial_arrays=initial, num_rounds=1)
        finals.append(result.arrays.to_torch_state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_florg_rejects_initial_arrays_that_are_not_a_florg_state_dict_before_round_1(flower_task):
    from peft import LoraConfig

    lora = get_peft_model(tiny_bert(seed=0), LoraConfig(r=4, target_modules=["query", "value"]))
    grid = _ClientGrid({11: 4, 12: 4}, {11: 4, 12: 4})
    with pytest.raises(ValueError, match=r"not a FLoRG PEFT state dict.*lora_A/lora_B.*FLoRGConfig"):
        FLoRG().start(grid=grid, initial_arrays=ArrayRecord(get_peft_model_state_dict(lora)), num_rounds=1)
    with pytest.raises(ValueError, match=r"shape \(8, 32\).*rank is 4.*rank=8"):
        FLoRG(rank=4).start(grid=grid, initial_arrays=ArrayRecord(get_peft_model_state_dict(_peft_model(8))),
                            num_rounds=1)
    assert grid.sent == []  # nothing reached a client


def test_florg_honours_the_wire_dtype_with_peft_clients(flower_task):
    initial = get_peft_model_state_dict(_peft_model())
    examples = {11: 6, 12: 6}
    grid = _ClientGrid(examples, examples)
    result = FLoRG(rank=RANK, wire_dtype="float16").start(grid=grid, initial_arrays=ArrayRecord(initial),
                                                          num_rounds=1)
    sent = grid.sent[0].content["arrays"]
    factor = next(k for k in initial if k.endswith(".florg_A"))
    head = next(k for k in initial if not k.endswith(".florg_A"))
    assert sent[factor].dtype == "float16" and sent[head].dtype == "float32"  # the head travels exactly
    final = from_record(result.arrays)
    assert result.arrays[factor].dtype == "float32"  # loads with set_peft_model_state_dict as it is
    assert torch.equal(final[factor], final[factor].half().float())  # ... and is what the clients decode


def test_florg_takes_fedavgs_parameters_and_florgs_and_honours_the_round_timeout(flower_task):
    from florg.fl.florg_strategy import FLoRG as Same

    s = FLoRG(rank=RANK, eig_rtol=1e-9, align_initial=False, wire_dtype="float16", round_timeout=12.0, max_norm=50.0,
              seed=3, fraction_evaluate=0.5, min_evaluate_nodes=1, weighted_by_key="n", arrayrecord_key="adapter")
    m, f = s.config.method, s.config.federation
    assert (m.rank, m.florg.eig_rtol, m.florg.align_initial, s.config.seed) == (RANK, 1e-9, False, 3)
    assert (f.wire_dtype, f.round_timeout, f.max_norm) == ("float16", 12.0, 50.0)
    assert (s.wire_dtype, s.round_timeout, s.max_norm, s.seed) == ("float16", 12.0, 50.0, 3)
    assert (s.fraction_evaluate, s.min_evaluate_nodes, s.weighted_by_key, s.arrayrecord_key) == (0.5, 1, "n", "adapter")
    assert Same is FLoRG
    grid = _ClientGrid({11: 4, 12: 4}, {11: 4, 12: 4})
    FLoRG(rank=RANK, round_timeout=12.0).start(grid=grid, initial_arrays=ArrayRecord(
        get_peft_model_state_dict(_peft_model())), num_rounds=1)
    assert grid.timeouts and set(grid.timeouts) == {12.0}  # every round waits round_timeout for its replies


def test_florg_keeps_talking_to_florgs_own_client_format(flower_task):
    from florg.fl.records import to_record

    state = {"A/l0": torch.randn(4, 32), "head/classifier.weight": torch.randn(3, 32)}
    s = FLoRG()
    s._check_initial(to_record(state))
    assert not s.peft_clients
    msgs = list(s.configure_train(1, to_record(state), ConfigRecord({}), _ClientGrid([1, 2], {})))
    assert CONFIG_KEY in msgs[0].content["config"]


# ------------------------------------------------------------------ the LoRA baselines as drop-in strategies


def _lora_model(init=True, frozen_a=False, local_b=False):
    from peft import LoraConfig

    torch.manual_seed(7)  # the same lora_A init on every client (FFA-LoRA needs it)
    model = get_peft_model(tiny_bert(seed=0), LoraConfig(r=RANK, lora_alpha=8, target_modules=["query", "value"],
                                                         modules_to_save=["classifier"], init_lora_weights=init))
    for name, p in model.named_parameters():
        if frozen_a and "lora_A" in name:
            p.requires_grad_(False)
        if local_b and "lora_B" in name:  # a client's own B after earlier rounds (FedSA-LoRA keeps it local)
            with torch.no_grad():
                p.normal_(0.0, 0.1)
    return model


def _lora_run(strategy, keep, **build):
    examples = {11: 8, 12: 24}
    initial = {k: v for k, v in get_peft_model_state_dict(_lora_model(**build)).items() if keep(k)}
    grid = _ClientGrid(examples, examples, build=lambda: _lora_model(**build), keep=keep)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=1)
    final = result.arrays.to_torch_state_dict()
    ups = [grid.uploads[-1][n] for n in sorted(examples)]
    return initial, final, ups, [8.0, 24.0]


@pytest.mark.parametrize(
    ("name", "keep", "build"),
    [
        ("FedIT", lambda k: True, {}),
        ("FeDeRA", lambda k: True, {"init": "pissa"}),
        ("FFALoRA", lambda k: "lora_A" not in k, {"frozen_a": True}),
        ("FedSALoRA", lambda k: "lora_A" in k, {"local_b": True}),
    ],
)
def test_lora_baselines_fedavg_the_entries_their_protocol_exchanges(flower_task, name, keep, build):
    import florg.fl

    initial, final, ups, weights = _lora_run(getattr(florg.fl, name)(rank=RANK, alpha=8), keep, **build)
    assert set(final) == set(initial)
    for key in initial:
        assert torch.allclose(final[key], weighted_mean([u[key] for u in ups], weights), atol=1e-6), key
    assert any(not torch.equal(final[k], initial[k]) for k in initial)  # it trained
    model = _lora_model(**build)
    set_peft_model_state_dict(model, {**get_peft_model_state_dict(model), **final})


def test_lora_baselines_say_what_their_client_must_send(flower_task):
    from florg.config import load_config
    from florg.fl import FedSALoRA, FFALoRA
    from florg.fl.strategy import AdapterStrategy
    from florg.methods import get_method

    full = ArrayRecord(get_peft_model_state_dict(_lora_model()))
    grid = _ClientGrid({11: 4, 12: 4}, {11: 4, 12: 4})
    with pytest.raises(ValueError, match=r"FFA-LoRA exchanges only lora_B.*lora_A"):
        FFALoRA(rank=RANK).start(grid=grid, initial_arrays=full, num_rounds=1)
    only_a = ArrayRecord({k: v for k, v in get_peft_model_state_dict(_lora_model()).items() if "lora_B" not in k})
    with pytest.raises(ValueError, match=r"FedSA-LoRA keeps every client's head local.*classifier"):
        FedSALoRA(rank=RANK).start(grid=grid, initial_arrays=only_a, num_rounds=1)
    for method in ("flora", "fedex-lora"):
        cfg = load_config(None, [f"method.name={method}"])
        s = AdapterStrategy.from_config(get_method(cfg), cfg)
        s.client_format = "peft"
        with pytest.raises(ValueError, match=r"florg's own ClientApp.*docs/flower.md"):
            s.start(grid=grid, initial_arrays=full, num_rounds=1)
    assert grid.sent == []

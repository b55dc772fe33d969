"""Strategy logic without a Flower runtime: the FLoRG method's server rule and client sampling."""

import math

import pytest
import torch
from flwr.app import ConfigRecord

from florg.config import client_view, load_config
from florg.core import aggregate_model
from florg.fl.records import from_record, to_record
from florg.fl.strategy import AdapterStrategy
from florg.methods import FLoRGMethod
from florg.methods.base import weighted_mean


def _uploads(n=4, layers=("l0", "l1"), r=4, k=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ups = []
    for _ in range(n):
        u = {f"A/{name}": torch.randn(r, k, generator=g) for name in layers}
        u["head/classifier.weight"] = torch.randn(3, k, generator=g)
        ups.append(u)
    current = {f"A/{name}": torch.randn(r, k, generator=g) for name in layers}
    current["head/classifier.weight"] = torch.zeros(3, k)
    return ups, current


def test_florg_method_server_rule_is_the_core_aggregation():
    cfg = load_config(None, ["method.florg.procrustes=paper", "method.weighting=examples"])
    method = FLoRGMethod(cfg)
    ups, current = _uploads()
    examples = [10, 20, 30, 40]
    new, metrics = method.aggregate(ups, examples, current)
    ref = aggregate_model(
        {k: [u[k] for u in ups] for k in ("A/l0", "A/l1")},
        [float(e) for e in examples],
        previous={k: current[k] for k in ("A/l0", "A/l1")},
        rank=4,
    )
    for key, res in ref.items():
        assert torch.equal(new[key], res.factor)
    head = weighted_mean([u["head/classifier.weight"] for u in ups], examples)
    expected = sum(e * u["head/classifier.weight"].double() for e, u in zip(examples, ups)) / sum(examples)
    assert torch.allclose(new["head/classifier.weight"].double(), expected, atol=1e-6)
    assert torch.equal(new["head/classifier.weight"], head)
    assert metrics["agg_rel_error_max"] < 1e-12 and metrics["rank_q_mean"] == 16


def test_uniform_weighting_and_no_alignment():
    cfg = load_config(None, ["method.weighting=uniform", "method.florg.procrustes=none"])
    ups, current = _uploads(seed=1)
    new, metrics = FLoRGMethod(cfg).aggregate(ups, [1, 1000, 1, 1], current)
    ref = aggregate_model({"A/l0": [u["A/l0"] for u in ups]}, None, previous={"A/l0": current["A/l0"]}, rank=4,
                          align=False)
    assert torch.equal(new["A/l0"], ref["A/l0"].factor)
    assert abs(metrics["align_gain_mean"]) < 1e-12  # no alignment => no alignment gain
    assert metrics["delta_proc_mean"] > 0  # ... and the sent factor is not the best rotation (the paper's Delta_proc)


def test_align_initial_false_skips_only_the_alignment_to_the_random_a0():
    from florg.methods.florg import INITIAL_KEY

    ups, a0 = _uploads(seed=2)
    layers = {k: [u[k] for u in ups] for k in ("A/l0", "A/l1")}
    ones = [1.0] * len(ups)
    for variant in ("paper", "top-r"):
        method = FLoRGMethod(load_config(None, ["method.florg.align_initial=false", f"method.florg.procrustes={variant}",
                                                "method.weighting=uniform"]))
        first, _ = method.aggregate(ups, [1] * 4, {**a0, INITIAL_KEY: torch.ones(1)})  # the initial state
        unaligned = aggregate_model(layers, ones, rank=4, variant=variant)  # no reference: raw top eigen-factor
        assert all(torch.equal(first[k], unaligned[k].factor) for k in layers) and INITIAL_KEY not in first
        second, _ = method.aggregate(ups, [1] * 4, first)  # from round 2 on: aligned to the last global A
        aligned = aggregate_model(layers, ones, previous={k: first[k] for k in layers}, rank=4, variant=variant)
        assert all(torch.equal(second[k], aligned[k].factor) for k in layers)
        # the default (today's behaviour): round 1 aligns to A0, marker or not
        default = FLoRGMethod(load_config(None, [f"method.florg.procrustes={variant}", "method.weighting=uniform"]))
        to_a0 = aggregate_model(layers, ones, previous={k: a0[k] for k in layers}, rank=4, variant=variant)
        got, _ = default.aggregate(ups, [1] * 4, a0)
        assert all(torch.equal(got[k], to_a0[k].factor) for k in layers)
        assert not torch.equal(to_a0["A/l0"].factor, unaligned["A/l0"].factor)


def test_records_round_trip_is_bit_exact():
    ups, _ = _uploads()
    back = from_record(to_record(ups[0]))
    assert set(back) == set(ups[0])
    for key in back:
        assert torch.equal(back[key], ups[0][key])


class _FakeGrid:
    def __init__(self, ids):
        self.ids = ids

    def get_node_ids(self):
        return list(self.ids)


def _strategy(fraction, seed=0):
    cfg = load_config(None, [f"federation.fraction_train={fraction}"])
    return AdapterStrategy(FLoRGMethod(cfg), lr_fn=lambda r: 0.1, run_config_json=cfg.to_json(), seed=seed,
                           fraction_train=fraction, min_train_nodes=2, min_available_nodes=2)


def test_full_participation_samples_every_node():
    grid = _FakeGrid([50, 7, 99, 3])
    assert sorted(_strategy(1.0)._sample(grid, 1)) == [3, 7, 50, 99]


def test_partial_participation_is_reproducible_by_partition_id():
    # Two runs whose random node ids differ but map to the same partitions choose the same partitions.
    ids_a = {101: 0, 205: 1, 17: 2, 999: 3, 42: 4, 7: 5}
    ids_b = {5: 0, 6: 1, 700: 2, 8: 3, 1: 4, 300: 5}
    chosen = []
    for ids in (ids_a, ids_b):
        s = _strategy(0.5, seed=3)
        s._node_partition = dict(ids)
        picked = s._sample(_FakeGrid(list(ids)), server_round=2)
        assert len(picked) == 3
        chosen.append(sorted(ids[n] for n in picked))
    assert chosen[0] == chosen[1]
    other_round = _strategy(0.5, seed=3)
    other_round._node_partition = dict(ids_a)
    rounds = {tuple(sorted(ids_a[n] for n in other_round._sample(_FakeGrid(list(ids_a)), r))) for r in range(1, 8)}
    assert len(rounds) > 1  # different rounds sample different clients


def test_florg_strategy_is_a_fedavg_drop_in_with_its_options():
    from flwr.serverapp.strategy import FedAvg

    from florg.fl import FLoRG

    s = FLoRG(rank=2, alpha=8.0, procrustes="top-r", weighting="uniform", fraction_train=0.5, min_train_nodes=3,
              min_available_nodes=4, lr=1e-2, lr_schedule="cosine", lr_min=1e-3, num_rounds=5)
    assert isinstance(s, FedAvg)
    m = s.config.method
    assert (m.name, m.rank, m.alpha, m.florg.procrustes, m.weighting) == ("florg", 2, 8.0, "top-r", "uniform")
    assert (s.fraction_train, s.min_train_nodes, s.min_available_nodes) == (0.5, 3, 4)
    assert s.lr_fn(1) == pytest.approx(1e-2) and s.lr_fn(5) == pytest.approx(1e-3 + 0.5 * 9e-3 * (1 + math.cos(0.8 * math.pi)))
    assert s.method.name == "florg"
    with pytest.raises(ValueError, match="method.florg.procrustes"):
        FLoRG(procrustes="sideways")


class _TrainGrid(_FakeGrid):
    """Enough of a Flower Grid for ``configure_train``: node ids only."""


def _state(k=32):
    g = torch.Generator().manual_seed(5)
    return {"A/l0": torch.randn(4, k, generator=g), "head/classifier.weight": torch.randn(3, k, generator=g)}


def test_florg_with_a_config_honours_wire_dtype_and_round_timeout(flower_task):
    from florg.fl import FLoRG
    from florg.fl.records import BF16_SUFFIX

    cfg = load_config(None, ["federation.wire_dtype=bfloat16", "federation.round_timeout=7"])
    s = FLoRG(config=cfg)
    assert s.wire_dtype == "bfloat16" and s.node_wait_timeout == 7
    state = _state()
    msgs = list(s.configure_train(1, to_record(state), ConfigRecord({}), _TrainGrid([11, 12])))
    assert [m.metadata.dst_node_id for m in msgs] == [11, 12]
    sent = msgs[0].content["arrays"]
    assert set(sent) == {"A/l0" + BF16_SUFFIX, "head/classifier.weight"}  # the adapter in bfloat16, the head not
    assert sent["A/l0" + BF16_SUFFIX].dtype == "int16"  # bfloat16 bits (NumPy has no bfloat16)
    got = from_record(sent)
    assert torch.equal(got["A/l0"], state["A/l0"].to(torch.bfloat16).float())
    assert torch.equal(got["head/classifier.weight"], state["head/classifier.weight"])
    assert torch.equal(s._current["A/l0"], got["A/l0"])  # the server keeps what the clients decode
    assert s.round_log.get(1)["bytes_down"] == sent.count_bytes() * 2
    assert sent.count_bytes() < to_record(state).count_bytes()


def test_server_app_and_florg_build_the_same_strategy_from_a_config():
    from florg.fl import FLoRG

    cfg = load_config(None, ["method.rank=2", "method.florg.procrustes=top-r", "federation.fraction_train=0.5",
                             "federation.min_train_nodes=3", "federation.min_available_nodes=4", "seed=9",
                             "federation.max_norm=50", "federation.wire_dtype=float16", "federation.round_timeout=30",
                             "train.lr=0.02", "train.rounds=4", "train.lr_schedule=cosine"])
    ours, theirs = AdapterStrategy.from_config(FLoRGMethod(cfg), cfg), FLoRG(config=cfg)
    for s in (ours, theirs):
        assert (s.fraction_train, s.min_train_nodes, s.min_available_nodes) == (0.5, 3, 4)
        assert (s.seed, s.max_norm, s.wire_dtype, s.node_wait_timeout) == (9, 50, "float16", 30)
        assert [s.lr_fn(r) for r in (1, 4)] == [ours.lr_fn(1), ours.lr_fn(4)]
        assert s.run_config_json == client_view(cfg).to_json()  # the client's view: no server-only option
    assert theirs.config.to_dict() == cfg.to_dict()
    m = theirs.method.cfg.method
    assert (m.rank, m.florg.procrustes) == (2, "top-r")


def test_florg_keywords_never_silently_override_a_config():
    from florg.fl import FLoRG

    cfg = load_config(None, ["method.rank=8", "method.florg.procrustes=none", "federation.fraction_train=0.5",
                             "federation.min_train_nodes=3", "federation.min_available_nodes=5"])
    s = FLoRG(config=cfg)
    assert (s.config.method.rank, s.config.method.florg.procrustes) == (8, "none")
    assert (s.fraction_train, s.min_train_nodes, s.min_available_nodes) == (0.5, 3, 5)
    assert FLoRG(config=cfg, rank=8, fraction_train=0.5).config.method.rank == 8  # agreeing keywords are fine
    with pytest.raises(ValueError, match=r"rank=4.*config\.method\.rank = 8"):
        FLoRG(config=cfg, rank=4)
    with pytest.raises(ValueError, match=r"min_train_nodes=2.*config\.federation\.min_train_nodes = 3"):
        FLoRG(config=cfg, min_train_nodes=2)
    with pytest.raises(ValueError, match=r"num_rounds=9.*config\.train\.rounds = 5"):
        FLoRG(config=cfg, num_rounds=9)
    with pytest.raises(ValueError, match=r"method\.name = 'florg'.*'fedit'"):
        FLoRG(config=load_config(None, ["method.name=fedit"]))
    cfg.method.rank = 2  # the strategy keeps its own copy
    assert s.config.method.rank == 8


def test_florg_keywords_without_a_config_change_the_defaults():
    from florg.config import RunConfig, load_config
    from florg.fl import FLoRG

    s = FLoRG(rank=6, min_available_nodes=3)
    expected = load_config(None, ["method.rank=6", "federation.min_available_nodes=3"])  # FLoRG's recommended lrs
    assert s.config.to_dict() == expected.to_dict() and s.config.train.head_lr == 0.0125
    assert FLoRG(lr=0.002).config.train.head_lr == 0.0  # an lr given: the head follows it
    assert (s.wire_dtype, s.node_wait_timeout) == ("float32", RunConfig().federation.round_timeout)

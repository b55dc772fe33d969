"""One federated round in-process (no Ray): local GLUE-style files with sentence pairs, and SmolLM2."""

import csv

import pytest
import torch

from florg.adapters import florg_layers
from florg.config import load_config
from florg.methods.driver import run_round
from florg.run.experiment import build_experiment
from florg.train import cycle, make_optimizer, train_steps


def _one_round(exp, lr=5e-3):
    cfg, model, method = exp.cfg, exp.model, exp.method
    before = exp.evaluate()

    def train(model, info):
        opt = make_optimizer(model.parameters(), cfg.train, lr)
        train_steps(model, cycle(exp.client_loader(info.partition_id, info.server_round)), opt, cfg.train.local_steps)

    clients = range(len(exp.partitions))
    res = run_round(method, model, exp.initial_state, train, server_round=1, clients=clients,
                    weights=[len(exp.partitions[pid]) for pid in clients])
    method.load_global(model, res.state)
    return before, exp.evaluate(), res.state, res.diagnostics


def _write_rte(folder, n_train=48, n_test=16):
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    animals = ["cat", "dog", "horse", "bird", "fish", "cow"]
    for split, n in (("train", n_train), ("validation", n_test)):
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sentence1", "sentence2", "label"])
            for i in range(n):
                a = animals[int(torch.randint(len(animals), (1,), generator=rng))]
                same = i % 2 == 0
                b = a if same else animals[(animals.index(a) + 1) % len(animals)]
                w.writerow([f"The {a} sleeps in the barn.", f"A {b} is sleeping.", 0 if same else 1])


def test_glue_style_local_pairs_round(tmp_path):
    _write_rte(tmp_path / "rte")
    cfg = load_config(None, ["data.task=glue/rte", f"data.data_dir={tmp_path / 'rte'}", "data.num_clients=3",
                             "data.partition=iid", "train.local_steps=2", "train.batch_size=8", "model.max_length=32"])
    exp = build_experiment(cfg)
    assert exp.label_names and len(exp.partitions) == 3 and len(exp.test) == 16
    first = exp.partitions[0][0]
    assert 102 in first["input_ids"][1:-1]  # [SEP] between the two sentences of the pair
    before, after, new, diag = _one_round(exp)
    assert diag["agg_rel_error_max"] < 1e-10
    assert set(new) == set(exp.initial_state)
    assert 0.0 <= after["accuracy"] <= 1.0 and after["loss"] != before["loss"]


@pytest.mark.slow
def test_smollm2_round_non_square_layer():
    # Uses the default fp32 conversion cache (~/.cache/florg), shared with later runs.
    cfg = load_config(None, ["model.name=smollm2", "data.num_clients=2", "data.max_train_examples=32",
                             "data.max_test_examples=16", "train.local_steps=1", "train.batch_size=4",
                             "model.max_length=24", "method.rank=4", "seed=1"])
    exp = build_experiment(cfg)
    layers = florg_layers(exp.model)
    v = [name for name in layers if name.endswith("v_proj")]
    assert v and all(layers[n].florg_A["default"].shape == (4, 192) for n in v)  # k = min(576, 192)
    q = [name for name in layers if name.endswith("q_proj")]
    assert all(layers[n].florg_A["default"].shape == (4, 576) for n in q)
    before, after, new, diag = _one_round(exp, lr=1e-3)
    assert diag["agg_rel_error_max"] < 1e-10
    assert all(torch.isfinite(t).all() for t in new.values())
    assert after["loss"] != before["loss"]

"""Methods with client state or per-client payloads through the real Flower simulation (3 clients, 2 rounds).

FedSA-LoRA exercises the client's persistent state (its own B and head in ``Context.state``), the
client-side personalised evaluation and the evaluation-only uplink; FLoRA with heterogeneous
ranks exercises its stacked downlink (each client merging every pair into its own W0 correction,
kept in ``Context.state``) and exact stacking; FLoRG with heterogeneous ranks exercises per-client
downlinks (each client receives its own r_n rows). The byte counts in ``metrics.jsonl`` are
checked against the payloads the method builds in this process and against the formulas. FedSA-LoRA also runs on the
extractive-QA family (WordNet QA, a tiny BERT encoder with a fresh span head): its personalised
evaluation scores each client's own model by F1 weighted with the client's label shares.
"""

import json
import math

import pytest
import torch

from florg.config import load_config
from florg.fl.records import to_record
from florg.fl.simulation import run_simulation_engine
from florg.methods.base import ClientInfo, split_eval, wire_state
from florg.run.experiment import get_experiment
from florg.run.rundir import RunDir
from helpers import save_tiny_llama

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]


def _run(tiny_overrides, tmp, name, extra):
    overrides = [*tiny_overrides, "method.fedsa-lora.personal_eval_examples=40"]
    cfg = load_config(None, [*overrides, f"out_dir={tmp}", f"name={name}", *extra])
    run_dir = RunDir.create(cfg)
    summary = run_simulation_engine(cfg, run_dir, reporter=lambda row: None)
    return cfg, run_dir, summary


@pytest.fixture(scope="module")
def fedsa(tmp_path_factory, tiny_overrides):
    return _run(tiny_overrides, tmp_path_factory.mktemp("fedsa"), "fedsa", ["method.name=fedsa-lora"])


@pytest.fixture(scope="module")
def fedsa_qa(tmp_path_factory, tiny_overrides, tiny_qa_model):
    return _run(tiny_overrides, tmp_path_factory.mktemp("fedsa-qa"), "fedsa-qa",
                ["method.name=fedsa-lora", "data.task=wordnet-qa", f"model.name={tiny_qa_model}", "model.max_length=48",
                 "data.max_answer_length=8"])


@pytest.fixture(scope="module")
def flora(tmp_path_factory, tiny_overrides):
    return _run(tiny_overrides, tmp_path_factory.mktemp("flora"), "flora", ["method.name=flora", "method.client_ranks=[2,4,8]"])


@pytest.fixture(scope="module")
def florg_hetero(tmp_path_factory, tiny_overrides):
    return _run(tiny_overrides, tmp_path_factory.mktemp("florg"), "florg",
                ["method.name=florg", "method.client_ranks=[2,4,8]"])


def test_fedsa_lora_personalised_and_global(fedsa):
    cfg, run_dir, summary = fedsa
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"
    rows = run_dir.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "personal_accuracy" not in rows[0]
    exp = get_experiment(cfg)
    protocol, eval_only = split_eval(exp.method.upload(exp.model))
    up, up_eval = to_record(protocol).count_bytes(), to_record(eval_only).count_bytes()
    down = to_record(wire_state(exp.initial_state)).count_bytes()
    for r in rows[1:]:
        assert r["participants"] == 3 and r["personal_clients"] == 3
        assert 0.0 <= r["personal_accuracy_min"] <= r["personal_accuracy"] <= r["personal_accuracy_max"] <= 1.0
        assert r["bytes_up"] == 3 * up and r["bytes_up_eval"] == 3 * up_eval  # A only; B apart
        assert r["bytes_down"] == 3 * down and r["bytes_down_eval"] == 3 * down
        assert r["bytes_down_head"] == 0 and r["bytes_up_head"] == 0  # every client keeps its own head
        assert 0.0 < r["sent_rel_error_max"] < 1.0  # the constructed global model is not exact
        assert "test_accuracy" in r and r["round_rel_error_max"] > 0
    assert summary["personal_accuracy_after"] == rows[-1]["personal_accuracy"]
    assert not any(".lora_B." in k for k in wire_state(exp.initial_state))
    assert (run_dir.path / "adapter" / "adapter_config.json").is_file()


def test_fedsa_lora_personalised_evaluation_on_extractive_qa(fedsa_qa):
    cfg, run_dir, summary = fedsa_qa
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"
    rows = run_dir.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2] and "personal_f1" not in rows[0]
    exp = get_experiment(cfg)
    protocol, eval_only = split_eval(exp.method.upload(exp.model))
    # the span head stays with the client (it goes up for evaluation only, like B)
    assert not any("qa_outputs" in k for k in protocol) and any("qa_outputs" in k for k in eval_only)
    up, up_eval = to_record(protocol).count_bytes(), to_record(eval_only).count_bytes()
    for r in rows:
        assert 0.0 <= r["test_exact_match"] <= r["test_f1"] <= 1.0 and "test_accuracy" not in r
    for r in rows[1:]:
        assert r["participants"] == 3 and r["personal_clients"] == 3
        assert 0.0 <= r["personal_f1_min"] <= r["personal_f1"] <= r["personal_f1_max"] <= 1.0
        assert "personal_accuracy" not in r
        assert r["bytes_up"] == 3 * up and r["bytes_up_eval"] == 3 * up_eval
    assert summary["metric"] == "f1" and summary["personal_f1_after"] == rows[-1]["personal_f1"]
    # what one client reports: its own model (own B, global A) on the personal subset, F1 by its label shares
    exp.method.client_load(exp.model, wire_state(exp.initial_state), ClientInfo(0, 1), {})
    res = exp.evaluate(exp.personal_eval_set())
    assert res["examples"] == 40  # method.fedsa-lora.personal_eval_examples
    counts = exp.partition_summary[0]["label_counts"]
    shared = {c: n for c, n in enumerate(counts) if n > 0 and res["label_total"].get(c, 0) > 0}
    assert shared  # WordNet QA: the test split has the clients' lexicographer categories
    expected = sum(n * res["label_f1"][c] / res["label_total"][c] for c, n in shared.items()) / sum(shared.values())
    assert exp.family.client_score(res, counts) == pytest.approx(expected)
    assert sum(res["label_total"].values()) == 40 and sum(res["label_f1"].values()) == pytest.approx(40 * res["f1"])


def _overhead(state):
    return sum(128 + len(k) for k in state)


def test_flora_heterogeneous_ranks_stacked_downlink(flora):
    cfg, run_dir, summary = flora
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"
    rows = run_dir.read_metrics()
    exp = get_experiment(cfg)
    wire = wire_state(exp.initial_state)  # round 1: empty stacked pairs, the counter and the head
    up = 0
    for pid in range(3):
        exp.method.client_load(exp.model, wire, ClientInfo(pid, 1), {})
        up += to_record(exp.method.upload(exp.model)).count_bytes()
    dims = [(v.shape[0], v.shape[1]) for k, v in exp.initial_state.items() if k.endswith(".w0_delta")]
    head = sum(v.numel() for k, v in wire.items() if k.startswith("head/"))
    for r, ranks in zip(rows[1:], ([], [2, 4, 8])):  # round 2 carries round 1's pair: sum r_j = 14
        pair = sum(exp.method.wire_numel(m, n, 4, None, ranks)[1] for m, n in dims)
        assert r["participants"] == 3 and r["stacked_rank"] == 2 + 4 + 8
        assert r["agg_rel_error_max"] < 1e-6 and r["sent_rel_error_max"] < 1e-6  # exact
        assert r["round_rel_error_max"] < 1e-5
        assert r["bytes_down"] == 3 * (4 * (pair + 1 + head) + _overhead(wire)) and r["bytes_up"] == up
    from safetensors.torch import load_file

    deltas = load_file(str(run_dir.path / "base_delta.safetensors"))
    assert len(deltas) == 12 and all(float(v.abs().max()) > 0 for v in deltas.values())
    assert all(torch.isfinite(v).all() for v in deltas.values())


# ----------------------------------------------------------------------------- instruction tuning (causal LM)


@pytest.fixture(scope="module")
def fedsa_instruct(tmp_path_factory, tiny_overrides):
    """FedSA-LoRA on a tiny random Llama and a small Alpaca JSONL: personalised evaluation by loss."""
    base = tmp_path_factory.mktemp("fedsa-instruct")
    model = save_tiny_llama(base / "llama")
    rows = [{"instruction": f"Name the number {i}", "output": f"number {i}", "category": "abc"[i % 3]} for i in range(90)]
    (base / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ["method.name=fedsa-lora", f"model.name={model}", f"data.task=instruct:{base / 'data.jsonl'}",
             "model.max_length=40", "eval.generate_examples=3", "eval.max_new_tokens=4", "train.lr=0.02"]
    return _run(tiny_overrides, base, "fedsa-instruct", extra)


def test_fedsa_lora_instruction_tuning_reports_loss_everywhere(fedsa_instruct):
    cfg, run_dir, summary = fedsa_instruct
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"
    rows = run_dir.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["test_perplexity"] == pytest.approx(math.exp(r["test_loss"]))
        assert "test_accuracy" not in r
    for r in rows[1:]:
        assert r["personal_clients"] == 3 and "personal_accuracy" not in r
        assert 0.0 < r["personal_loss_min"] <= r["personal_loss"] <= r["personal_loss_max"]
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    assert summary["metric"] == "loss" and summary["loss_before"] == rows[0]["test_loss"]
    assert summary["personal_loss_after"] == rows[-1]["personal_loss"]
    assert 0.0 <= summary["rouge_l_before"] <= 1.0 and 0.0 <= summary["rouge_l_after"] <= 1.0
    gens = [json.loads(x) for x in (run_dir.path / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3 and all({"before", "after", "reference", "prompt"} <= set(g) for g in gens)
    assert (run_dir.path / "plots" / "loss_vs_round.png").is_file()
    assert (run_dir.path / "adapter" / "adapter_config.json").is_file()


def test_florg_heterogeneous_ranks_per_client_downlinks(florg_hetero):
    cfg, run_dir, summary = florg_hetero
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"
    rows = run_dir.read_metrics()
    exp = get_experiment(cfg)
    wire = wire_state(exp.initial_state)
    assert all(v.shape[0] == 8 for k, v in wire.items() if k.startswith("A/"))  # the global factor: r_max rows
    downs = [exp.method.client_downlink(wire, pid) for pid in range(3)]
    for pid, down in enumerate(downs):  # client pid has rank (2, 4, 8)[pid]: it receives that many rows
        assert {tuple(v.shape) for k, v in down.items() if k.startswith("A/")} == {((2, 4, 8)[pid], 384)}
    expected_down = sum(to_record(d).count_bytes() for d in downs)
    for r in rows[1:]:
        assert r["participants"] == 3 and r["rank_q_mean"] == 2 + 4 + 8  # Q from r_n x k uploads, all kept
        assert r["agg_rel_error_max"] < 1e-6  # exact Gram aggregate with mixed ranks
        assert r["bytes_down"] == expected_down and r["bytes_up"] == expected_down  # r_n k each way, + head
        assert 0 < r["round_rel_error_max"] < 1 and abs(r["delta_proc_mean"]) < 1e-6
    assert rows[-1]["test_accuracy"] >= 0.0

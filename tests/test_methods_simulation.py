"""Two baselines through the real Flower simulation (3 clients, 2 rounds each).

FedSA-LoRA exercises the client's persistent state (its own B in ``Context.state``), the
client-side personalised evaluation and the evaluation-only uplink; FLoRA with heterogeneous
ranks exercises stateless clients rebuilding W0 from the message (dense downlink) and exact
stacking. The byte counts in ``metrics.jsonl`` are checked against the payloads the method builds
in this process (the matrix test ties those to the formulas).
"""

import json

import pytest
import torch

from florg.config import load_config
from florg.fl.records import to_record
from florg.fl.simulation import run_simulation_engine
from florg.methods.base import ClientInfo, split_eval, wire_state
from florg.run.experiment import get_experiment
from florg.run.rundir import RunDir

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
def flora(tmp_path_factory, tiny_overrides):
    return _run(tiny_overrides, tmp_path_factory.mktemp("flora"), "flora", ["method.name=flora", "method.client_ranks=[2,4,8]"])


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
        assert 0.0 < r["sent_rel_error_max"] < 1.0  # the named global model is not exact
    assert summary["personal_accuracy_after"] == rows[-1]["personal_accuracy"]
    assert not any(".lora_B." in k for k in wire_state(exp.initial_state))
    assert (run_dir.path / "adapter" / "adapter_config.json").is_file()


def test_flora_heterogeneous_ranks_stateless_clients(flora):
    cfg, run_dir, summary = flora
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"
    rows = run_dir.read_metrics()
    exp = get_experiment(cfg)
    down = to_record(wire_state(exp.initial_state)).count_bytes()  # the dense W0 correction (+ head)
    up = 0
    for pid in range(3):
        exp.method.client_load(exp.model, wire_state(exp.initial_state), ClientInfo(pid, 1), {})
        up += to_record(exp.method.upload(exp.model)).count_bytes()
    for r in rows[1:]:
        assert r["participants"] == 3 and r["stacked_rank"] == 2 + 4 + 8
        assert r["agg_rel_error_max"] < 1e-6 and r["sent_rel_error_max"] < 1e-6  # exact
        assert r["bytes_down"] == 3 * down and r["bytes_up"] == up
    from safetensors.torch import load_file

    deltas = load_file(str(run_dir.path / "base_delta.safetensors"))
    assert len(deltas) == 12 and all(float(v.abs().max()) > 0 for v in deltas.values())
    assert all(torch.isfinite(v).all() for v in deltas.values())

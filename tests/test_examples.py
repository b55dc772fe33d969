"""The example Flower Apps under examples/, each run with ``flwr run`` on a tiny config.

Each test starts a SuperLink and two SuperNodes as processes (the ``deployments`` fixture, own
FLWR_HOME and ports, everything stopped by PID afterwards), runs the example app with
``flwr run <app> --run-config`` on a tiny random model, and checks that it trained and that its
saved adapter loads with PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from florg.fl.deploy import pid_alive
from helpers import RUN_TIMEOUT, tiny_qa_checkpoint

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(dep, app: Path, run_config: dict) -> None:
    with dep:
        result = dep.run(app, run_config=run_config, timeout=RUN_TIMEOUT)
        logs = "\n".join(f"--- {name}: {path.read_text()[-3000:]}" for name, path in dep.logs().items())
        assert result.ok, f"flwr run: rc={result.returncode} status={result.status}\n{result.output[-4000:]}\n{logs}"
        pids = dep.all_pids()
    assert not [pid for pid in pids if pid_alive(pid)]


def test_quickstart_florg_example(deployments, tmp_path):
    model_dir = tiny_qa_checkpoint(tmp_path / "tiny-bert")
    out = tmp_path / "out"
    dep = deployments(num_supernodes=2, insecure=True)
    _run(dep, EXAMPLES / "quickstart-florg", {
        "num-server-rounds": 2, "local-steps": 4, "batch-size": 8, "lr": 0.01, "model": model_dir,
        "max-length": 24, "max-train-examples": 120, "max-test-examples": 60, "out-dir": str(out),
    })
    history = json.loads((out / "history.json").read_text())
    assert [row["round"] for row in history] == [0, 1, 2]
    assert history[0]["loss"] != history[-1]["loss"]  # the global model changed

    from peft import AutoPeftModelForSequenceClassification, get_peft_model_state_dict

    import florg  # noqa: F401  (registers the FLoRG PEFT type)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "FLORG" and config["task_type"] == "SEQ_CLS"
    labels = json.loads((out / "labels.json").read_text())["labels"]
    assert labels and len(set(labels)) == len(labels)
    model = AutoPeftModelForSequenceClassification.from_pretrained(  # as the example's README loads it
        str(out), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    state = get_peft_model_state_dict(model)
    assert any(k.endswith(".florg_A") for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_flowertune_florg_example(deployments, tmp_path):
    from helpers import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    data = tmp_path / "train.jsonl"
    words = ["cat", "dog", "mat", "plant", "food", "flour", "leaf", "animal", "mammal", "companion"]
    data.write_text("".join(
        json.dumps({"instruction": f"What does the word '{w}' mean?", "input": "",
                    "output": f"the {w} sat on the mat; a small {words[(i + 3) % len(words)]}"}) + "\n"
        for i, w in enumerate(words * 3)
    ))
    out = tmp_path / "out"
    dep = deployments(num_supernodes=2, insecure=True)
    _run(dep, EXAMPLES / "flowertune-florg", {
        "num-server-rounds": 2, "dataset.name": f"instruct:{data}", "model.name": model_dir, "model.max-length": 32,
        "model.florg.rank": 4, "train.local-steps": 4, "train.batch-size": 4, "train.learning-rate-max": 0.01,
        "train.learning-rate-min": 0.001, "train.save-path": str(out),
    })
    history = json.loads((out / "history.json").read_text())
    assert [row["round"] for row in history] == [0, 1, 2]
    assert history[-1]["loss"] < history[0]["loss"]  # the test loss went down

    from peft import AutoPeftModelForCausalLM, get_peft_model_state_dict

    import florg  # noqa: F401  (registers the FLoRG PEFT type)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "FLORG" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))  # as the example's README loads it
    assert sum(k.endswith(".florg_A") for k in get_peft_model_state_dict(model)) == 4  # q_proj, v_proj x 2 layers

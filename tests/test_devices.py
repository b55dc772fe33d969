"""Device selection, dtype checks and settings a client cannot run with (CPU only: CUDA is faked where needed).

The GPU code paths themselves run in ``benchmarks/gpu_check.sh`` on a machine with a GPU; here
``torch.cuda`` is monkeypatched to pretend one exists where the logic only asks about it.
"""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from florg.config import ConfigError, load_config
from florg.device import (
    EVAL_MEMORY_FIX,
    TRAIN_MEMORY_FIX,
    DeviceMemoryError,
    base_dtype,
    check_dtype,
    memory_guard,
    resolve_device,
)
from florg.fl import simulation


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend ``n`` CUDA devices are visible (only the queries florg makes; nothing runs on them)."""

    def install(n, bf16=True, name="Fake GPU"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if bf16 else (7, 5))

    return install


# ----------------------------------------------------------------------------- train.device
def test_cpu_and_auto_without_a_gpu_are_the_cpu(fake_gpus):
    fake_gpus(0)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert load_config(None, []).train.device == "auto"  # the default: the CPU on a machine without a GPU


def test_cuda_without_a_gpu_is_one_line_naming_the_setting(fake_gpus):
    fake_gpus(0)
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError) as err:
            resolve_device(spec)
        text = str(err.value)
        assert "\n" not in text and text.startswith("config key 'train.device'")
        assert "no CUDA device is available" in text and "'cpu' or 'auto'" in text


def test_cuda_devices_when_gpus_are_visible(fake_gpus):
    fake_gpus(2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"only 2 CUDA device\(s\) are visible \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_device_strings_are_checked_when_the_config_loads():
    for bad in ("gpu", "cuda:x", "cuda:", "mps", "CPU0"):
        with pytest.raises(ConfigError, match="config key 'train.device'"):
            load_config(None, [f"train.device={bad}"])
    for good in ("auto", "cpu", "cuda", "cuda:0", "cuda:12"):
        assert load_config(None, [f"train.device={good}"]).train.device == good


def test_a_supernodes_node_config_device_overrides_train_device(fake_gpus):
    from florg.fl.client_app import client_device

    fake_gpus(2)
    cfg = load_config(None, ["train.device=cuda:0"])
    node = types.SimpleNamespace(node_config={"partition-id": 0, "device": "cuda:1"})
    assert client_device(node, cfg) == torch.device("cuda", 1)
    plain = types.SimpleNamespace(node_config={"partition-id": 0})
    assert client_device(plain, cfg) == torch.device("cuda", 0)
    fake_gpus(1)
    with pytest.raises(ConfigError, match="node config key 'device': 'cuda:1' but only 1"):
        client_device(node, cfg)


# ----------------------------------------------------------------------------- model.dtype
def test_dtypes_the_device_cannot_do(fake_gpus):
    check_dtype(torch.bfloat16, torch.device("cpu"))  # bfloat16 works on the CPU
    check_dtype(torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="config key 'model.dtype': 'float16' needs a CUDA device"):
        check_dtype(torch.float16, torch.device("cpu"))
    fake_gpus(1, bf16=False, name="Tesla T4")
    with pytest.raises(ConfigError) as err:
        check_dtype(torch.bfloat16, torch.device("cuda", 0))
    assert "'bfloat16' is not supported by Tesla T4 (compute capability 7.5" in str(err.value)
    check_dtype(torch.float16, torch.device("cuda", 0))
    fake_gpus(1, bf16=True)
    check_dtype(torch.bfloat16, torch.device("cuda", 0))
    assert base_dtype("float16") is torch.float16 and base_dtype("bfloat16") is torch.bfloat16


def test_model_dtype_accepts_float16_and_every_method_accepts_half_bases():
    from florg.methods import METHODS, get_method

    for dtype in ("bfloat16", "float16"):
        for name in METHODS:  # FeDeRA, FedEx-LoRA and FLoRA used to refuse half-precision bases
            get_method(load_config(None, [f"method.name={name}", f"model.dtype={dtype}"]))
    with pytest.raises(ConfigError, match="model.dtype"):
        load_config(None, ["model.dtype=float64"])


# ----------------------------------------------------------------------------- running out of memory
def test_out_of_memory_becomes_one_line_naming_the_settings():
    with pytest.raises(DeviceMemoryError) as err, memory_guard(torch.device("cpu"), "training", TRAIN_MEMORY_FIX):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore details")
    text = str(err.value)
    assert "\n" not in text and text.startswith("config key 'train.batch_size': out of memory on cpu during training")
    assert "Tried to allocate 2.00 GiB" in text
    assert "train.grad_accum" in text and "train.gradient_checkpointing=true" in text
    assert isinstance(err.value, ConfigError)
    with pytest.raises(DeviceMemoryError, match="config key 'eval.batch_size'.*lower eval.batch_size"), \
            memory_guard(torch.device("cpu"), "evaluation", EVAL_MEMORY_FIX):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
    with pytest.raises(ValueError, match="unrelated"), \
            memory_guard(torch.device("cpu"), "training", TRAIN_MEMORY_FIX):  # other errors pass through unchanged
        raise ValueError("unrelated")


# ----------------------------------------------------------------------------- simulation and GPUs
def test_simulation_gpu_settings(fake_gpus, monkeypatch):
    def cfg(*overrides):
        return load_config(None, ["data.num_clients=4", *overrides])

    fake_gpus(0)
    simulation.check_gpu_settings(cfg())  # the CPU default
    with pytest.raises(ConfigError, match="config key 'train.device': 'cuda' but no CUDA device"):
        simulation.check_gpu_settings(cfg("train.device=cuda"))
    with pytest.raises(ConfigError, match="config key 'federation.client_gpus': 0.5 GPUs per client but no CUDA"):
        simulation.check_gpu_settings(cfg("federation.client_gpus=0.5"))
    assert simulation.backend_config(cfg())["init_args"]["num_gpus"] == 0

    fake_gpus(2)
    with pytest.raises(ConfigError, match="reserve no GPU.*set federation.client_gpus"):
        simulation.check_gpu_settings(cfg("train.device=cuda"))
    with pytest.raises(ConfigError, match="Ray assigns each client its GPU"):
        simulation.check_gpu_settings(cfg("train.device=cuda:1", "federation.client_gpus=1"))
    with pytest.raises(ConfigError, match="this machine has 2"):
        simulation.check_gpu_settings(cfg("federation.client_gpus=3"))
    simulation.check_gpu_settings(cfg("train.device=cuda", "federation.client_gpus=0.5"))
    backend = simulation.backend_config(cfg("federation.client_gpus=0.5"))
    assert backend["client_resources"]["num_gpus"] == 0.5 and backend["init_args"]["num_gpus"] == 2
    warned = []
    monkeypatch.setattr("flwr.common.logger.log", lambda level, msg, *args: warned.append(msg % args))
    simulation.check_gpu_settings(cfg())  # auto with idle GPUs: allowed, with a hint
    assert len(warned) == 1 and "federation.client_gpus=0" in warned[0] and "train on the CPU" in warned[0]


# ----------------------------------------------------------------------------- a client that cannot run
BASE = ["train.local_steps=1", "train.batch_size=8", "data.max_train_examples=200", "data.max_test_examples=40",
        "model.max_length=24", "data.num_clients=2", "federation.min_train_nodes=2",
        "federation.min_available_nodes=2", "data.partition=iid"]


def _train_message(*overrides, node_config=None):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from florg.fl.records import CONFIG_KEY, to_record
    from florg.run.experiment import get_experiment

    cfg = load_config(None, BASE + list(overrides))
    exp = get_experiment(cfg)
    content = RecordDict({"arrays": to_record(exp.initial_state),
                          "config": ConfigRecord({"server-round": 1, "lr": 1e-3, CONFIG_KEY: cfg.to_json()})})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2, **(node_config or {})},
                      state=RecordDict(), run_config={})
    return msg, context


def test_client_replies_with_a_setting_error_and_the_server_stops_the_run(flower_task):
    from florg.fl import faults
    from florg.fl.client_app import SETTING_ERROR
    from florg.fl.client_app import app as production
    from florg.fl.strategy import AdapterStrategy, ClientSettingError
    from florg.methods import get_method

    msg, context = _train_message(node_config={"device": "cuda:3"})  # this machine has no GPU
    reply = production(msg, context)
    assert reply.has_error() and reply.error.reason.startswith(SETTING_ERROR)
    assert "partition 0: node config key 'device': 'cuda:3' but no CUDA device" in reply.error.reason

    msg, context = _train_message("federation.faults=oom@0")
    reply = faults.app(msg, context)  # the forward pass runs out of (device) memory
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith(SETTING_ERROR + "partition 0: config key 'train.batch_size': out of memory on cpu")
    assert "train.grad_accum" in reason and "train.gradient_checkpointing" in reason and "\n" not in reason

    cfg = load_config(None, BASE)
    strategy = AdapterStrategy.from_config(get_method(cfg), cfg)
    with pytest.raises(ClientSettingError, match=r"^partition 0: config key 'train.batch_size': out of memory"):
        strategy.aggregate_train(1, [reply])


def test_client_trains_with_accumulation_and_checkpointing(flower_task):
    from florg.fl.client_app import app as production

    msg, context = _train_message("train.grad_accum=4", "train.gradient_checkpointing=true", "train.local_steps=2")
    reply = production(msg, context)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert reply.content["metrics"]["train_loss"] > 0 and len(reply.content["arrays"]) > 0


# ----------------------------------------------------------------------------- failed run, fixed, resumed
@pytest.mark.slow
def test_out_of_memory_fails_the_run_and_resume_works_after_the_fix(tmp_path):
    """A client runs out of memory: status 'failed' with the reason; `--resume --set train.grad_accum=2` finishes it."""
    from florg.fl import faults
    from florg.run.rundir import RunDir

    cfg = load_config(None, BASE + ["train.rounds=2", f"out_dir={tmp_path}", "name=oom", "federation.faults=oom@1"])
    run_dir = RunDir.create(cfg)
    with pytest.raises(simulation.RunFailed) as err:
        simulation.run_simulation_engine(cfg, run_dir, reporter=lambda row: None, client_app=faults.app)
    status = run_dir.status()
    assert status["status"] == "failed"
    assert "partition 1: config key 'train.batch_size': out of memory" in status["error"]
    assert "config key 'train.batch_size'" in str(err.value)

    env = dict(os.environ)
    bad = subprocess.run([sys.executable, "-m", "florg.cli.main", "run", "--resume", str(run_dir.path),
                          "--set", "train.lr=0.1"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "do not change what the run computes" in bad.stderr and "not train.lr" in bad.stderr
    # the production ClientApp ignores federation.faults: the "fixed" client runs with the new setting
    done = subprocess.run([sys.executable, "-m", "florg.cli.main", "run", "--resume", str(run_dir.path),
                           "--set", "train.grad_accum=2"], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert run_dir.status()["status"] == "complete"
    rows = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["participants"] == 2 for r in rows[1:])
    assert "grad_accum = 2" in (run_dir.path / "config.toml").read_text()

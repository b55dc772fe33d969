"""Checkpoints without pickle: safetensors + JSON, written atomically, refused when crafted or damaged."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from florg.config import load_config
from florg.fl.privacy import PrivacyLedger
from florg.run.checkpoint import CheckpointError, load_checkpoint, restore_rng, save_checkpoint


class _TouchOnUnpickle:
    """Unpickling this object creates ``marker``: what a crafted checkpoint could do with any code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _payload(rnd=3):
    cfg = load_config(None, ["privacy.mode=central", "method.weighting=uniform"])
    ledger = PrivacyLedger(cfg)
    for _ in range(rnd):
        ledger.release(20)
    g = torch.Generator().manual_seed(rnd)
    state = {"A/bert.encoder.layer.0.attention.self.query": torch.randn(4, 32, generator=g),
             "head/classifier.weight": torch.randn(3, 32, generator=g),
             "server/count": torch.arange(5)}
    return {"round": rnd, "state": state, "cumulative": {"bytes_up": 1234, "bytes_down": 5678},
            "node_partition": {9_876_543_210_123: 0, 17: 4}, "config": cfg.to_dict(),
            "privacy": ledger.state_dict()}, ledger


def test_round_trip_is_exact_and_restores_every_rng(tmp_path):
    payload, ledger = _payload()
    random.gauss(0.0, 1.0)  # leaves a cached Gaussian in Python's RNG state
    np.random.standard_normal()
    save_checkpoint(tmp_path, payload)
    expected = (random.random(), random.gauss(0.0, 1.0), np.random.rand(), np.random.standard_normal(), torch.rand(3))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[1] == "checkpoint.json"
    assert re.fullmatch(r"checkpoint-000003-[0-9a-f]{16}\.safetensors", files[0])

    ckpt = load_checkpoint(tmp_path)
    restore_rng(ckpt)
    got = (random.random(), random.gauss(0.0, 1.0), np.random.rand(), np.random.standard_normal(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])
    assert ckpt["round"] == 3 and ckpt["cumulative"] == payload["cumulative"]
    assert ckpt["node_partition"] == payload["node_partition"] and ckpt["config"] == payload["config"]
    assert ckpt["state"].keys() == payload["state"].keys()
    for key, value in payload["state"].items():
        assert ckpt["state"][key].dtype == value.dtype and torch.equal(ckpt["state"][key], value), key
    fresh = PrivacyLedger(load_config(None, ["privacy.mode=central", "method.weighting=uniform"]))
    fresh.load_state_dict(ckpt["privacy"])  # the accountant's state is plain JSON
    assert fresh.releases == 3 and fresh.epsilon() == ledger.epsilon()


def test_the_state_keeps_its_key_order(tmp_path):
    """safetensors sorts names; the layer order decides later floating-point sums, so it is kept."""
    payload, _ = _payload()
    payload["state"] = {f"A/layer{i}": torch.full((2, 3), float(i)) for i in (3, 10, 1, 2)}
    save_checkpoint(tmp_path, payload)
    assert list(load_checkpoint(tmp_path)["state"]) == ["A/layer3", "A/layer10", "A/layer1", "A/layer2"]


def test_a_newer_checkpoint_replaces_the_pair_and_leaves_no_stale_tensor_file(tmp_path):
    save_checkpoint(tmp_path, _payload(1)[0])
    save_checkpoint(tmp_path, _payload(2)[0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors")[0].startswith("checkpoint-000002-")
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob(".*"))
    assert load_checkpoint(tmp_path)["round"] == 2


def test_no_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path) is None


def test_a_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"round": 1, "state": {}, "payload": _TouchOnUnpickle(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "checkpoint.pt") in message and "pickle" in message and "without --resume" in message
    assert not marker.exists()
    # A valid new-format pair next to it does not make the pickle acceptable.
    save_checkpoint(tmp_path, _payload()[0])
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(tmp_path)
    assert not marker.exists()
    # Control: the file really is hostile (unpickling it creates the marker).
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def _run_cli_resume(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "florg.cli.main", "run", "--resume", str(run_dir)],
                          capture_output=True, text=True, timeout=120)


def test_cli_resume_refuses_a_crafted_pickle_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("[train]\nrounds = 2\n")
    (run_dir / "status.json").write_text('{"status": "running"}')
    marker = tmp_path / "pwned"
    torch.save(_TouchOnUnpickle(marker), run_dir / "checkpoint.pt")
    res = _run_cli_resume(run_dir)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(run_dir / "checkpoint.pt") in errors[0] and "without --resume" in errors[0]
    assert "Traceback" not in res.stderr
    assert not marker.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.toml", "status.json"]


def _tensor_file(folder: Path) -> Path:
    (path,) = folder.glob("checkpoint-*.safetensors")
    return path


def test_a_changed_tensor_file_is_refused(tmp_path):
    save_checkpoint(tmp_path, _payload()[0])
    path = _tensor_file(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0x01  # one bit of one tensor
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"does not match checkpoint\.json") as err:
        load_checkpoint(tmp_path)
    assert path.name in str(err.value) and "without --resume" in str(err.value)


def test_a_tensor_file_from_another_checkpoint_is_refused(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    save_checkpoint(old, _payload(2)[0])
    save_checkpoint(new, _payload(3)[0])
    _tensor_file(new).write_bytes(_tensor_file(old).read_bytes())  # the pair no longer belongs together
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(new)


def test_a_missing_tensor_file_is_refused(tmp_path):
    save_checkpoint(tmp_path, _payload()[0])
    _tensor_file(tmp_path).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("edit", ["round", "cumulative", "tensor_name", "not_json", "format"])
def test_an_edited_checkpoint_json_is_refused(tmp_path, edit):
    save_checkpoint(tmp_path, _payload()[0])
    path = tmp_path / "checkpoint.json"
    body = json.loads(path.read_text())
    if edit == "round":
        body["round"] = 2
    elif edit == "cumulative":
        body["cumulative"]["bytes_up"] += 1
    elif edit == "tensor_name":  # pointing outside the run directory is not even looked at
        body["tensors"]["file"] = "../../etc/passwd"
    elif edit == "format":
        body["format"] = "something-else"
    path.write_text("{not json" if edit == "not_json" else json.dumps(body))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert str(path) in str(err.value) and "without --resume" in str(err.value)


def test_a_re_signed_json_with_another_round_is_refused_by_the_tensor_file(tmp_path):
    """Even a consistent-looking JSON must agree with the round recorded inside the tensor file."""
    from florg.run.checkpoint import _body_digest

    save_checkpoint(tmp_path, _payload()[0])
    path = tmp_path / "checkpoint.json"
    body = json.loads(path.read_text())
    body["round"] = 7
    body["sha256"] = _body_digest(body)
    path.write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"round \(3\) differs"):
        load_checkpoint(tmp_path)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import florg.run.checkpoint as ck

    save_checkpoint(tmp_path, _payload(1)[0])
    real = ck._write_atomic

    def fail_on_json(path, data):
        if path.name == "checkpoint.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(ck, "_write_atomic", fail_on_json)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _payload(2)[0])
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["round"] == 1  # the old pair is intact; the new tensor file is unused

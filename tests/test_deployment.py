"""Multi-process deployment: a SuperLink and two SuperNodes as separate processes, then ``flwr run``.

Each test starts its processes on free loopback ports with its own FLWR_HOME (under tmp_path).
The insecure (explicit ``insecure=True``) and the TLS test run the tiny config for 2 rounds
through florg's Flower App and check the run directory; two short tests check the clean-up when
the body or the start fails (the first with the default: TLS with throwaway certificates). The
``deployments`` fixture (conftest.py) stops exactly the processes the test started (and the helpers they spawned), by PID,
also when the test fails, and then checks that those PIDs are gone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florg.fl.deploy import APP_DIR, DeploymentError, LocalDeployment, TLSFiles, pid_alive
from helpers import RUN_TIMEOUT

pytestmark = pytest.mark.slow


def _check_run_dir(run_dir: Path, rounds: int = 2, metric: str = "accuracy") -> None:
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "complete", status
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [row["round"] for row in rows] == list(range(rounds + 1))
    for row in rows:
        assert 0.0 <= row[f"test_{metric}"] <= 1.0
    for row in rows[1:]:  # round 0 is the initial evaluation, nothing uploaded yet
        assert row["bytes_up"] > 0
        assert row["bytes_down"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == rounds and summary["metric"] == metric
    assert summary["bytes_up_total"] == sum(row["bytes_up"] for row in rows)


def _run_and_check(dep: LocalDeployment, run_dir: Path, overrides: list[str], metric: str = "accuracy",
                   timeout: float = RUN_TIMEOUT):
    with dep:
        assert len(dep.pids) == 3  # SuperLink + 2 SuperNodes
        assert all(pid_alive(pid) for pid in dep.pids)
        result = dep.run(APP_DIR, overrides=overrides, run_dir=run_dir, timeout=timeout)
        logs = "\n".join(f"--- {name}: {path}" for name, path in dep.logs().items())
        assert result.ok, f"flwr run: rc={result.returncode} status={result.status}\n{result.output[-4000:]}\n{logs}"
        assert result.run_id is not None
        _check_run_dir(run_dir, metric=metric)
        pids = dep.all_pids()
    assert not [pid for pid in pids if pid_alive(pid)]
    return result


def test_deployment_insecure(deployments, tmp_path, tiny_overrides):
    dep = deployments(num_supernodes=2, insecure=True)  # testing only, and only when asked for
    overrides = [*tiny_overrides, "data.num_clients=2", "data.max_train_examples=200", "data.max_test_examples=100",
                 "federation.round_timeout=90"]
    result = _run_and_check(dep, tmp_path / "run", overrides)
    assert "round 2: train: 2/2 clients replied" in result.output  # the ServerApp's progress log (docs/progress.md)
    config = (dep.flwr_home / "config.toml").read_text()
    assert "insecure = true" in config and dep.address in config


def test_deployment_extractive_qa(deployments, tmp_path, tiny_overrides):
    """The same Flower App on the extractive-QA family (WordNet QA, MiniLM with a span head)."""
    dep = deployments(num_supernodes=2, insecure=True)
    overrides = [*tiny_overrides, "data.num_clients=2", "data.max_train_examples=200", "data.max_test_examples=100",
                 "federation.round_timeout=90", "data.task=wordnet-qa", "model.max_length=48", "data.max_answer_length=8"]
    # every process (server, two clients) builds the WordNet QA triples and evaluates spans: more time under load
    _run_and_check(dep, tmp_path / "run", overrides, metric="f1", timeout=2 * RUN_TIMEOUT)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert all(0.0 <= r["test_exact_match"] <= r["test_f1"] for r in rows)
    assert (tmp_path / "run" / "predictions.json").is_file()


def test_processes_stopped_when_the_body_fails(deployments):
    dep = deployments(num_supernodes=2)  # no tls, no insecure: TLS with throwaway certificates
    with pytest.raises(RuntimeError, match="boom"), dep:
        started = dep.pids
        assert len(started) == 3 and all(pid_alive(pid) for pid in started)
        assert dep.tls is not None and dep.tls.ca_cert.parent == dep.workdir / "throwaway-certs"
        assert "--insecure" not in dep.logs()["superlink"].read_text().splitlines()[0]
        raise RuntimeError("boom")
    assert not [pid for pid in dep.all_pids() if pid_alive(pid)]


def test_superlink_start_failure_is_reported(deployments, tmp_path):
    missing = tmp_path / "no-certs"
    dep = deployments(num_supernodes=1, tls=TLSFiles(missing / "ca.crt", missing / "s.pem", missing / "s.key"))
    with pytest.raises(DeploymentError, match="superlink exited"), dep:
        pass
    assert not [pid for pid in dep.all_pids() if pid_alive(pid)]

"""Shared test setup: offline hub flags, quiet Flower, deterministic torch threads, shared fixtures.

The tiny models and the tiny run configuration live in ``helpers.py``; the fixtures here hand
them to the tests.
"""

import os

import pytest

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import helpers  # noqa: E402  (after the offline flags: it imports transformers)


@pytest.fixture
def flower_task(monkeypatch):
    """The process identity Flower expects before a Message is built outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="session")
def tiny_bert():
    """Factory ``tiny_bert(seed=0, num_labels=3, dtype=torch.float32)`` of tiny random BERT classifiers."""
    return helpers.tiny_bert


@pytest.fixture(scope="session")
def tiny_gpt2():
    """Factory ``tiny_gpt2(seed=0)`` of tiny random GPT-2 language models."""
    return helpers.tiny_gpt2


@pytest.fixture(scope="session")
def tiny_qa_model(tmp_path_factory):
    """A tiny random BERT encoder with MiniLM's tokenizer, saved once: a ``model.name`` folder for extractive QA."""
    return helpers.tiny_qa_checkpoint(tmp_path_factory.mktemp("tiny-qa-model"))


@pytest.fixture(scope="session")
def tiny_overrides():
    """The tiny run configuration as ``key=value`` overrides (a tuple; append a test's own deviations)."""
    return helpers.TINY_OVERRIDES


@pytest.fixture
def deployments(tmp_path):
    """Factory of LocalDeployments (under tmp_path); all are stopped at teardown and their PIDs must be gone."""
    from florg.fl.deploy import LocalDeployment, pid_alive

    made: list[LocalDeployment] = []

    def make(**kwargs) -> LocalDeployment:
        kwargs.setdefault("ready_timeout", helpers.READY_TIMEOUT)
        dep = LocalDeployment(tmp_path / f"deployment-{len(made)}", **kwargs)
        made.append(dep)
        return dep

    yield make
    leftover = {}
    for dep in made:
        dep.stop()
        alive = [pid for pid in dep.all_pids() if pid_alive(pid)]
        if alive:
            leftover[str(dep.workdir)] = alive
    assert not leftover, f"processes still running after stop(): {leftover}"


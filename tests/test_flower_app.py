"""florg's own Flower App under ``flwr run``: its run config keys and the partition-count check."""

from __future__ import annotations

import tomllib

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from florg.config import ConfigError, RunConfig, config_keys, load_config
from florg.fl.deploy import APP_DIR
from florg.fl.server_app import APP_CONFIG_KEYS, app_config

PYPROJECT = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
APP_DEFAULTS = PYPROJECT["tool"]["flwr"]["app"]["config"]


def _rc(**keys):
    """The run config ``flwr run`` hands the ServerApp: the app's defaults with ``keys`` overridden."""
    return {**APP_DEFAULTS, **{k.replace("_", "-"): v for k, v in keys.items()}}


def test_the_app_exposes_the_main_settings_with_florgs_defaults():
    defaults = config_keys(RunConfig())
    assert set(APP_DEFAULTS) == {*APP_CONFIG_KEYS, "config-file", "overrides", "run-dir"}
    for app_key, key in APP_CONFIG_KEYS.items():
        assert APP_DEFAULTS[app_key] == defaults[key][0], app_key
        assert type(APP_DEFAULTS[app_key]) is type(defaults[key][0]), app_key
    assert app_config(_rc()).to_dict() == load_config().to_dict()  # the defaults, the method's recommended included


def test_run_config_keys_set_florg_config_keys():
    cfg = app_config(_rc(num_server_rounds=3, num_clients=4, rank=8, method="fedit", lr=0.01, wire_dtype="float16",
                         overrides="data.max_train_examples=100"))
    assert (cfg.train.rounds, cfg.data.num_clients, cfg.method.rank, cfg.method.name) == (3, 4, 8, "fedit")
    assert (cfg.train.lr, cfg.federation.wire_dtype, cfg.data.max_train_examples) == (0.01, "float16", 100)


def test_run_config_keys_for_local_epochs_and_the_head_lr():
    cfg = app_config(_rc(local_epochs=1, head_lr=0.02))
    assert (cfg.train.local_epochs, cfg.train.local_steps, cfg.train.head_lr) == (1, 0, 0.02)
    with pytest.raises(ConfigError, match=r"run config key 'local-epochs'.*train.local_steps=0"):
        app_config(_rc(local_epochs=1, local_steps=4))


def test_a_key_at_its_default_keeps_the_files_value_and_a_contradiction_is_an_error(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("[train]\nrounds = 7\n[method]\nrank = 8\n")
    cfg = app_config(_rc(config_file=str(file)))
    assert (cfg.train.rounds, cfg.method.rank) == (7, 8)
    assert app_config(_rc(config_file=str(file), num_server_rounds=7)).train.rounds == 7  # agreeing is fine
    with pytest.raises(ConfigError, match=r"'train.rounds' is 7 in config-file/overrides and 3 .* 'num-server-rounds'"):
        app_config(_rc(config_file=str(file), num_server_rounds=3))
    with pytest.raises(ConfigError, match=r"'data.num_clients' is 2 .* and 4 .*'num-clients'"):
        app_config(_rc(overrides="data.num_clients=2", num_clients=4))


def test_a_run_config_value_of_the_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match=r"run config key 'rank': config key 'method.rank': expected int"):
        app_config(_rc(rank="8"))
    with pytest.raises(ConfigError, match=r"run config key 'local-steps': config key 'train.local_steps': expected int"):
        app_config(_rc(local_steps=2.5))


def test_a_federation_whose_partitions_differ_from_num_clients_stops_with_one_clear_error(flower_task):
    from florg.fl.client_app import SETTING_ERROR
    from florg.fl.client_app import app as client
    from florg.fl.records import CONFIG_KEY

    cfg = load_config(None, [])  # data.num_clients = 20
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(
        {"server-round": 1, "lr": 1e-3, CONFIG_KEY: cfg.to_json()})})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    reply = client(msg, context)
    assert reply.has_error() and reply.error.reason.startswith(SETTING_ERROR)
    reason = reply.error.reason
    assert "'data.num_clients' is 20, but this federation has 2 partitions" in reason
    assert '--run-config "num-clients=2"' in reason and '--federation-config "num-supernodes=20"' in reason


@pytest.mark.slow
def test_flwr_run_of_florgs_app_with_its_run_config_keys(deployments, tmp_path, tiny_overrides):
    """The app's own keys drive a real ``flwr run``; a federation of the wrong size stops with the reason."""
    import json

    from florg.fl.deploy import pid_alive
    from helpers import RUN_TIMEOUT

    rest = [o for o in tiny_overrides if not o.startswith(("data.num_clients", "train.rounds", "train.batch_size"))]
    keys = {"num-server-rounds": 1, "batch-size": 8, "overrides": " ".join(
        [*rest, "data.max_train_examples=120", "data.max_test_examples=60", "federation.round_timeout=90"])}
    dep = deployments(num_supernodes=2, insecure=True)
    with dep:
        wrong = dep.run(APP_DIR, run_config={**keys, "num-clients": 3}, run_dir=tmp_path / "wrong", timeout=RUN_TIMEOUT)
        assert not wrong.ok
        status = json.loads((tmp_path / "wrong" / "status.json").read_text())
        assert status["status"] == "failed"
        assert "'data.num_clients' is 3, but this federation has 2 partitions" in status["error"]

        right = dep.run(APP_DIR, run_config={**keys, "num-clients": 2}, run_dir=tmp_path / "right", timeout=RUN_TIMEOUT)
        assert right.ok, right.output[-3000:]
        rows = [json.loads(line) for line in (tmp_path / "right" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["participants"] == 2
        pids = dep.all_pids()
    assert not [pid for pid in pids if pid_alive(pid)]


SERVER_ONLY = ["method.florg.procrustes=top-r", "method.florg.eig_rtol=1e-9", "method.florg.align_initial=false",
               "method.florg.consensus_diagnostics=true", "federation.fraction_train=0.5", "federation.max_norm=50",
               "eval.test_rounds=first-last", "federation.backend_cpus=1"]


def test_clients_get_the_run_config_without_the_server_only_options():
    from florg.config import client_view, server_only_keys
    from florg.fl.strategy import config_settings

    cfg = load_config(None, SERVER_ONLY)
    sent = RunConfig.from_json(config_settings(cfg)["run_config_json"])
    defaults, given = config_keys(RunConfig()), config_keys(cfg)
    assert {item.split("=")[0] for item in SERVER_ONLY} <= set(server_only_keys())
    for key, (value, _) in config_keys(sent).items():
        assert value == (defaults[key][0] if key in server_only_keys() else given[key][0]), key
    assert client_view(cfg) == sent and cfg.method.florg.procrustes == "top-r"  # the server keeps its own
    # every server-only option is valid alone at its default: the client's view validates wherever cfg does
    for key in server_only_keys():
        assert client_view(load_config(None, [f"{key}={config_keys(cfg)[key][0]}".lower()])) == client_view(load_config())


def test_server_only_options_do_not_split_the_clients_cache():
    from florg.run.experiment import _cache_key

    assert _cache_key(load_config(None, SERVER_ONLY)) == _cache_key(load_config())
    assert _cache_key(load_config(None, ["method.florg.init_scale=0.02"])) != _cache_key(load_config())


def test_a_client_parses_the_run_config_once_per_process(monkeypatch, flower_task):
    from florg.fl import client_app

    client_app._parse.cache_clear()
    parsed = []
    real = RunConfig.from_dict
    monkeypatch.setattr(RunConfig, "from_dict", classmethod(lambda cls, d: parsed.append(1) or real(d)))
    text = load_config(None, ["train.rounds=3"]).to_json()

    def message(rnd):
        content = RecordDict({"config": ConfigRecord({"florg-config": text, "server-round": rnd})})
        return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)

    first, second = client_app.run_settings(message(1)), client_app.run_settings(message(2))
    assert first is second and first.train.rounds == 3 and len(parsed) == 1

"""Run config: TOML + overrides, unknown keys, value checks, JSON round trip."""

import pytest

from florg.config import ConfigError, RunConfig, config_keys, load_config
from florg.train import round_lr


def test_defaults_are_the_embedded_demo():
    cfg = load_config()
    assert cfg.model.name == "minilm" and cfg.data.task == "wordnet"
    assert cfg.data.num_clients == 20 and cfg.data.alpha == 0.5 and cfg.data.partition == "dirichlet"
    assert cfg.method.name == "florg" and cfg.method.rank == 4


def test_toml_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('seed = 3\n[train]\nrounds = 7\nlr = 0.01\n[model]\ntarget_modules = ["query"]\n')
    cfg = load_config(p, ["train.rounds=2", "method.procrustes=top-r", "model.target_modules=query,key"])
    assert cfg.seed == 3 and cfg.train.rounds == 2 and cfg.train.lr == 0.01
    assert cfg.method.procrustes == "top-r"
    assert cfg.model.target_modules == ["query", "key"]


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.roundz=3"])
    msg = str(exc.value)
    assert "train.roundz" in msg and "Did you mean 'train.rounds'" in msg and "method.rank" in msg
    p = tmp_path / "c.toml"
    p.write_text("[trian]\nrounds = 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(p)


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.alpha=0", "data.alpha"),
        ("data.alpha=-1", "data.alpha"),
        ("method.rank=0", "method.rank"),
        ("train.rounds=abc", "train.rounds"),
        ("train.lr=-1", "train.lr"),
        ("data.partition=random", "data.partition"),
        ("federation.fraction_train=0", "federation.fraction_train"),
        ("federation.min_train_nodes=30", "federation.min_train_nodes"),
        ("method.compensate_init=maybe", "method.compensate_init"),
        ("train.rounds=2.5", "train.rounds"),
    ],
)
def test_bad_values_name_the_field(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_override_syntax_and_sections():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.rounds"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(None, ["train=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/file.toml")


def test_json_round_trip_and_keys_have_help():
    cfg = load_config(None, ["seed=5", "method.alpha=8"])
    assert RunConfig.from_json(cfg.to_json()) == cfg
    for key, (_, help_text) in config_keys().items():
        assert help_text, f"{key} has no help text"


def test_round_lr_schedules():
    cfg = load_config(None, ["train.lr=0.01", "train.rounds=5", "train.lr_schedule=cosine", "train.lr_min=0.001"])
    lrs = [round_lr(cfg.train, r) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    const = load_config(None, ["train.lr=0.02"])
    assert {round_lr(const.train, r) for r in range(1, 9)} == {0.02}

"""Run config: TOML + overrides, unknown keys, value checks, JSON round trip."""

import math
import re

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
    cfg = load_config(p, ["train.rounds=2", "method.florg.procrustes=top-r", "model.target_modules=query,key"])
    assert cfg.seed == 3 and cfg.train.rounds == 2 and cfg.train.lr == 0.01
    assert cfg.method.florg.procrustes == "top-r"
    assert cfg.model.target_modules == ["query", "key"]


def test_unknown_key_names_the_nearest_key_and_the_key_list(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.roundz=3"])
    msg = str(exc.value)
    assert "train.roundz" in msg and "Did you mean 'train.rounds'" in msg and "florg config --keys" in msg
    assert "method.rank" not in msg  # no wall of every key
    p = tmp_path / "c.toml"
    p.write_text("[trian]\nrounds = 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(p)


@pytest.mark.parametrize("old, new", [("method.procrustes", "method.florg.procrustes"),
                                      ("method.federa_mode", "method.federa.mode"),
                                      ("method.personal_eval_examples", "method.fedsa-lora.personal_eval_examples")])
def test_moved_method_options_say_where_they_went(old, new):
    with pytest.raises(ConfigError, match=f"'{old}' has moved to '{new}'"):
        load_config(None, [f"{old}=1"])


def test_each_method_has_its_own_section_in_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[method]\nname = "federa"\n[method.federa]\nmode = "product_svd"\n'
                 '[method.fedsa-lora]\npersonal_eval_examples = 7\n[method.florg]\ninit_scale = 0.03\n')
    cfg = load_config(p)
    assert cfg.method.federa.mode == "product_svd" and cfg.method.options("fedsa-lora").personal_eval_examples == 7
    assert cfg.method.florg.init_scale == 0.03 and cfg.method.florg.procrustes == "paper"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg  # the resolved config reloads (hyphenated section names)
    assert "fedsa-lora" in cfg.to_dict()["method"]
    with pytest.raises(ConfigError, match=r"method\.florg\.init_scale"):
        load_config(None, ["method.florg.init_scale=0"])


@pytest.mark.parametrize("toml, key, expected", [
    ("[train]\nrounds = \"5\"\n", "train.rounds", "expected int, got '5' (str)"),
    ("[train]\nrounds = 5.0\n", "train.rounds", "expected int"),
    ("[train]\nlr = \"0.01\"\n", "train.lr", "expected float"),
    ("[method]\ntrain_head = 1\n", "method.train_head", "expected bool"),
    ("[model]\nname = 3\n", "model.name", "expected str"),
    ("[model]\ntarget_modules = \"query\"\n", "model.target_modules", "expected a list of str"),
    ("[method]\nclient_ranks = [\"2\"]\n", "method.client_ranks", "expected a list of int"),
])
def test_toml_values_of_the_wrong_type_are_errors(tmp_path, toml, key, expected):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}': {expected}")):
        load_config(p)


def test_ints_are_accepted_for_floats_and_set_takes_comma_lists():
    cfg = load_config(None, ["method.alpha=8", "data.classes=noun.animal,noun.plant", "method.client_ranks=2,4"])
    assert cfg.method.alpha == 8.0 and isinstance(cfg.method.alpha, float)
    assert cfg.data.classes == ["noun.animal", "noun.plant"]


def test_config_pointing_at_a_folder_has_its_own_error(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)


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
        ("method.florg.compensate_init=maybe", "method.florg.compensate_init"),
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
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:]))
    # progress (t - 1) / R: the last round still trains above lr_min (lr_min is reached at round R + 1)
    expected = [0.001 + 0.5 * 0.009 * (1 + math.cos(math.pi * (t - 1) / 5)) for t in range(1, 6)]
    assert lrs == pytest.approx(expected) and lrs[-1] > 0.001 + 1e-4
    zero_min = load_config(None, ["train.lr=0.01", "train.rounds=4", "train.lr_schedule=cosine", "train.lr_min=0"])
    last = round_lr(zero_min.train, 4)
    assert last == pytest.approx(0.01 * 0.5 * (1 + math.cos(0.75 * math.pi))) and last > 1e-3
    assert round_lr(load_config(None, ["train.rounds=1", "train.lr_schedule=cosine"]).train, 1) == 5e-3
    const = load_config(None, ["train.lr=0.02"])
    assert {round_lr(const.train, r) for r in range(1, 9)} == {0.02}


# ------------------------------------------------------------------ local epochs, head lr, method defaults


def test_local_epochs_replaces_local_steps_and_the_two_are_exclusive(tmp_path):
    cfg = load_config(None, ["train.local_epochs=2"])
    assert cfg.train.local_epochs == 2 and cfg.train.local_steps == 0  # the default 10 steps give way
    assert RunConfig.from_dict({"train": {"local_epochs": 1}}).train.local_steps == 0
    with pytest.raises(ConfigError, match=r"train.local_epochs.*train.local_steps is 3.*train.local_steps=0"):
        load_config(None, ["train.local_epochs=1", "train.local_steps=3"])
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlocal_steps = 4\n")
    with pytest.raises(ConfigError, match="train.local_epochs"):  # the file's steps and --set epochs disagree
        load_config(p, ["train.local_epochs=1"])
    assert load_config(p, ["train.local_epochs=1", "train.local_steps=0"]).train.local_steps == 0
    with pytest.raises(ConfigError, match=r"train.local_steps': must be >= 1 when train.local_epochs is 0"):
        load_config(None, ["train.local_steps=0"])
    with pytest.raises(ConfigError, match="train.local_epochs': must be >= 0"):
        load_config(None, ["train.local_epochs=-1", "train.local_steps=0"])
    resolved = load_config(None, ["train.local_epochs=1"])
    assert RunConfig.from_json(resolved.to_json()).to_dict() == resolved.to_dict()  # a run dir's config reloads


def test_local_epochs_is_whole_passes_over_the_shard():
    from florg.train import local_steps

    epochs = load_config(None, ["train.local_epochs=3"]).train
    assert local_steps(epochs, 7) == 21 and local_steps(epochs, 0) == 3
    assert local_steps(load_config(None, ["train.local_steps=5"]).train, 7) == 5


def test_head_lr_is_checked():
    assert load_config(None, ["train.head_lr=0.02"]).train.head_lr == 0.02
    with pytest.raises(ConfigError, match=r"train.head_lr': must be >= 0 \(0 = train.lr\)"):
        load_config(None, ["train.head_lr=-1"])


def test_a_method_s_recommended_settings_apply_unless_the_config_sets_them(monkeypatch, tmp_path):
    """``--set method.name=X`` trains X at X's recommended settings; whatever a file or --set gives wins."""
    from florg.methods.registry import METHODS

    monkeypatch.setattr(METHODS["fedit"], "recommended", {"train.lr": 0.0125, "train.head_lr": 0.03,
                                                          "method.alpha": 8.0})
    cfg = load_config(None, ["method.name=fedit"])
    assert (cfg.train.lr, cfg.train.head_lr, cfg.method.alpha) == (0.0125, 0.03, 8.0)
    cfg = load_config(None, ["method.name=fedit", "train.lr=0.001"])
    assert (cfg.train.lr, cfg.train.head_lr) == (0.001, 0.0)  # one lr named: the head follows it
    cfg = load_config(None, ["method.name=fedit", "train.lr=0.001", "train.head_lr=0.004"])
    assert (cfg.train.lr, cfg.train.head_lr) == (0.001, 0.004)
    p = tmp_path / "c.toml"
    p.write_text('[method]\nname = "fedit"\nalpha = 32.0\n')
    assert load_config(p).method.alpha == 32.0 and load_config(p).train.lr == 0.0125
    assert RunConfig.from_dict({"method": {"name": "fedit"}}).train.head_lr == 0.03
    full = load_config(None, ["method.name=fedit", "train.lr=0.001"])
    assert RunConfig.from_json(full.to_json()).train.lr == 0.001  # a resolved config reloads as it is
    old = tmp_path / "old.toml"  # a run directory's config.toml from before train.head_lr existed
    old.write_text('[method]\nname = "fedit"\nalpha = 16.0\n[train]\nlr = 0.005\n')
    assert load_config(old).train.head_lr == 0.0 and load_config(old).train.lr == 0.005
    assert load_config(None, ["method.name=federa"]).train.lr == RunConfig().train.lr  # others untouched


def test_every_method_s_recommended_settings_are_valid_config_keys_and_values():
    from florg.methods.registry import METHODS

    keys = config_keys()
    for name, cls in METHODS.items():
        for key in cls.recommended:
            assert key in keys, (name, key)
        load_config(None, [f"method.name={name}"])  # validates the applied values

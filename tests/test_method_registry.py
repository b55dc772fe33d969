"""Adding a method is its file plus one registry line: a toy method, monkeypatched into the registry, joins
the config tree (``method.name=toy``, ``method.toy.*``, its recommended settings) and the CLI."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
from typer.testing import CliRunner

from florg.cli.main import app
from florg.config import ConfigError, RunConfig, config_keys, load_config
from florg.methods import get_method, registry
from florg.methods.fedit import FedITMethod
from florg.options import need, option


@dataclass
class ToyOptions:
    knob: int = option(3, "The toy method's knob.", strategy_keyword="toy_knob")

    def check(self, prefix: str) -> None:
        need(self.knob >= 0, f"{prefix}.knob", f"must be >= 0, got {self.knob}")


class ToyMethod(FedITMethod):
    name = "toy"
    display_name = "Toy"
    options_class = ToyOptions
    recommended = {"train.lr": 0.0421}
    variants = {}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(registry, "REGISTRY", [*registry.REGISTRY, ToyMethod])
    monkeypatch.setitem(registry.METHODS, "toy", ToyMethod)


def test_a_method_added_to_the_registry_joins_the_config(toy):
    cfg = load_config(None, ["method.name=toy", "method.toy.knob=5"])
    assert (cfg.method.name, cfg.method.options("toy").knob, cfg.train.lr) == ("toy", 5, 0.0421)
    assert isinstance(get_method(cfg), ToyMethod)
    assert config_keys()["method.toy.knob"] == (3, "The toy method's knob.")
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match=r"method.toy.knob.*must be >= 0"):
        load_config(None, ["method.name=toy", "method.toy.knob=-1"])
    assert [row.method for row in registry.compare_rows()].count("toy") == 1


def test_without_the_registry_line_the_method_is_unknown():
    assert "method.toy.knob" not in config_keys()
    with pytest.raises(ConfigError, match="unknown config key 'method.toy'"):
        load_config(None, ["method.toy.knob=5"])
    with pytest.raises(ConfigError, match="unknown method 'toy'"):
        get_method(load_config(None, ["method.name=toy"]))


def test_a_method_added_to_the_registry_joins_the_cli(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["config", "--keys"], catch_exceptions=False)
    assert res.exit_code == 0
    assert "method.toy.knob" in res.stdout
    assert any("toy" in line and "0.0421" in line for line in res.stdout.splitlines())
    res = CliRunner().invoke(app, ["config", "--set", "method.name=toy", "--set", "method.toy.knob=7"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert 'name = "toy"' in res.stdout and "knob = 7" in res.stdout and "lr = 0.0421" in res.stdout



def test_a_drop_in_strategy_for_a_new_method_is_a_thin_subclass(toy):
    from florg.fl.florg_strategy import DropInStrategy

    class Toy(DropInStrategy):
        """The toy method as a drop-in strategy."""

        method_name = "toy"

    params = inspect.signature(Toy).parameters
    assert {"rank", "lr", "toy_knob", "config"} <= set(params) and "procrustes" not in params
    strategy = Toy(rank=2, toy_knob=9)
    assert (strategy.config.method.name, strategy.config.method.rank, strategy.config.method.toy.knob) == ("toy", 2, 9)
    with pytest.raises(TypeError, match="procrustes"):
        Toy(procrustes="paper")

"""The shipped config files stay valid and in sync with the built-in defaults."""

from pathlib import Path

from florg.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_demo_toml_equals_the_defaults():
    assert load_config(CONFIGS / "demo.toml") == load_config()


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.glob("*.toml"))
    assert files
    for path in files:
        load_config(path)

"""The shipped config files stay valid and in sync with the built-in defaults."""

from pathlib import Path

from florg.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_demo_toml_is_the_defaults_with_shorter_glosses():
    demo = load_config(CONFIGS / "demo.toml")
    assert demo.model.max_length == 20
    assert demo == load_config(overrides=["model.max_length=20"])


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.glob("*.toml"))
    assert files
    for path in files:
        load_config(path)

"""Loading a config: TOML files, ``key=value`` overrides (typed, with the nearest key named for an unknown
one), the settings left to the library (a method's recommended values), then :func:`~.checks.validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

from florg.options import ConfigError

from .checks import validate
from .sections import RunConfig, _key, _registered_methods, config_keys

#: keys that moved (old -> new), for a precise message when an old config is loaded
MOVED_KEYS = {
    "method.procrustes": "method.florg.procrustes",
    "method.init_scale": "method.florg.init_scale",
    "method.compensate_init": "method.florg.compensate_init",
    "method.eig_rtol": "method.florg.eig_rtol",
    "method.federa_mode": "method.federa.mode",
    "method.personal_eval_examples": "method.fedsa-lora.personal_eval_examples",
}


def _unknown(key: str) -> ConfigError:
    if key in MOVED_KEYS:
        return ConfigError(f"config key '{key}' has moved to '{MOVED_KEYS[key]}' (each method's own options live "
                           f"under method.<name>); rename it")
    valid = list(config_keys())
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} 'florg config --keys' lists every key")


def _type_name(typ: Any) -> str:
    """``int``, ``float``, ``str``, ``bool``, ``list[str]``, ``list[int]``."""
    if isinstance(typ, str):
        return typ
    return str(typ) if str(typ).startswith("list[") else getattr(typ, "__name__", str(typ))


def _coerce(key: str, typ: Any, value: Any, *, from_text: bool = False) -> Any:
    """``value`` if it has the field's type (an int is accepted for a float); else a ConfigError.

    ``from_text`` (``--set`` values that are not TOML) additionally lets a list be given as
    comma-separated text, e.g. ``--set data.classes=noun.animal,noun.plant``.
    """
    name = _type_name(typ)
    ok = False
    if name == "bool":
        ok = isinstance(value, bool)
    elif name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif name == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif name == "str":
        ok = isinstance(value, str)
    elif name.startswith("list["):
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            if name == "list[int]" and all(v.lstrip("-").isdigit() for v in value):
                value = [int(v) for v in value]
        item = int if name == "list[int]" else str
        ok = isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
        value = list(value) if ok else value
    if not ok:
        shown = f"'{value}'" if isinstance(value, str) else repr(value)
        got = type(value).__name__
        want = "a list of " + name[5:-1] if name.startswith("list[") else name
        raise ConfigError(f"config key '{key}': expected {want}, got {shown} ({got})")
    return value


def _merge(obj: Any, data: dict[str, Any], prefix: str, *, from_text: bool = False) -> None:
    hints = get_type_hints(type(obj))
    by_key = {_key(f): f for f in fields(obj)}
    for name, value in data.items():
        key = prefix + name
        if name not in by_key:
            raise _unknown(key)
        attr = by_key[name].name
        current = getattr(obj, attr)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; set its fields, e.g. '{key}.{_key(fields(current)[0])}'")
            _merge(current, value, key + ".", from_text=from_text)
        else:
            setattr(obj, attr, _coerce(key, hints[attr], value, from_text=from_text))


def _parse_value(text: str) -> tuple[Any, bool]:
    """``--set key=value``'s right-hand side as a TOML value, else the text itself: ``(value, is_text)``."""
    try:
        return tomllib.loads(f"v = {text}")["v"], False
    except tomllib.TOMLDecodeError:
        return text, True


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` strings (dotted keys) to ``cfg`` in place and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. train.rounds=5")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        nested: dict[str, Any] = {}
        cur = nested
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        value, is_text = _parse_value(raw.strip())
        cur[parts[-1]] = value
        _merge(cfg, nested, prefix="", from_text=is_text)
    return cfg


def read_toml(path: str | Path, what: str, example: str, alternative: str = "", error: type[Exception] = ConfigError
              ) -> dict[str, Any]:
    """The parsed TOML file ``path``; one clear ``error`` when it is a folder, missing or not valid TOML."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{what} '{p}' is a folder; pass a TOML file, e.g. {example}")
    if not p.is_file():
        raise error(f"{what} '{p}' does not exist; pass an existing TOML file such as {example}"
                    + (f" {alternative}" if alternative else ""))
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} '{p}' is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the TOML file (if any), then ``key=value`` overrides, then the settings the two leave
    to the library (:func:`resolve_defaults`: the method's recommended values); validated."""
    cfg = RunConfig()
    given: set[str] = set()
    if path:
        data = read_toml(path, "config file", "configs/demo.toml", "or omit --config")
        _merge(cfg, data, prefix="")
        given |= given_keys(data)
    apply_overrides(cfg, overrides or [])
    given |= {item.split("=", 1)[0].strip() for item in overrides or [] if "=" in item}
    resolve_defaults(cfg, given)
    validate(cfg)
    return cfg


def given_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys of the leaves of a nested config dict (what a file or a caller set)."""
    out: set[str] = set()
    for name, value in data.items():
        if isinstance(value, Mapping):
            out |= given_keys(value, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def recommended_settings(method_name: str) -> dict[str, Any]:
    """``{dotted key: value}``: the settings method ``method_name`` recommends (empty for an unknown name)."""
    section = _registered_methods().get(method_name)
    return dict(section.recommended or {}) if section is not None else {}


def resolve_defaults(cfg: RunConfig, given: set[str]) -> RunConfig:
    """Fill in what the config's author left to the library, in place.

    * The method's recommended settings (``FederatedMethod.recommended``: lr, head lr, alpha, ...) for every
      key not in ``given``: ``--set method.name=fedit`` trains FedIT at FedIT's settings, not FLoRG's.
      One exception: a config that gives ``train.lr`` but not ``train.head_lr`` trains the head at that lr
      (``head_lr`` stays 0): one lr named is one lr for everything, and every config written before
      ``train.head_lr`` existed (a run directory's ``config.toml``, a study's base) trains as it did.
    * ``train.local_epochs`` set without ``train.local_steps``: ``local_steps`` becomes 0 (a round is epochs).
    """
    def is_given(key: str) -> bool:
        return key in given or any(key.startswith(g + ".") for g in given)

    for key, value in recommended_settings(cfg.method.name).items():
        if key == "train.head_lr" and is_given("train.lr"):
            continue  # the head follows the lr the config names
        if not is_given(key):
            _merge(cfg, _nested(key, value), prefix="")
    if is_given("train.local_epochs") and not is_given("train.local_steps") and cfg.train.local_epochs > 0:
        cfg.train.local_steps = 0
    return cfg


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cur = out
    parts = dotted.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out

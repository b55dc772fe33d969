"""Run configuration: a small tree of dataclasses, loaded from TOML plus ``key=value`` overrides.

Every field carries a help text (``florg config --keys`` prints them). Unknown keys are an error
that names the nearest valid key. Values must have the field's type (an int where an int is
expected, ...); only ``--set`` may give a list as comma-separated text. The defaults are the
embedded demo: MiniLM on the WordNet 4-class task, 20 clients, Dirichlet alpha = 0.5, FLoRG with
r = 4.

Options shared by every federated method live under ``method.*`` (name, rank, alpha, ...); each
method's own options live under ``method.<name>.*`` (e.g. ``method.florg.procrustes``), in a small
dataclass declared next to the method (:attr:`florg.methods.base.FederatedMethod.options_class`).

Imports: this module sits below the methods. :class:`ConfigError`, :func:`option` and :func:`need` live in
:mod:`florg.options` (a leaf that imports nothing of florg; re-exported here), so the methods and
:mod:`florg.core` import them from there, never from here. What the config needs to know of the methods
(their ``method.<name>.*`` sections and recommended settings) the method registry hands in through
:func:`register_methods` when :mod:`florg.methods.registry` is imported. The one import of anything above
this module is the lazy bootstrap in :func:`_registered_methods`: a ``RunConfig()`` built before anyone
imported the registry imports it there (it registers itself), so every caller (CLI, Flower apps, tests,
examples) gets the method sections without importing methods itself, and ``import florg.config`` stays
torch-free (``florg --help`` starts fast). At module level there is no import circle.

The package: :mod:`.sections` (the tree), :mod:`.checks` (validation), :mod:`.loading` (files and overrides).
"""

from florg.options import ConfigError, need, option

from .checks import FAULT_KINDS, RUNTIME_KEYS, parse_faults, validate
from .loading import (
    MOVED_KEYS,
    apply_overrides,
    given_keys,
    load_config,
    read_toml,
    recommended_settings,
    resolve_defaults,
)
from .sections import (
    CacheConfig,
    DataConfig,
    EvalConfig,
    FederationConfig,
    MethodConfig,
    MethodSection,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    TrainConfig,
    client_view,
    config_keys,
    field_aliases,
    method_config_class,
    method_names,
    register_methods,
    server_only_keys,
)

__all__ = [
    "FAULT_KINDS",
    "MOVED_KEYS",
    "RUNTIME_KEYS",
    "CacheConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "MethodConfig",
    "MethodSection",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "client_view",
    "config_keys",
    "field_aliases",
    "given_keys",
    "load_config",
    "method_config_class",
    "method_names",
    "need",
    "option",
    "parse_faults",
    "read_toml",
    "recommended_settings",
    "register_methods",
    "resolve_defaults",
    "server_only_keys",
    "validate",
]

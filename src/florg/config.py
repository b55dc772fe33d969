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
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

from florg.options import ConfigError, need, option

__all__ = ["RUNTIME_KEYS", "ConfigError", "MethodSection", "RunConfig", "load_config", "client_view", "config_keys",
           "apply_overrides", "server_only_keys",
           "field_aliases", "given_keys", "method_names", "need", "option", "parse_faults", "recommended_settings",
           "register_methods", "resolve_defaults", "validate"]

_f = option


@dataclass
class ModelConfig:
    name: str = _f("minilm", "Model: 'minilm' (offline MiniLM), 'smollm2' (offline SmolLM2-135M), a hub id or a local path.",
                   app_key="model")
    target_modules: list[str] = _f([], "Modules to adapt; empty = the architecture's default (query/value or q_proj/v_proj).")
    max_length: int = _f(32, "Maximum tokenised sequence length.")
    dtype: str = _f("float32", "Dtype of the frozen base weights: float32, bfloat16 or float16 (float16: CUDA only). The "
                               "trainable factors, the head and the optimizer stay in float32; with bfloat16/float16 the "
                               "forward runs under autocast (docs/gpu.md).", choices=("float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    task: str = _f("wordnet", "Task. Classification: 'wordnet' (embedded, 4 classes), 'wordnet-nouns' (embedded, 12 "
                              "balanced classes), glue/rte, glue/mrpc, glue/qnli, glue/mnli, glue/wnli, glue/sst2, "
                              "glue/cola, glue/qqp, local:<path> (your own CSV/TSV/JSONL file or folder, or a "
                              "save_to_disk folder). Instruction tuning (causal LM): 'wordnet-define' (embedded), "
                              "instruct:<path> (Alpaca/chat JSONL file or folder), instruct:hub:<dataset id>. "
                              "Extractive QA: 'wordnet-qa' (embedded), 'squad' (SQuAD v1.1 from data.data_dir, else "
                              "the Hub), squad:<path> (a SQuAD v1.1 JSON file or folder).", app_key="task")
    data_dir: str = _f("", "Local data folder (WordNet dict folder for wordnet / wordnet-nouns / wordnet-define / "
                           "wordnet-qa, GLUE files / a save_to_disk folder, or a SQuAD v1.1 folder).")
    num_clients: int = _f(20, "Number of clients (data partitions, one SuperNode each).", app_key="num-clients")
    partition: str = _f("dirichlet", "Partitioning: dirichlet, iid or pathological.",
                        choices=("dirichlet", "iid", "pathological"), app_key="partition")
    alpha: float = _f(0.5, "Dirichlet concentration (the paper uses 0.5); smaller is more skewed.")
    classes_per_client: int = _f(2, "Classes per client for the pathological partitioning.")
    max_train_examples: int = _f(6000, "Cap on training examples (0 = all), drawn by seed.")
    max_test_examples: int = _f(600, "Cap on the held-out global test split (0 = the whole hold-out), drawn by seed.")
    test_fraction: float = _f(0.1, "Share of the data held out as the global test split "
                                   "(tasks without a test split, e.g. wordnet).")
    validation_fraction: float = _f(0.0, "Share of the training data held out (stratified, seeded) as a validation split "
                                         "the server evaluates every round (val_<metric>; for selecting settings, never "
                                         "the test split). 0 = none.")
    max_validation_examples: int = _f(0, "Cap on the validation split (0 = all of it), drawn by seed.")
    classes: list[str] = _f([], "WordNet classes (lexicographer files); empty = noun.animal, noun.plant, noun.food, "
                                "noun.artifact (wordnet-define: every noun category).")
    doc_stride: int = _f(128, "Extractive QA: overlap in tokens between consecutive windows of a long context "
                              "(capped at half of the room a window leaves for the context).")
    max_answer_length: int = _f(30, "Extractive QA: the longest answer (in tokens) evaluation may predict.")


@dataclass
class MethodConfig:
    """Options shared by every federated method; ``method.<name>.*`` sections are added per method."""

    name: str = _f("florg", "Federated method (florg config --keys lists each method's own options under method.<name>).",
                   app_key="method")
    rank: int = _f(4, "Adapter rank r (the paper's default is 4).", strategy_keyword="rank", app_key="rank")
    alpha: float = _f(16.0, "LoRA-style alpha; the scale is s = alpha / rank (the paper's '16' with r = 4 gives s = 4).",
                      strategy_keyword="alpha", app_key="alpha")
    dropout: float = _f(0.0, "Adapter dropout, as in LoRA.")
    weighting: str = _f("examples", "Aggregation weights: 'examples' (client example counts) "
                                    "or 'uniform' (1/N, as in the paper).",
                        choices=("examples", "uniform"), strategy_keyword="weighting")
    train_head: bool = _f(True, "Train the classification head and FedAvg it (counted separately in the bytes).")
    client_ranks: list[int] = _f([], "Per-client adapter ranks for methods that allow heterogeneous ranks: "
                                     "client i uses client_ranks[i % len]; empty = every client uses method.rank.")

    def options(self, method_name: str) -> Any:
        """The ``method.<method_name>.*`` options object (``None`` for a method without own options)."""
        return getattr(self, _attr(method_name), None)


def _attr(key: str) -> str:
    """Python attribute name of a config key (``fedsa-lora`` -> ``fedsa_lora``)."""
    return key.replace("-", "_")


# ---- what the config knows of the methods: handed in by the method registry --------------------------------


class MethodSection(NamedTuple):
    """What the config needs of one federated method: its ``method.<name>.*`` options dataclass (``None``:
    no own options) and its recommended settings (``{dotted key: value}``)."""

    options_class: type | None
    recommended: Mapping[str, Any]


#: set by :func:`register_methods`: returns ``{method name: MethodSection}`` in registry order, read on every use
_method_source: Callable[[], Mapping[str, MethodSection]] | None = None


def register_methods(source: Callable[[], Mapping[str, MethodSection]]) -> None:
    """Install the method registry's hook (:mod:`florg.methods.registry` calls this when imported)."""
    global _method_source
    _method_source = source


def _registered_methods() -> Mapping[str, MethodSection]:
    """``{method name: MethodSection}`` as the registry reports it now.

    Bootstrap: the registry registers itself on import; until someone has imported it, this imports it
    here, lazily (it imports torch). This is the only import of a module above ``florg.config``.
    """
    if _method_source is None:
        # lazy: breaks the import cycle florg.config -> florg.methods.registry -> florg.config; keeps florg --help torch-free
        import florg.methods.registry  # noqa: F401  (bootstrap: the import calls register_methods)
    assert _method_source is not None, "florg.methods.registry did not call florg.config.register_methods"
    return _method_source()


def method_names() -> list[str]:
    """The registered methods' names (``method.name``'s valid values), in registry order."""
    return list(_registered_methods())


_METHOD_CONFIG_CLASSES: dict[tuple[tuple[str, type], ...], type] = {}


def method_config_class() -> type:
    """``MethodConfig`` plus one ``method.<name>`` section per registered method that declares options."""
    sections = tuple((name, sec.options_class) for name, sec in _registered_methods().items()
                     if sec.options_class is not None)
    cls = _METHOD_CONFIG_CLASSES.get(sections)
    if cls is None:  # one class per set of sections (a method added at run time, e.g. by a test, gets its own)
        extra = [
            (_attr(name), opts, field(default_factory=opts, metadata={"key": name, "help": f"Options of method '{name}'."}))
            for name, opts in sections
        ]
        cls = _METHOD_CONFIG_CLASSES[sections] = dataclasses.make_dataclass(
            "MethodConfig", extra, bases=(MethodConfig,), namespace={"__module__": __name__}
        )
    return cls


def _new_method_config() -> MethodConfig:
    return method_config_class()()


@dataclass
class TrainConfig:
    rounds: int = _f(5, "Federated rounds.", strategy_keyword="num_rounds", app_key="num-server-rounds")
    local_steps: int = _f(10, "Local optimizer steps per client per round (0 when train.local_epochs is set).",
                          app_key="local-steps")
    local_epochs: int = _f(0, "Local epochs per client per round: each round is this many passes over the client's "
                              "shard (ceil(examples / batch_size) steps each), the paper's regime. 0 = off (use "
                              "train.local_steps). Setting it makes train.local_steps 0 unless that is set too, which "
                              "is an error: the two are exclusive.", app_key="local-epochs")
    batch_size: int = _f(16, "Local batch size.", app_key="batch-size")
    lr: float = _f(5e-3, "Peak learning rate of the adapter (decided by the server, sent each round). Each method "
                         "has a recommended value that applies unless a config sets it (florg config --keys).",
                         strategy_keyword="lr", app_key="lr")
    head_lr: float = _f(0.0, "Peak learning rate of the classification head and every other modules_to_save entry "
                             "(same schedule as train.lr, scaled). 0 = train.lr. Left unset, it is the method's "
                             "recommended head lr, unless the config sets train.lr (then the head follows it). Under "
                             "Adam the adapter's lr and method.alpha trade off, but the head's lr is its own.",
                             strategy_keyword="head_lr", app_key="head-lr")
    lr_schedule: str = _f("constant", "Learning-rate schedule across rounds: constant or cosine.", choices=("constant", "cosine"),
                          strategy_keyword="lr_schedule")
    lr_min: float = _f(0.0, "Final learning rate of the cosine schedule.", strategy_keyword="lr_min")
    optimizer: str = _f("adamw", "Local optimizer: adamw or sgd.", choices=("adamw", "sgd"))
    weight_decay: float = _f(0.0, "Weight decay of the local optimizer.")
    reset_optimizer: bool = _f(True, "Reset the local optimizer state every round (False keeps it in the client's state).")
    device: str = _f("auto", "Where clients train and evaluate and the server evaluates and aggregates: 'auto' (CUDA when "
                             "available, else the CPU), 'cpu', 'cuda' or 'cuda:N'. Simulated clients use the GPU Ray gives them "
                             "(federation.client_gpus); a SuperNode's node config key 'device' overrides it (docs/gpu.md).")
    grad_accum: int = _f(1, "Gradient accumulation: each batch of train.batch_size is split into this many micro-batches whose "
                            "gradients add up to the whole batch's (same update, less memory).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass instead of keeping them (less memory, "
                                             "about a third more compute; same update).")


@dataclass
class FederationConfig:
    fraction_train: float = _f(1.0, "Fraction of clients sampled per round (the paper uses full participation).",
                               strategy_keyword="fraction_train", app_key="fraction-train", server_only=True)
    min_train_nodes: int = _f(2, "Minimum clients per training round.", strategy_keyword="min_train_nodes")
    min_available_nodes: int = _f(2, "Minimum connected clients before a round starts.", strategy_keyword="min_available_nodes")
    client_cpus: float = _f(1.0, "CPUs reserved per simulated client (Ray); 1 on a 2-core machine runs 2 clients at once.")
    client_gpus: float = _f(0.0, "GPUs reserved per simulated client.")
    backend_cpus: int = _f(0, "CPUs given to the simulation backend (0 = all of this machine's cores).", server_only=True)
    round_timeout: float = _f(600.0, "Seconds to wait for client replies each round.", strategy_keyword="round_timeout")
    wire_dtype: str = _f("float32", "Dtype of adapter tensors on the wire both ways: float32, float16 or bfloat16 "
                                    "(the head stays float32).",
                         choices=("float32", "float16", "bfloat16"), strategy_keyword="wire_dtype", app_key="wire-dtype")
    faults: list[str] = _f([], "Fault injection for reliability tests: KIND@PARTITION (nan, inf, shape, missing, dtype, "
                               "norm, examples, error, stall, oom) or dropout:FRACTION. Empty = off.")
    max_norm: float = _f(1e4, "Replies with an uploaded tensor whose Frobenius norm exceeds this are dropped (0 = no bound).",
                         strategy_keyword="max_norm", server_only=True)


@dataclass
class CacheConfig:
    enabled: bool = _f(True, "Cache the tokenised data (Arrow, memory-mapped) and FLoRG's bases (safetensors) on disk, so a "
                             "process that builds the same experiment again (a deployment's ClientApp every round) loads them "
                             "instead of recomputing them. Keyed by a hash of the settings they depend on.")
    dir: str = _f("", "Cache folder; empty = $FLORG_CACHE/experiments, else ~/.cache/florg/experiments.")


@dataclass
class EvalConfig:
    batch_size: int = _f(64, "Batch size of the server-side evaluation on the global test split.")
    generate_examples: int = _f(16, "Instruction tuning: held-out prompts (drawn with the seed) answered greedily before "
                                    "and after training at the end of a run (generations.jsonl, ROUGE-L in summary.json); "
                                    "0 = none.")
    max_new_tokens: int = _f(32, "Instruction tuning: most tokens generated per answer.")
    test_rounds: str = _f("all", "Rounds in which the server evaluates the test split: 'all' (every round, from round 0) or "
                                 "'first-last' (round 0 and the final round only, e.g. for tuning runs).",
                          choices=("all", "first-last"), server_only=True)
    validation_rounds: str = _f("all", "Rounds in which the server evaluates the validation split (data.validation_fraction "
                                       "> 0): 'all', 'last3' (the last 3 rounds) or 'none' (held out but not evaluated).",
                                choices=("all", "last3", "none"), server_only=True)


@dataclass
class PrivacyConfig:
    mode: str = _f("off", "Differential privacy: 'off', 'local' (clients clip and noise their uploads) or 'central' "
                          "(the server clips each upload and noises the aggregate Gram matrix). FLoRG only; see docs/privacy.md.",
                   choices=("off", "local", "central"))
    clip_norm: float = _f(1.0, "C: each client's adapter factors (all layers together) are scaled to Frobenius norm <= C.")
    noise_multiplier: float = _f(1.0, "sigma: Gaussian noise std is sigma*C per factor entry (local) "
                                      "or sigma*C^2/m on the Gram matrices (central).")
    delta: float = _f(1e-5, "delta at which the cumulative epsilon is reported each round (privacy_epsilon in metrics.jsonl).")
    head_clip_norm: float = _f(0.0, "Clip norm of the head update (head minus the global head) when method.train_head; "
                                    "0 = clip_norm. Noised with the same sigma.")
    debias: bool = _f(True, "Local DP: subtract the noise's expected contribution sum_n p_n r (sigma C)^2 I "
                            "from the server's Gram matrix.")
    amplification: bool = _f(False, "Central DP: account for amplification by client sampling (fraction_train < 1; replace-one "
                                    "neighbours). Valid only if who is sampled stays secret (florg samples from the run seed).")
    reproducible_noise: bool = _f(False, "Draw the noise from the run seed (repeatable experiments, no real protection) "
                                         "instead of OS entropy.")


@dataclass
class RunConfig:
    seed: int = _f(0, "Global seed: bases, initial A, partitioning, data order.", strategy_keyword="seed", app_key="seed")
    out_dir: str = _f("runs", "Parent folder of run directories.")
    name: str = _f("", "Run directory name (default: <method>-<task>-seed<seed>-<timestamp>).")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=_new_method_config)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain nested dicts keyed by config keys (``method.fedsa-lora``, ...)."""
        return _to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The defaults, then ``data`` (nested, keyed by config keys), then the settings that ``data`` leaves
        to the library (:func:`resolve_defaults`); validated."""
        cfg = cls()
        _merge(cfg, data, prefix="")
        resolve_defaults(cfg, given_keys(data))
        validate(cfg)
        return cfg

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _to_dict(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        val = getattr(obj, f.name)
        out[_key(f)] = _to_dict(val) if dataclasses.is_dataclass(val) else copy.deepcopy(val)
    return out


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any, str, dataclasses.Field]]:
    """``(dotted key, owning object, attribute, field)`` for every leaf of the tree."""
    for f in fields(obj):
        val = getattr(obj, f.name)
        key = prefix + _key(f)
        if dataclasses.is_dataclass(val):
            yield from _leaves(val, key + ".")
        else:
            yield key, obj, f.name, f


def config_keys(cfg: Any | None = None) -> dict[str, tuple[Any, str]]:
    """``{dotted.key: (value, help)}`` for every leaf field (the defaults when ``cfg`` is None)."""
    cfg = cfg if cfg is not None else RunConfig()
    return {key: (getattr(obj, attr), f.metadata.get("help", "")) for key, obj, attr, f in _leaves(cfg)}


def client_view(cfg: RunConfig) -> RunConfig:
    """``cfg`` as a client needs it: every server-only option (field metadata ``server_only``: the Procrustes
    variant, the eigenvalue tolerance, the sampling fraction, the server's evaluation rounds, ...) back at its
    default. The ServerApp sends this view, so a server-only setting neither travels nor splits the clients'
    caches (:func:`florg.run.experiment.get_experiment`). Each reset option is valid on its own at its
    default, so the view validates wherever ``cfg`` does."""
    view = copy.deepcopy(cfg)
    for _, obj, attr, f in _leaves(view):
        if f.metadata.get("server_only"):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            setattr(obj, attr, default)
    return view


def server_only_keys() -> list[str]:
    """The dotted keys that :func:`client_view` resets (in tree order)."""
    return [key for key, _, _, f in _leaves(RunConfig()) if f.metadata.get("server_only")]


def field_aliases(meta: str) -> dict[str, str]:
    """``{alias: dotted key}``, in tree order, for every leaf whose field metadata names one under ``meta``:
    ``strategy_keyword`` (the drop-in strategies' keyword arguments) or ``app_key`` (the Flower App's
    ``[tool.flwr.app.config]`` keys). Method sections included (every registered method's)."""
    return {f.metadata[meta]: key for key, _, _, f in _leaves(RunConfig()) if meta in f.metadata}


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


def validate(cfg: RunConfig) -> None:
    """Check values that can be checked without loading data or a model."""
    for key, obj, attr, f in _leaves(cfg):
        choices = f.metadata.get("choices")
        if choices is not None:
            val = getattr(obj, attr)
            renamed = f.metadata.get("renamed", {}).get(val)  # an old name of a choice
            need(val in choices, key, f"{val!r} is not one of {', '.join(map(repr, choices))}"
                 + (f" ({val!r} was renamed {renamed!r})" if renamed else ""))
    need(cfg.method.rank >= 1, "method.rank", f"must be >= 1, got {cfg.method.rank}")
    need(cfg.method.alpha > 0, "method.alpha", f"must be > 0, got {cfg.method.alpha}")
    need(0.0 <= cfg.method.dropout < 1.0, "method.dropout", "must be in [0, 1)")
    need(all(r >= 1 for r in cfg.method.client_ranks), "method.client_ranks",
         f"every rank must be >= 1, got {cfg.method.client_ranks}")
    for f in fields(cfg.method):  # each method's own options (method.<name>.*)
        options = getattr(cfg.method, f.name)
        if dataclasses.is_dataclass(options) and hasattr(options, "check"):
            options.check(f"method.{_key(f)}")
    need(cfg.data.num_clients >= 1, "data.num_clients", f"must be >= 1, got {cfg.data.num_clients}")
    need(cfg.data.alpha > 0, "data.alpha", f"must be > 0 (the paper uses 0.5), got {cfg.data.alpha}")
    need(cfg.data.classes_per_client >= 1, "data.classes_per_client", "must be >= 1")
    need(cfg.data.max_train_examples >= 0, "data.max_train_examples", "must be >= 0 (0 = all)")
    need(cfg.data.max_test_examples >= 0, "data.max_test_examples", "must be >= 0 (0 = all)")
    need(0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction", "must be in (0, 1)")
    need(0.0 <= cfg.data.validation_fraction < 1.0, "data.validation_fraction", "must be in [0, 1) (0 = no validation split)")
    need(cfg.data.doc_stride >= 0, "data.doc_stride", f"must be >= 0, got {cfg.data.doc_stride}")
    need(cfg.data.max_answer_length >= 1, "data.max_answer_length", f"must be >= 1, got {cfg.data.max_answer_length}")
    need(cfg.data.max_validation_examples >= 0, "data.max_validation_examples", "must be >= 0 (0 = all)")
    need(cfg.train.rounds >= 1, "train.rounds", f"must be >= 1, got {cfg.train.rounds}")
    need(cfg.train.local_steps >= 0, "train.local_steps",
         f"must be >= 0 (0 with train.local_epochs), got {cfg.train.local_steps}")
    need(cfg.train.local_epochs >= 0, "train.local_epochs", f"must be >= 0 (0 = use train.local_steps), "
                                                            f"got {cfg.train.local_epochs}")
    need(cfg.train.local_steps >= 1 or cfg.train.local_epochs >= 1, "train.local_steps",
         "must be >= 1 when train.local_epochs is 0 (set one of them)")
    need(cfg.train.local_steps == 0 or cfg.train.local_epochs == 0, "train.local_epochs",
         f"is {cfg.train.local_epochs} but train.local_steps is {cfg.train.local_steps}: a round is either a number of "
         "steps or of epochs; set train.local_steps=0 to train whole epochs, or train.local_epochs=0")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.lr > 0, "train.lr", f"must be > 0, got {cfg.train.lr}")
    need(cfg.train.head_lr >= 0 and math.isfinite(cfg.train.head_lr), "train.head_lr",
         f"must be >= 0 (0 = train.lr), got {cfg.train.head_lr}")
    need(cfg.train.lr_min >= 0, "train.lr_min", "must be >= 0")
    need(cfg.train.grad_accum >= 1, "train.grad_accum", f"must be >= 1 (1 = no accumulation), got {cfg.train.grad_accum}")
    need(cfg.train.grad_accum <= cfg.train.batch_size, "train.grad_accum",
         f"is {cfg.train.grad_accum} but train.batch_size is {cfg.train.batch_size}: each batch is split into train.grad_accum "
         "micro-batches, so it must be <= train.batch_size")
    need(_valid_device(cfg.train.device), "train.device",
         f"{cfg.train.device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N' (N = the GPU's index)")
    need(cfg.model.max_length >= 4, "model.max_length", "must be >= 4")
    need(0.0 < cfg.federation.fraction_train <= 1.0, "federation.fraction_train", "must be in (0, 1]")
    need(cfg.federation.min_train_nodes >= 1, "federation.min_train_nodes", "must be >= 1")
    need(cfg.federation.min_available_nodes >= 1, "federation.min_available_nodes", "must be >= 1")
    need(cfg.federation.min_train_nodes <= cfg.data.num_clients, "federation.min_train_nodes",
         f"is {cfg.federation.min_train_nodes} but there are only {cfg.data.num_clients} clients; "
         "lower it or raise data.num_clients")
    need(cfg.federation.min_available_nodes <= cfg.data.num_clients, "federation.min_available_nodes",
         f"is {cfg.federation.min_available_nodes} but there are only {cfg.data.num_clients} clients; "
         "lower it or raise data.num_clients")
    need(cfg.federation.client_cpus > 0, "federation.client_cpus", "must be > 0")
    need(cfg.federation.client_gpus >= 0, "federation.client_gpus", "must be >= 0 (0 = the simulated clients get no GPU)")
    need(cfg.federation.round_timeout > 0, "federation.round_timeout", "must be > 0")
    if cfg.federation.faults:
        try:
            parse_faults(cfg.federation.faults)
        except ValueError as exc:
            raise ConfigError(f"config key {exc}") from None
    need(cfg.federation.max_norm >= 0, "federation.max_norm", "must be >= 0 (0 = no bound)")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    need(cfg.eval.generate_examples >= 0, "eval.generate_examples", "must be >= 0 (0 = no generations)")
    need(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    _validate_privacy(cfg, need)


def _valid_device(spec: str) -> bool:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether such a device exists is checked where it is used)."""
    head, _, index = spec.partition(":")
    if not index:
        return spec in ("auto", "cpu", "cuda")
    return head == "cuda" and index.isdigit()


#: keys that change how a run executes but not what it computes; ``florg run --resume`` may set them
RUNTIME_KEYS = (
    "train.device",
    "train.grad_accum",
    "train.gradient_checkpointing",
    "eval.batch_size",
    "federation.client_cpus",
    "federation.client_gpus",
    "federation.backend_cpus",
    "federation.round_timeout",
    "cache.enabled",
    "cache.dir",
)


def _validate_privacy(cfg: RunConfig, need: Any) -> None:
    """DP settings (the method's support is checked by the method: FederatedMethod.check_config)."""
    pv = cfg.privacy
    if pv.mode == "off":
        return
    need(math.isfinite(pv.clip_norm) and pv.clip_norm > 0, "privacy.clip_norm",
         f"must be > 0 under privacy.mode={pv.mode!r}, got {pv.clip_norm}")
    need(math.isfinite(pv.noise_multiplier) and pv.noise_multiplier > 0, "privacy.noise_multiplier",
         f"must be > 0 under privacy.mode={pv.mode!r} (sigma = 0 gives no privacy), got {pv.noise_multiplier}")
    need(0.0 < pv.delta < 1.0, "privacy.delta", f"must be in (0, 1), e.g. 1e-5, got {pv.delta}")
    need(math.isfinite(pv.head_clip_norm) and pv.head_clip_norm >= 0, "privacy.head_clip_norm",
         f"must be >= 0 (0 = clip_norm), got {pv.head_clip_norm}")
    need(not pv.amplification or pv.mode == "central", "privacy.amplification",
         "applies to privacy.mode='central' only (under local DP the server sees who takes part); set it to false")
    if pv.mode == "central":
        need(cfg.method.weighting == "uniform", "method.weighting",
             f"is {cfg.method.weighting!r} but privacy.mode='central' needs 'uniform' "
             "(each client's Gram matrix gets weight 1/m, which bounds its influence by C^2/m); set method.weighting=uniform")


FAULT_KINDS = ("nan", "inf", "shape", "missing", "dtype", "norm", "examples", "error", "stall", "oom")


def parse_faults(entries: list[str]) -> tuple[dict[int, str], float]:
    """``({partition: kind}, dropout fraction)``; raises ``ValueError`` naming the bad entry."""
    per_client: dict[int, str] = {}
    dropout = 0.0
    for entry in entries:
        if entry.startswith("dropout:"):
            try:
                dropout = float(entry.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"federation.faults: bad entry {entry!r}; use dropout:0.3") from None
            if not 0.0 <= dropout < 1.0:
                raise ValueError(f"federation.faults: dropout fraction must be in [0, 1), got {dropout}")
            continue
        kind, _, pid = entry.partition("@")
        if kind not in FAULT_KINDS or not pid.isdigit():
            raise ValueError(
                f"federation.faults: bad entry {entry!r}; use KIND@PARTITION with KIND in {', '.join(FAULT_KINDS)}, "
                "or dropout:FRACTION"
            )
        per_client[int(pid)] = kind
    return per_client, dropout


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

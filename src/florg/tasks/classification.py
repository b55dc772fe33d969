"""Sequence classification: text (or a text pair) -> one of ``num_labels`` classes.

Tasks (``data.task``): ``wordnet`` (embedded, WordNet gloss -> category), ``glue/<task>``
(local files or the Hub), ``local:<path>`` (your own CSV/TSV/JSONL/save_to_disk data); see
:mod:`florg.data.catalog`. Model: ``AutoModelForSequenceClassification`` with a fresh head, trained
fully and FedAvg'd. Loss: cross-entropy. Metrics: accuracy (primary) and mean cross-entropy.
Partitioning label: the class.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from florg.data import available_tasks, load_task
from florg.data.loaders import make_collate, make_loader
from florg.models import head_module_names, load_model

from .base import TaskFamily

if TYPE_CHECKING:
    from florg.data import TaskData

__all__ = ["ClassificationFamily", "by_length", "evaluate_classifier", "label_weighted_accuracy"]


class ClassificationFamily(TaskFamily):
    name = "classification"
    peft_task_type = "SEQ_CLS"
    metrics = ("accuracy", "loss")
    cache_encoded = True  # encode returns datasets; _text_fields only serves encode itself

    @classmethod
    def accepts(cls, task: str) -> bool:
        return True  # the fallback family: load_task names every form it does not know

    @classmethod
    def task_forms(cls) -> list[str]:
        return [*available_tasks(), "local:<path>"]

    def load_data(self) -> TaskData:
        d = self.cfg.data
        data = load_task(
            d.task,
            data_dir=d.data_dir or None,
            seed=self.cfg.seed,
            max_train_examples=d.max_train_examples or None,
            max_test_examples=d.max_test_examples or None,
            test_fraction=d.test_fraction,
            classes=list(d.classes) or None,
        )
        self._text_fields = tuple(data.text_fields)
        return data

    def load_model(self, data: TaskData, dtype: torch.dtype) -> tuple[Any, Any]:
        return load_model(self.cfg.model.name, data.num_labels, dtype=dtype)

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        return head_module_names(model)

    def encode(self, ds: Any, tokenizer: Any, *, train: bool) -> Any:
        return encode(ds, tokenizer, self.cfg.model.max_length, text_fields=self._text_fields)  # the module's

    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return make_collate(int(tokenizer.pad_token_id or 0))

    def evaluate(self, model: torch.nn.Module, data: Any, *, batch_size: int, tokenizer: Any,
                 device: torch.device | None = None) -> dict[str, Any]:
        loader = make_loader(by_length(data), batch_size, shuffle=False, seed=0, tokenizer=tokenizer)
        return evaluate_classifier(model, loader, device=device)

    def client_score(self, result: dict[str, Any], label_counts: list[int]) -> float:
        """Accuracy with each class weighted by the client's own label share (:func:`label_weighted_accuracy`)."""
        return label_weighted_accuracy(result, label_counts)


def by_length(data: Any) -> Any:
    """``data`` ordered by sequence length (stable): evaluation batches then pad to similar lengths.

    The metrics are sums over examples, so the order changes nothing but the padding work (on the
    embedded WordNet tasks about 45 % of the evaluation time).
    """
    if len(data) < 2 or "input_ids" not in data.column_names:
        return data
    lengths = [len(ids) for ids in data["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return data.select(order)


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]],
                        device: torch.device | None = None) -> dict[str, Any]:
    """Mean cross-entropy and accuracy over ``loader`` (plus per-class ``class_correct``/``class_total``)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    class_correct: dict[int, int] = {}
    class_total: dict[int, int] = {}
    for batch in loader:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        labels = batch["labels"]
        n = int(labels.shape[0])
        total_loss += float(out.loss) * n
        hits = out.logits.argmax(-1) == labels
        correct += int(hits.sum())
        count += n
        for y, h in zip(labels.tolist(), hits.tolist(), strict=True):
            class_total[y] = class_total.get(y, 0) + 1
            class_correct[y] = class_correct.get(y, 0) + int(h)
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": total_loss / count, "accuracy": correct / count, "examples": float(count),
            "class_correct": class_correct, "class_total": class_total}


def label_weighted_accuracy(result: dict[str, Any], label_counts: list[int]) -> float:
    """``sum_c pi(c) acc(c)``: per-class accuracies of ``result`` (from :func:`evaluate_classifier`) weighted by ``pi``.

    ``pi`` is ``label_counts`` normalised over the classes that occur in the evaluated set (a
    client's own label distribution, so the result is its expected accuracy on its own data when
    clients differ only in label proportions). Falls back to plain accuracy if none overlap.
    """
    total, correct = result["class_total"], result["class_correct"]
    weights = {c: float(n) for c, n in enumerate(label_counts) if n > 0 and total.get(c, 0) > 0}
    mass = sum(weights.values())
    if mass <= 0:
        return float(result["accuracy"])
    return sum(w * correct[c] / total[c] for c, w in weights.items()) / mass


# ---------------------------------------------------------------------------------------------
# Tokenisation


def _detect_text_fields(columns: Sequence[str]) -> tuple[str, ...]:
    for pair in (("text_a", "text_b"), ("sentence1", "sentence2"), ("premise", "hypothesis"),
                 ("question", "sentence"), ("question1", "question2")):  # fmt: skip
        if all(c in columns for c in pair):
            return pair
    for single in ("text", "sentence"):
        if single in columns:
            return (single,)
    raise ValueError(f"cannot tell which columns hold the text (columns: {', '.join(columns)}); pass text_fields")


def encode(
    data: Any,
    tokenizer: Any,
    max_length: int = 128,
    *,
    text_fields: Sequence[str] | None = None,
    split: str = "train",
    label_column: str = "label",
    batch_size: int = 1000,
) -> Any:
    """Tokenize a dataset for sequence classification (batched, truncating to ``max_length``).

    Parameters
    ----------
    data:
        A ``datasets.Dataset``, or a :class:`~florg.data.TaskData` (then ``split`` picks
        ``train`` or ``test`` and its ``text_fields`` are used).
    tokenizer:
        The tokenizer from :func:`florg.models.load_model`.
    max_length:
        Truncation length in tokens; sentence pairs are truncated longest-first.
    text_fields:
        One column, or two for sentence pairs; detected from the column names when omitted.

    Returns
    -------
    datasets.Dataset
        Columns ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer
        makes them, e.g. BERT pairs) and ``labels``; unpadded (pad per batch with
        :func:`make_loader`).
    """
    if int(max_length) < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if hasattr(data, "text_fields") and hasattr(data, "train"):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        fields = tuple(text_fields) if text_fields else tuple(data.text_fields)
        ds = getattr(data, split)
    else:
        ds = data
        fields = tuple(text_fields) if text_fields else _detect_text_fields(ds.column_names)
    if not 1 <= len(fields) <= 2:
        raise ValueError(f"text_fields must name one or two columns, got {fields!r}")
    missing = [c for c in (*fields, label_column) if c not in ds.column_names]
    if missing:
        raise ValueError(f"columns {missing} not in the dataset (columns: {', '.join(ds.column_names)})")

    def tok(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[f] for f in fields]
        out = tokenizer(*texts, truncation=True, max_length=int(max_length), padding=False)
        enc = {k: out[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in out}
        enc["labels"] = [int(y) for y in batch[label_column]]
        return enc

    # lazy: datasets: florg.run.experiment imports florg.tasks and must not load it (test_gpu_check.py)
    import datasets

    # datasets would otherwise fingerprint the map by pickling ``tok`` with the whole tokenizer
    # (about 0.1 s of CPU per call, most of the cost of encoding a small partition); the
    # fingerprint only names in-memory results here, so a digest of the inputs does.
    fingerprint = hashlib.sha256(repr((
        getattr(ds, "_fingerprint", None), type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
        len(tokenizer), int(max_length), fields, label_column,
    )).encode()).hexdigest()[:32]
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return ds.map(tok, batched=True, batch_size=batch_size, remove_columns=ds.column_names, keep_in_memory=True,
                      new_fingerprint=fingerprint)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()

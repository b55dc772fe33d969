"""Extractive question answering (SQuAD v1.1 style): (question, context) -> the answer's span in the context.

Tasks (``data.task``): ``wordnet-qa`` (embedded, built from WordNet's usage examples, see
:mod:`florg.data.wordnet_qa`), ``squad`` (SQuAD v1.1 from ``data.data_dir``, else the Hub) and
``squad:<path>`` (a SQuAD v1.1 JSON file or folder); see :mod:`florg.data.squad`.

Model: ``AutoModelForQuestionAnswering`` (an encoder such as BERT or RoBERTa; ``minilm`` gets a
fresh ``qa_outputs`` head), whose ``qa_outputs`` span head is trained fully and FedAvg'd under
``head/`` keys like the classifier. A causal LM (e.g. ``smollm2``) is refused unless its checkpoint
already is a ``...ForQuestionAnswering`` model: each of its tokens sees only the text to its left.

Features (the usual transformers recipe): ``tokenizer(question, context, truncation="only_second",
max_length=model.max_length, stride=data.doc_stride, return_overflowing_tokens=True,
return_offsets_mapping=True)``. A long context becomes several windows that overlap by the stride
(capped at half of the room the shortest window leaves for the context); a question longer than half
of ``model.max_length`` tokens is cut to that length first. A training window whose context part
holds the whole first gold answer is labelled with the answer's first and last token; any other
window is labelled with the CLS token (0, 0), i.e. "not in this window".

Loss: the model's own (mean of the start and end cross-entropies). Evaluation: for every example,
the best span over all its windows (start logit + end logit among the ``n_best`` = 20 highest of
each, end >= start, at most ``data.max_answer_length`` tokens, inside the context) is mapped back to
the context text through the tokenizer's offsets.

Metrics (primary first): ``f1`` and ``exact_match``, SQuAD v1.1's official definitions (answers
normalised: lower case, punctuation and the articles a/an/the removed, whitespace collapsed; the
maximum over the gold answers; averaged over examples), as fractions in [0, 1] (x100 for SQuAD's
usual scale); ``loss``, the mean loss over evaluation windows. The run's ``summary.json`` names
``f1`` as its metric. Partitioning label: the article title (SQuAD) or the lexicographer category
(``wordnet-qa``), see :mod:`florg.data.squad`.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForQuestionAnswering
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
)

from florg.config import ConfigError
from florg.data.squad import load_squad
from florg.data.wordnet_qa import load_wordnet_qa
from florg.models import load_pretrained, resolve_model

from .base import TaskFamily
from .classification import label_weighted_accuracy

__all__ = [
    "ExtractiveQAFamily",
    "QAEvalSet",
    "best_spans",
    "encode_qa",
    "evaluate_qa",
    "exact_match_score",
    "f1_score",
    "normalize_answer",
    "qa_collate",
    "squad_scores",
]

#: candidates per window for the start and the end of a span (the transformers recipe's n_best_size)
N_BEST = 20
#: the least room (tokens) a window must leave for the context
_MIN_CONTEXT_TOKENS = 8


# ------------------------------------------------------------------------------- metrics
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Token-level F1 of the normalised answers (bag of tokens; 0 when no token is shared)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, truths: Sequence[str]) -> tuple[float, float]:
    """``(exact_match, f1)`` of one prediction: the maximum over the gold answers."""
    if not truths:
        raise ValueError("an example without gold answers cannot be scored")
    return max(exact_match_score(prediction, t) for t in truths), max(f1_score(prediction, t) for t in truths)


# ------------------------------------------------------------------------------- features
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class QAEvalSet:
    """An evaluation split: its examples and their windows (features), kept as Python lists.

    ``features`` maps ``input_ids``/``attention_mask``/``token_type_ids``/``start_positions``/
    ``end_positions`` to per-window lists, plus ``example_index`` (the window's example) and
    ``offsets`` (per token: ``(start, end)`` characters in the context, ``None`` outside it).
    ``len()`` is the number of examples.
    """

    examples: list[dict[str, Any]]  # id, context, answers (gold texts), label
    features: dict[str, list]
    windows_of: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.windows_of:
            self.windows_of = [[] for _ in self.examples]
            for w, e in enumerate(self.features["example_index"]):
                self.windows_of[e].append(w)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_windows(self) -> int:
        return len(self.features["input_ids"])

    def select(self, indices: Sequence[int]) -> QAEvalSet:
        """The examples ``indices`` (in that order) with their windows."""
        windows = [w for e in indices for w in self.windows_of[e]]
        new_index = {e: i for i, e in enumerate(indices)}
        feats = {k: [v[w] for w in windows] for k, v in self.features.items()}
        feats["example_index"] = [new_index[e] for e in feats["example_index"]]
        return QAEvalSet([self.examples[e] for e in indices], feats)


def _window_geometry(tokenizer: Any, max_length: int, doc_stride: int) -> tuple[int, int]:
    """``(question token budget, effective stride)`` for windows of ``max_length`` tokens."""
    specials = int(tokenizer.num_special_tokens_to_add(pair=True))
    q_budget = max_length // 2
    room = max_length - q_budget - specials
    if room < _MIN_CONTEXT_TOKENS:
        raise ValueError(
            f"model.max_length={max_length} leaves {room} tokens for the context of a QA window; "
            f"raise model.max_length (at least {2 * (_MIN_CONTEXT_TOKENS + specials)}, e.g. 64 or 384)"
        )
    return q_budget, max(0, min(int(doc_stride), room // 2))


def _cut_questions(questions: Sequence[str], tokenizer: Any, budget: int) -> list[str]:
    """Questions without leading spaces, cut after ``budget`` tokens where longer."""
    questions = [q.lstrip() for q in questions]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, offsets in zip(questions, enc["offset_mapping"], strict=True):
        out.append(q[: offsets[budget - 1][1]] if len(offsets) > budget else q)
    return out


def encode_qa(columns: dict[str, list], tokenizer: Any, max_length: int, doc_stride: int) -> dict[str, list]:
    """Windows of QA examples with span labels, as per-window lists (see the module docstring).

    ``columns`` holds ``question``, ``context`` and ``answers`` lists. Returns the model inputs,
    ``start_positions``/``end_positions`` (CLS index where the first gold answer is not wholly inside
    the window's context), ``example_index`` and ``offsets`` (``None`` outside the context).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("extractive QA needs a fast tokenizer (character offsets); this model's tokenizer is not one")
    budget, stride = _window_geometry(tokenizer, int(max_length), int(doc_stride))
    questions = _cut_questions(columns["question"], tokenizer, budget)
    contexts = list(columns["context"])
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=int(max_length), stride=stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding=False)
    out: dict[str, list] = {k: list(enc[k]) for k in _MODEL_KEYS if k in enc}
    out.update(start_positions=[], end_positions=[], example_index=[], offsets=[])
    cls_id = tokenizer.cls_token_id
    for i, ex in enumerate(enc["overflow_to_sample_mapping"]):
        ids, seq = enc["input_ids"][i], enc.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq, strict=True)]
        cls = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
        answers = columns["answers"][ex]
        a_start = int(answers["answer_start"][0])
        a_end = a_start + len(answers["text"][0])
        ctx = [t for t, o in enumerate(offsets) if o is not None]
        start = end = cls
        if ctx and offsets[ctx[0]][0] <= a_start and offsets[ctx[-1]][1] >= a_end:
            start = next(t for t in ctx if offsets[t][1] > a_start)
            end = next(t for t in reversed(ctx) if offsets[t][0] < a_end)
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out["example_index"].append(int(ex))
        out["offsets"].append(offsets)
    return out


def qa_collate(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right-pad windows to the longest one; ``start_positions``/``end_positions`` become the targets."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(ex["input_ids"]) for ex in batch)
        out: dict[str, torch.Tensor] = {}
        for key in _MODEL_KEYS:
            if key in batch[0]:
                fill = pad_token_id if key == "input_ids" else 0
                out[key] = torch.tensor([list(ex[key]) + [fill] * (longest - len(ex[key])) for ex in batch])
        for key in ("start_positions", "end_positions"):
            out[key] = torch.tensor([int(ex[key]) for ex in batch], dtype=torch.long)
        return out

    return collate


# ------------------------------------------------------------------------------- evaluation
def best_spans(eval_set: QAEvalSet, start_logits: Sequence[Sequence[float]], end_logits: Sequence[Sequence[float]],
               max_answer_length: int, n_best: int = N_BEST) -> list[str]:
    """The predicted answer text of every example: its best span over all its windows ("" if none is valid)."""
    predictions = []
    for e, example in enumerate(eval_set.examples):
        best, text = -np.inf, ""
        for w in eval_set.windows_of[e]:
            offsets = eval_set.features["offsets"][w]
            s_log = np.asarray(start_logits[w][: len(offsets)], dtype=np.float64)
            e_log = np.asarray(end_logits[w][: len(offsets)], dtype=np.float64)
            in_ctx = np.array([o is not None for o in offsets])
            s_log = np.where(in_ctx, s_log, -np.inf)
            e_log = np.where(in_ctx, e_log, -np.inf)
            starts = np.argsort(-s_log, kind="stable")[:n_best]
            ends = np.argsort(-e_log, kind="stable")[:n_best]
            for s in starts:
                if not in_ctx[s]:
                    continue
                for t in ends:
                    if not in_ctx[t] or t < s or t - s + 1 > max_answer_length:
                        continue
                    score = s_log[s] + e_log[t]
                    if score > best:
                        best, text = score, example["context"][offsets[s][0]:offsets[t][1]]
        predictions.append(text)
    return predictions


@torch.no_grad()
def evaluate_qa(model: torch.nn.Module, eval_set: QAEvalSet, *, batch_size: int, pad_token_id: int,
                max_answer_length: int, device: torch.device | None = None) -> dict[str, Any]:
    """F1, exact match (fractions), mean window loss, the predictions, and per-label F1 sums."""
    if len(eval_set) == 0:
        raise ValueError("the evaluation set is empty")
    model.eval()
    collate = qa_collate(pad_token_id)
    feats = eval_set.features
    keys = [k for k in (*_MODEL_KEYS, "start_positions", "end_positions") if k in feats]
    starts, ends = [], []
    loss_sum = 0.0
    n = eval_set.num_windows
    for b in range(0, n, batch_size):
        rows = [{k: feats[k][w] for k in keys} for w in range(b, min(n, b + batch_size))]
        batch = collate(rows)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        loss_sum += float(out.loss) * len(rows)
        starts.extend(out.start_logits.float().cpu().tolist())
        ends.extend(out.end_logits.float().cpu().tolist())
    predictions = best_spans(eval_set, starts, ends, max_answer_length)
    em_sum = f1_sum = 0.0
    label_total: dict[int, int] = {}
    label_f1: dict[int, float] = {}
    for pred, example in zip(predictions, eval_set.examples, strict=True):
        em, f1 = squad_scores(pred, example["answers"])
        em_sum += em
        f1_sum += f1
        y = int(example["label"])
        label_total[y] = label_total.get(y, 0) + 1
        label_f1[y] = label_f1.get(y, 0.0) + f1
    count = len(eval_set)
    return {"f1": f1_sum / count, "exact_match": em_sum / count, "loss": loss_sum / n, "examples": float(count),
            "windows": float(n), "predictions": predictions, "label_total": label_total, "label_f1": label_f1}


# ------------------------------------------------------------------------------- the family
class ExtractiveQAFamily(TaskFamily):
    name = "extractive-qa"
    peft_task_type = "QUESTION_ANS"
    metrics = ("f1", "exact_match", "loss")

    @classmethod
    def accepts(cls, task: str) -> bool:
        low = task.strip().lower()
        return low in ("squad", "wordnet-qa") or low.startswith("squad:")

    @classmethod
    def task_forms(cls) -> list[str]:
        return ["wordnet-qa", "squad", "squad:<path>"]

    def load_data(self):  # noqa: ANN201
        self._check_model()  # a model that cannot extract spans fails before any data is read
        d = self.cfg.data
        caps = dict(seed=self.cfg.seed, test_fraction=d.test_fraction,
                    max_train_examples=d.max_train_examples or None, max_test_examples=d.max_test_examples or None)
        key = d.task.strip()
        if key.lower() == "wordnet-qa":
            return load_wordnet_qa(d.data_dir or None, **caps)
        if key.lower().startswith("squad:"):
            path = key[len("squad:"):].strip()
            if not path:
                raise ValueError("data.task='squad:' needs a path: squad:<file.json or folder>")
            return load_squad(path, name=f"squad:{path}", **caps)
        return load_squad(d.data_dir or None, **caps)

    def load_model(self, data, dtype: torch.dtype) -> tuple[Any, Any]:  # noqa: ANN001
        model, tokenizer = load_pretrained(self.cfg.model.name, AutoModelForQuestionAnswering, dtype=dtype)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"model.name={self.cfg.model.name!r}: extractive QA needs a fast tokenizer "
                             "(character offsets); use a model with a tokenizer.json, e.g. minilm")
        return model, tokenizer

    def _check_model(self) -> None:
        """Refuse a model that cannot be a span extractor (from its config, before data or weights are loaded)."""
        name, task = self.cfg.model.name, self.cfg.data.task
        try:
            config = AutoConfig.from_pretrained(resolve_model(name))
        except (OSError, ValueError):
            return  # load_pretrained reports a model that cannot be found, in one line
        archs = list(getattr(config, "architectures", None) or [])
        if any(a.endswith("ForQuestionAnswering") for a in archs):
            return
        model_type = getattr(config, "model_type", "")
        if model_type not in MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES:
            raise ConfigError(f"config key 'data.task': {task!r} is extractive QA, but model.name={name!r} (model "
                              f"type {model_type!r}) has no question-answering head in transformers; use an encoder "
                              "such as model.name=minilm, BERT or RoBERTa")
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
            not archs and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
        if causal:
            shown = archs[0] if archs else model_type
            raise ConfigError(f"config key 'data.task': {task!r} is extractive QA, which needs an encoder with a span "
                              f"head, but model.name={name!r} is a causal LM ({shown}; each token sees only the text "
                              "to its left); use model.name=minilm (or another BERT/RoBERTa encoder, or a "
                              "...ForQuestionAnswering checkpoint), or an instruction-tuning task for this model")

    def head_modules(self, model: torch.nn.Module) -> list[str]:
        children = dict(model.named_children())
        if "qa_outputs" not in children:
            raise ValueError(f"cannot find the QA span head 'qa_outputs' in {type(model).__name__} "
                             f"(top-level modules: {', '.join(children)})")
        return ["qa_outputs"]

    def _windows(self, ds: Any, tokenizer: Any) -> dict[str, list]:
        cols = {c: ds[c] for c in ("question", "context", "answers")} if len(ds) else \
            {"question": [], "context": [], "answers": []}
        return encode_qa(cols, tokenizer, self.cfg.model.max_length, self.cfg.data.doc_stride)

    def encode(self, ds: Any, tokenizer: Any, *, train: bool) -> Any:
        feats = self._windows(ds, tokenizer)
        if train:
            # lazy: datasets: florg.run.experiment imports florg.tasks and must not load it (test_gpu_check.py)
            import datasets

            keep = [k for k in (*_MODEL_KEYS, "start_positions", "end_positions") if k in feats]
            return datasets.Dataset.from_dict({k: feats[k] for k in keep})
        examples = [{"id": i, "context": c, "answers": list(a["text"]), "label": int(y)}
                    for i, c, a, y in zip(ds["id"], ds["context"], ds["answers"], ds["label"], strict=True)]
        return QAEvalSet(examples, feats)

    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return qa_collate(int(tokenizer.pad_token_id or 0))

    def evaluate(self, model: torch.nn.Module, data: Any, *, batch_size: int, tokenizer: Any,
                 device: torch.device | None = None) -> dict[str, Any]:
        return evaluate_qa(model, data, batch_size=batch_size, pad_token_id=int(tokenizer.pad_token_id or 0),
                           max_answer_length=self.cfg.data.max_answer_length, device=device)

    def client_score(self, result: dict[str, Any], label_counts: list[int]) -> float:
        """F1 with each label's examples weighted by the client's own label share (plain F1 without overlap).

        For ``wordnet-qa`` the labels are lexicographer categories, shared by the train and test
        splits; SQuAD's dev articles are not training articles, so there it is the plain F1.
        """
        return label_weighted_accuracy(
            {"accuracy": result["f1"], "class_total": result["label_total"], "class_correct": result["label_f1"]},
            label_counts)

    def select(self, data: Any, indices: list[int]) -> Any:
        return data.select(indices)

    def size(self, data: Any) -> int:
        return len(data)

    def finish(self, model: torch.nn.Module, experiment: Any, run_path: Path) -> None:
        """``predictions.json``: the final model's answer for every test question (``{id: text}``, the
        input format of SQuAD v1.1's official evaluation script)."""
        res = experiment.evaluate()
        preds = {ex["id"]: p for ex, p in zip(experiment.test.examples, res["predictions"], strict=True)}
        tmp = run_path / "predictions.json.tmp"
        tmp.write_text(json.dumps(preds, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(run_path / "predictions.json")

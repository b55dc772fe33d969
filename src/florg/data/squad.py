"""Extractive question answering data: SQuAD v1.1 JSON files, the Hub copy, and the shared QA record.

Every QA task (``squad``, ``squad:<path>``, ``wordnet-qa``) yields ``datasets.Dataset`` splits with
the columns of the Hugging Face ``squad`` data set plus a partitioning label:

``id`` (str), ``title`` (str), ``context`` (str), ``question`` (str),
``answers`` (``{"text": [str, ...], "answer_start": [int, ...]}``: every gold answer, a span of
``context`` that starts at character ``answer_start``), ``label`` (``ClassLabel``).

The ``label`` column is what the non-IID partitioners stratify by. For SQuAD it is the article
(``title``): a Dirichlet(alpha) partition then gives every client its own mixture of Wikipedia
articles (small alpha: a few articles per client), which skews topic, vocabulary and question
style the way the class skew of a classification task does. For ``wordnet-qa`` it is the synset's
lexicographer category (``noun.animal``, ``verb.motion``, ...).

SQuAD v1.1 sources
------------------
``squad`` with ``data.data_dir``
    a folder holding ``train-v1.1.json`` and ``dev-v1.1.json`` (the official file names) or
    ``train.json`` and ``dev.json`` (also ``validation.json`` / ``test.json``); a folder with a
    train file only is split like a lone file.
``squad:<path>``
    the same folder layout, or one JSON file in the official layout, split into train and test by
    whole articles (``data.test_fraction`` of the questions, rounded up to whole articles; no
    article is in both splits, as in the official train/dev split).
``squad`` without ``data.data_dir``
    ``datasets.load_dataset("rajpurkar/squad")`` (train + validation) when the Hub is reachable.
    ``florg run`` runs offline by default (``HF_DATASETS_OFFLINE=1`` unless you set it), so this
    fails at once with a message that names ``data.data_dir``.

File layout (the official one)::

    {"version": "1.1", "data": [{"title": "...", "paragraphs": [{"context": "...",
      "qas": [{"id": "...", "question": "...", "answers": [{"text": "...", "answer_start": 0}]}]}]}]}

A missing or mistyped field is an error naming the file and the entry (``data[3].paragraphs[1]
.qas[0]``). An answer whose text is not at ``answer_start`` in its context is skipped (counted and
logged once per file), a question left without answers is dropped, and a file left with no
question at all is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .catalog import DataUnavailableError, TaskData

__all__ = [
    "QA_COLUMNS",
    "SQUAD_HUB_ID",
    "SquadFormatError",
    "capped",
    "group_holdout",
    "load_squad",
    "qa_dataset",
    "read_squad_json",
]

log = logging.getLogger(__name__)

#: Hub repository of SQuAD v1.1 (used only when no local files are given).
SQUAD_HUB_ID = "rajpurkar/squad"

#: Columns of every QA split (besides ``label``).
QA_COLUMNS = ("id", "title", "context", "question", "answers")

_TRAIN_NAMES = ("train-v1.1.json", "train.json")
_TEST_NAMES = ("dev-v1.1.json", "dev.json", "validation.json", "test.json")

_LAYOUT = ('the SQuAD v1.1 layout is {"version": ..., "data": [{"title", "paragraphs": [{"context", '
           '"qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}')


class SquadFormatError(ValueError):
    """A SQuAD JSON file that does not follow the official layout (names the file and the entry)."""


def _field(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    if not isinstance(obj, dict):
        raise SquadFormatError(f"{path}: {where} is a {type(obj).__name__}, expected an object; {_LAYOUT}")
    if key not in obj:
        raise SquadFormatError(f"{path}: {where} has no '{key}' field; {_LAYOUT}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SquadFormatError(f"{path}: {where}.{key} is a {type(value).__name__}, expected {want}")
    return value


def read_squad_json(path: str | os.PathLike[str]) -> tuple[dict[str, list], dict[str, int]]:
    """Parse one SQuAD v1.1 JSON file into QA columns (no ``label``) and counts.

    Returns ``(columns, counts)``: ``columns`` maps each of :data:`QA_COLUMNS` to a list (one
    entry per kept question); ``counts`` holds ``questions`` (kept), ``answers`` (kept),
    ``bad_answers`` (skipped: text not at ``answer_start`` in the context) and
    ``dropped_questions`` (left with no answer). Raises :class:`SquadFormatError` for a file that
    is not JSON or not in the official layout, or that keeps no question.
    """
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SquadFormatError(f"{p}: cannot read the file ({type(exc).__name__}: {exc})") from None
    except json.JSONDecodeError as exc:
        raise SquadFormatError(f"{p}: not valid JSON ({exc}); {_LAYOUT}") from None
    articles = _field(raw, "data", list, p, "the top level")
    cols: dict[str, list] = {c: [] for c in QA_COLUMNS}
    counts = {"questions": 0, "answers": 0, "bad_answers": 0, "dropped_questions": 0}
    for ai, article in enumerate(articles):
        where_a = f"data[{ai}]"
        title = _field(article, "title", str, p, where_a)
        for pi, para in enumerate(_field(article, "paragraphs", list, p, where_a)):
            where_p = f"{where_a}.paragraphs[{pi}]"
            context = _field(para, "context", str, p, where_p)
            for qi, qa in enumerate(_field(para, "qas", list, p, where_p)):
                where_q = f"{where_p}.qas[{qi}]"
                qid = _field(qa, "id", (str, int), p, where_q)
                question = _field(qa, "question", str, p, where_q)
                texts, starts = [], []
                for ni, ans in enumerate(_field(qa, "answers", list, p, where_q)):
                    where_n = f"{where_q}.answers[{ni}]"
                    text = _field(ans, "text", str, p, where_n)
                    start = _field(ans, "answer_start", int, p, where_n)
                    if not text or start < 0 or context[start:start + len(text)] != text:
                        counts["bad_answers"] += 1
                        continue
                    texts.append(text)
                    starts.append(start)
                if not texts:
                    counts["dropped_questions"] += 1
                    continue
                cols["id"].append(str(qid))
                cols["title"].append(title)
                cols["context"].append(context)
                cols["question"].append(question)
                cols["answers"].append({"text": texts, "answer_start": starts})
                counts["questions"] += 1
                counts["answers"] += len(texts)
    if counts["bad_answers"]:
        log.warning("%s: skipped %d answer(s) whose text is not at answer_start in their context "
                    "(%d question(s) left without an answer were dropped)",
                    p, counts["bad_answers"], counts["dropped_questions"])
    if counts["questions"] == 0:
        why = (f"all {counts['bad_answers']} answers are outside their context (context[answer_start:"
               "answer_start+len(text)] != text)") if counts["bad_answers"] else "it holds no question with an answer"
        raise SquadFormatError(f"{p}: no usable question: {why}")
    return cols, counts


def qa_dataset(columns: dict[str, list], labels: Sequence[int], label_names: Sequence[str]) -> Any:
    """An in-memory ``datasets.Dataset`` of QA columns with an int ``label`` (``ClassLabel``)."""
    # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
    import datasets

    feats = datasets.Features({
        "id": datasets.Value("string"),
        "title": datasets.Value("string"),
        "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.List(datasets.Value("string")),
                    "answer_start": datasets.List(datasets.Value("int32"))},
        "label": datasets.ClassLabel(names=list(label_names)),
    })
    data = {c: list(columns[c]) for c in QA_COLUMNS}
    data["label"] = [int(y) for y in labels]
    return datasets.Dataset.from_dict(data, features=feats)


def group_holdout(groups: Sequence[str], seed: int, fraction: float) -> tuple[list[int], list[int]]:
    """``(train_indices, test_indices)``: whole groups held out until ``fraction`` of the rows is reached.

    Groups are drawn in a seed-fixed random order; at least one group goes to each side (so at
    least two groups are needed). Indices keep the input order.
    """
    # lazy: numpy: florg predict's argument check imports florg.data (test_predict_startup.py)
    import numpy as np

    distinct = list(dict.fromkeys(groups))
    if len(distinct) < 2:
        raise ValueError(f"cannot hold out a test split: all {len(groups)} rows belong to one group")
    rng = np.random.default_rng(seed)
    order = [distinct[i] for i in rng.permutation(len(distinct))]
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    want = max(1, int(round(float(fraction) * len(groups))))
    held: set[str] = set()
    count = 0
    for g in order[:-1]:  # the last group always stays in training
        if count >= want:
            break
        held.add(g)
        count += sizes[g]
    test = [i for i, g in enumerate(groups) if g in held]
    train = [i for i, g in enumerate(groups) if g not in held]
    return train, test


def capped(idx: Sequence[int], n: int | None, seed: int) -> list[int]:
    """A seed-fixed random subset of ``n`` of the indices ``idx`` (all of them when ``n`` is None or not smaller)."""
    # lazy: numpy: florg predict's argument check imports florg.data (test_predict_startup.py)
    import numpy as np

    idx = list(idx)
    if n is None or n >= len(idx):
        return idx
    keep = np.random.default_rng(seed).permutation(len(idx))[:n]
    return [idx[i] for i in sorted(keep)]


def _split_columns(cols: dict[str, list], idx: Sequence[int]) -> dict[str, list]:
    return {c: [v[i] for i in idx] for c, v in cols.items()}


def _holdout_columns(cols: dict[str, list], seed: int, fraction: float) -> tuple[dict[str, list], dict[str, list]]:
    """Hold out whole articles (titles), else whole paragraphs, else questions."""
    for key in ("title", "context", "id"):
        if len(set(cols[key])) >= 2:
            train, test = group_holdout(cols[key], seed, fraction)
            return _split_columns(cols, train), _split_columns(cols, test)
    raise ValueError("cannot hold out a test split from a single question; give a dev file or more data")


def _find(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _layout_hint() -> str:
    return (f"expected a folder with {' or '.join(_TRAIN_NAMES)} (plus {', '.join(_TEST_NAMES)}), "
            "or one SQuAD v1.1 JSON file (split by data.test_fraction)")


def _read_local(path: Path, name: str, seed: int, test_fraction: float) -> tuple[dict, dict, str]:
    if path.is_file():
        cols, _ = read_squad_json(path)
        train, test = _holdout_columns(cols, seed, test_fraction)
        return train, test, str(path)
    if path.is_dir():
        train_file = _find(path, _TRAIN_NAMES)
        if train_file is None:
            raise DataUnavailableError(f"task {name}: no SQuAD train file in {str(path)!r}; {_layout_hint()}")
        cols, _ = read_squad_json(train_file)
        test_file = _find(path, _TEST_NAMES)
        if test_file is None:
            train, test = _holdout_columns(cols, seed, test_fraction)
        else:
            train, test = cols, read_squad_json(test_file)[0]
        return train, test, str(path)
    raise DataUnavailableError(f"task {name}: {str(path)!r} does not exist; {_layout_hint()}")


def _read_hub() -> tuple[dict, dict, str]:
    try:
        # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
        import datasets

        dd = datasets.load_dataset(SQUAD_HUB_ID)
        train, test = dd["train"], dd["validation"]
    except Exception as exc:  # offline, no such repo, network errors: all reported the same way
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise DataUnavailableError(
            f"task squad: no data.data_dir given and the Hub copy ({SQUAD_HUB_ID}) could not be loaded "
            f"({type(exc).__name__}{': ' + first if first else ''}); set data.data_dir (--data-dir) to a folder "
            "with train-v1.1.json and dev-v1.1.json, or data.task=squad:<file.json>"
        ) from exc

    def columns(ds: Any) -> dict[str, list]:
        cols = {c: list(ds[c]) for c in QA_COLUMNS}
        cols["answers"] = [{"text": list(a["text"]), "answer_start": [int(s) for s in a["answer_start"]]}
                           for a in cols["answers"]]
        return cols

    return columns(train), columns(test), f"hub:{SQUAD_HUB_ID}"


def load_squad(
    source: str | os.PathLike[str] | None = None,
    *,
    name: str = "squad",
    seed: int = 0,
    test_fraction: float = 0.1,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
) -> TaskData:
    """SQuAD v1.1 as a QA :class:`~florg.data.TaskData` (``label`` = article index).

    ``source`` is a folder or a JSON file (see the module docstring), or ``None`` for the Hub copy.
    The caps draw seed-fixed random subsets of questions after the train/test split. Label names
    are the article titles, training articles first.
    """
    if source is None:
        train, test, where = _read_hub()
    else:
        train, test, where = _read_local(Path(source).expanduser(), name, seed, test_fraction)
    titles = list(dict.fromkeys([*train["title"], *test["title"]]))
    index = {t: i for i, t in enumerate(titles)}
    train = _split_columns(train, capped(range(len(train["id"])), max_train_examples, seed))
    test = _split_columns(test, capped(range(len(test["id"])), max_test_examples, seed + 1))
    return TaskData(
        name,
        qa_dataset(train, [index[t] for t in train["title"]], titles),
        qa_dataset(test, [index[t] for t in test["title"]], titles),
        ("question", "context"),
        titles,
        source=where,
    )

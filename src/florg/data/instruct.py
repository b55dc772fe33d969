"""Instruction-tuning data: (prompt turns, response) pairs for causal-LM fine-tuning.

Task forms (``data.task``)
--------------------------
``wordnet-define`` (embedded, offline)
    WordNet definitions as instructions: a system turn ``You are a dictionary.`` (it also keeps
    chat templates from adding a long default system prompt) and the user turn ``What does the
    word 'X' mean?`` -> the synset's gloss (quoted usage examples removed,
    :func:`florg.data.wordnet.clean_gloss`). One question per
    synset, about its first lemma (underscores -> spaces, adjective markers such as ``(a)``
    dropped). A word that heads several synsets is ambiguous and dropped, so every question has
    one answer; repeated glosses are dropped too. Categories: ``data.classes`` (lexicographer
    files, any part of speech); empty = every noun category (26). Data: ``data.data_dir`` or
    ``/usr/share/wordnet``. The held-out test split is stratified by category
    (``data.test_fraction``).
``instruct:<path>``
    Your own data: a ``.jsonl`` file (or a ``.json`` file holding one list of objects), or a
    folder with ``train.jsonl`` plus optionally ``test.jsonl`` (else ``validation.jsonl``) as the
    test split. A lone train file is split with ``data.test_fraction`` (stratified by category).
``instruct:hub:<dataset id>``
    A Hugging Face Hub dataset with the same fields (e.g. ``vicgalle/alpaca-gpt4``,
    ``flwrlabs/alpaca-gpt4``), loaded with ``datasets.load_dataset`` (its ``test`` split when
    there is one, else a hold-out). Needs network access or a populated Hugging Face cache; with
    ``HF_DATASETS_OFFLINE=1`` it fails at once with one line saying so.

Row formats (one JSON object per line; both may be mixed in one file)
---------------------------------------------------------------------
* **Alpaca**: ``{"instruction": str, "input": str (optional), "output": str}``;
* **chat**: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``,
  ending with the assistant's answer (the response to learn) after at least one user turn;
  earlier turns are part of the prompt.

Either may carry ``"category": str``: the partitioning label (the ``label`` column that the
non-IID partitioners stratify by). Rows without one are in the category ``uncategorised``; when
no row has one there is a single category, so ``data.partition=dirichlet`` degenerates to a
random split with Dirichlet-distributed client sizes (``data.partition=iid`` gives equal ones).
For ``wordnet-define`` the category is the synset's lexicographer file (``noun.animal``, ...), so
Dirichlet clients differ by topic.

A malformed row is an error naming the file and the line (1-based) and what the row needs.

Raw columns (what :mod:`florg.tasks.instruction` encodes): ``messages`` (the prompt turns as a
JSON string, without the answer), ``input`` (Alpaca's input, "" for chat rows), ``output`` (the
answer) and ``label`` (a ``ClassLabel`` over the categories).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .catalog import DataUnavailableError, TaskData
from .splits import random_subset, stratified_holdout
from .wordnet import WORDNET_LEXNAMES, clean_gloss, iter_synsets, resolve_wordnet_dir

__all__ = [
    "HUB_PREFIX",
    "INSTRUCT_PREFIX",
    "NO_CATEGORY",
    "WORDNET_DEFINE",
    "InstructDataError",
    "DEFINE_SYSTEM",
    "define_question",
    "define_turns",
    "instruct_task_forms",
    "is_instruct_task",
    "load_instruct_task",
    "parse_record",
    "read_records",
]

INSTRUCT_PREFIX = "instruct:"
HUB_PREFIX = "hub:"
WORDNET_DEFINE = "wordnet-define"
#: the category of rows that carry none
NO_CATEGORY = "uncategorised"
#: the wordnet-define categories when data.classes is empty: every noun lexicographer file
NOUN_CLASSES: tuple[str, ...] = tuple(n for n in WORDNET_LEXNAMES if n.startswith("noun."))

_ROLES = ("system", "user", "assistant")
_ROW_HINT = ("an Alpaca row needs \"instruction\" and \"output\" (\"input\" optional), a chat row needs "
             "\"messages\": [{\"role\": ..., \"content\": ...}, ...] ending with the assistant's answer")


class InstructDataError(ValueError):
    """Malformed instruction data (the message names the file and line)."""


def instruct_task_forms() -> list[str]:
    """The accepted ``data.task`` forms of the instruction family."""
    return [WORDNET_DEFINE, f"{INSTRUCT_PREFIX}<path>", f"{INSTRUCT_PREFIX}{HUB_PREFIX}<dataset id>"]


def is_instruct_task(task: str) -> bool:
    """Whether ``data.task = task`` is an instruction-tuning task."""
    low = task.strip().lower()
    return low == WORDNET_DEFINE or low.startswith(INSTRUCT_PREFIX)


#: the system turn of every wordnet-define prompt
DEFINE_SYSTEM = "You are a dictionary."


def define_question(word: str) -> str:
    """The ``wordnet-define`` instruction for one word."""
    return f"What does the word '{word}' mean?"


def define_turns(word: str) -> list[dict[str, str]]:
    """The ``wordnet-define`` prompt turns for one word (system + user)."""
    return [{"role": "system", "content": DEFINE_SYSTEM}, {"role": "user", "content": define_question(word)}]


# ---------------------------------------------------------------------------------------------
# Entry point


def load_instruct_task(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    test_fraction: float = 0.1,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    classes: Sequence[str] | None = None,
) -> TaskData:
    """Load an instruction task (see the module docstring) as train/test splits of raw rows.

    The hold-out (when the data has no test split) is cut before the caps are applied, so the
    capped test split is a subset of the full one. Raises :class:`InstructDataError` for
    malformed rows and :class:`~florg.data.DataUnavailableError` for missing files or an
    unreachable Hub dataset.
    """
    key = name.strip()
    low = key.lower()
    if low == WORDNET_DEFINE:
        train, test, names, source = _wordnet_define(data_dir, classes)
    elif low.startswith(INSTRUCT_PREFIX + HUB_PREFIX):
        train, test, names, source = _from_hub(key[len(INSTRUCT_PREFIX + HUB_PREFIX):].strip())
    elif low.startswith(INSTRUCT_PREFIX):
        train, test, names, source = _from_path(key[len(INSTRUCT_PREFIX):].strip())
    else:
        raise ValueError(f"data.task={name!r} is not an instruction task; valid: {', '.join(instruct_task_forms())}")
    if test is None:
        n_test = int(round(float(test_fraction) * len(train)))
        if n_test < 1 or n_test >= len(train):
            raise ValueError(
                f"task {key}: cannot hold out data.test_fraction={test_fraction} of {len(train)} examples as the "
                "test split; use more examples or provide a test.jsonl"
            )
        train, test = stratified_holdout(train, seed, test_fraction)
    train = random_subset(train, max_train_examples, seed)
    test = random_subset(test, max_test_examples, seed + 1)
    return TaskData(key, train, test, ("messages",), list(names), source=source)


# ---------------------------------------------------------------------------------------------
# Rows


def parse_record(obj: Any, where: str) -> dict[str, str]:
    """One Alpaca or chat object -> ``{messages (JSON), input, output, category}``; ``where`` names it in errors."""
    if not isinstance(obj, dict):
        raise InstructDataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_ROW_HINT}")
    category = obj.get("category")
    if category is not None and not isinstance(category, (str, int)):
        raise InstructDataError(f"{where}: field 'category' must be a string, got {type(category).__name__}")
    category = NO_CATEGORY if category is None or str(category).strip() == "" else str(category).strip()
    if "messages" in obj:
        return {**_chat_row(obj["messages"], where), "category": category}
    for field in ("instruction", "output"):
        if field not in obj:
            raise InstructDataError(f"{where}: missing field '{field}'; {_ROW_HINT}")
    for field in ("instruction", "input", "output"):
        value = obj.get(field, "")
        if value is not None and not isinstance(value, str):
            raise InstructDataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    instruction = obj["instruction"] or ""
    if not instruction.strip():
        raise InstructDataError(f"{where}: field 'instruction' is empty")
    turns = [{"role": "user", "content": instruction}]
    return {"messages": json.dumps(turns, ensure_ascii=False), "input": obj.get("input") or "",
            "output": obj["output"] or "", "category": category}


def _chat_row(messages: Any, where: str) -> dict[str, str]:
    if not isinstance(messages, list) or not messages:
        raise InstructDataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InstructDataError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise InstructDataError(f"{where}: messages[{i}] has role {m['role']!r}; valid: {', '.join(_ROLES)}")
        if not isinstance(m["content"], str):
            raise InstructDataError(f"{where}: messages[{i}].content must be a string")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] != "assistant":
        raise InstructDataError(f"{where}: the last message must be the assistant's answer (role 'assistant'), "
                                f"got role {turns[-1]['role']!r}")
    if not any(t["role"] == "user" for t in turns[:-1]):
        raise InstructDataError(f"{where}: 'messages' needs a user turn before the assistant's answer")
    return {"messages": json.dumps(turns[:-1], ensure_ascii=False), "input": "", "output": turns[-1]["content"]}


def read_records(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Parse a ``.jsonl`` file (one object per line; blank lines skipped) or a ``.json`` list of objects."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    rows: list[dict[str, str]] = []
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InstructDataError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        for i, obj in enumerate(items):
            rows.append(parse_record(obj, f"{p}: item {i}"))
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InstructDataError(f"{p}:{lineno}: not valid JSON ({exc.msg}); one JSON object per line") from None
            rows.append(parse_record(obj, f"{p}:{lineno}"))
    if not rows:
        raise InstructDataError(f"{p}: no examples in the file")
    return rows


def _to_datasets(splits: Sequence[list[dict[str, str]] | None]) -> tuple[list[Any], list[str]]:
    """Rows -> ``datasets.Dataset`` per split, with one ``ClassLabel`` over every split's categories."""
    # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
    import datasets

    names = sorted({r["category"] for rows in splits if rows for r in rows})
    index = {n: i for i, n in enumerate(names)}
    feats = datasets.Features({
        "messages": datasets.Value("string"), "input": datasets.Value("string"),
        "output": datasets.Value("string"), "label": datasets.ClassLabel(names=names),
    })
    out = []
    for rows in splits:
        if rows is None:
            out.append(None)
            continue
        cols = {k: [r[k] for r in rows] for k in ("messages", "input", "output")}
        cols["label"] = [index[r["category"]] for r in rows]
        out.append(datasets.Dataset.from_dict(cols, features=feats))
    return out, names


# ---------------------------------------------------------------------------------------------
# Sources


def _from_path(path_text: str) -> tuple[Any, Any, list[str], str]:
    if not path_text:
        raise ValueError("data.task='instruct:' needs a path: instruct:<file.jsonl or folder> or instruct:hub:<id>")
    p = Path(path_text).expanduser()
    layouts = ("a .jsonl file (one JSON object per line), a .json file holding a list of objects, or a folder "
               "with train.jsonl (+ test.jsonl or validation.jsonl)")
    if p.is_file():
        if p.suffix.lower() not in (".jsonl", ".json"):
            raise DataUnavailableError(f"data.task=instruct:{path_text}: {str(p)!r} is not a .jsonl/.json file; "
                                       f"expected {layouts}")
        (train, test), names = _to_datasets([read_records(p), None])
    elif p.is_dir():
        train_file = next((p / f for f in ("train.jsonl", "train.json") if (p / f).is_file()), None)
        if train_file is None:
            raise DataUnavailableError(f"data.task=instruct:{path_text}: no train.jsonl in {str(p)!r}; expected {layouts}")
        test_file = next((p / f for f in ("test.jsonl", "test.json", "validation.jsonl", "validation.json")
                          if (p / f).is_file()), None)
        (train, test), names = _to_datasets([read_records(train_file),
                                             read_records(test_file) if test_file is not None else None])
    else:
        raise DataUnavailableError(f"data.task=instruct:{path_text}: {str(p)!r} does not exist; expected {layouts}")
    return train, test, names, str(p)


def _from_hub(repo_id: str) -> tuple[Any, Any, list[str], str]:
    if not repo_id:
        raise ValueError("data.task='instruct:hub:' needs a dataset id, e.g. instruct:hub:vicgalle/alpaca-gpt4")
    try:
        # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
        import datasets

        dd = datasets.load_dataset(repo_id)
    except Exception as exc:  # offline, unknown repo, network errors: all reported the same way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        offline = " (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set)" if (
            os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1") else ""
        raise DataUnavailableError(
            f"data.task=instruct:hub:{repo_id}: the Hub dataset could not be loaded{offline}: "
            f"{type(exc).__name__}: {first}; use a local copy with data.task=instruct:<path to .jsonl or folder>"
        ) from exc
    if "train" not in dd:
        raise DataUnavailableError(f"data.task=instruct:hub:{repo_id}: the dataset has splits {list(dd)}, no 'train'")
    splits = [_hub_rows(dd["train"], f"hub:{repo_id} train"),
              _hub_rows(dd["test"], f"hub:{repo_id} test") if "test" in dd else None]
    (train, test), names = _to_datasets(splits)
    return train, test, names, f"hub:{repo_id}"


def _hub_rows(ds: Iterable[dict[str, Any]], where: str) -> list[dict[str, str]]:
    return [parse_record(row, f"{where} row {i}") for i, row in enumerate(ds)]


_ADJ_MARKER = re.compile(r"\([a-z]+\)$")


def _lemma(word: str) -> str:
    return _ADJ_MARKER.sub("", word).replace("_", " ").strip()


def _wordnet_define(data_dir: str | os.PathLike[str] | None,
                    classes: Sequence[str] | None) -> tuple[Any, Any, list[str], str]:
    class_list = list(classes) if classes else list(NOUN_CLASSES)
    unknown = [c for c in class_list if c not in WORDNET_LEXNAMES]
    if unknown:
        raise ValueError(f"data.classes: unknown WordNet categor{'y' if len(unknown) == 1 else 'ies'} "
                         f"{', '.join(map(repr, unknown))}; valid lexnames: {', '.join(WORDNET_LEXNAMES)}")
    if len(set(class_list)) != len(class_list):
        raise ValueError(f"data.classes lists a category more than once: {class_list}")
    wanted = set(class_list)
    pos_needed = list(dict.fromkeys(c.split(".", 1)[0] for c in class_list))
    folder = resolve_wordnet_dir(data_dir, tuple(pos_needed))
    rows: list[dict[str, str]] = []
    for pos in pos_needed:
        for syn in iter_synsets(folder, pos):
            if syn.lexname not in wanted:
                continue
            gloss = clean_gloss(syn.gloss)
            word = _lemma(syn.words[0])
            if gloss and word:
                rows.append({"word": word, "output": gloss, "category": syn.lexname})
    heads = Counter(r["word"].casefold() for r in rows)
    glosses = Counter(r["output"].casefold() for r in rows)
    rows = [r for r in rows if heads[r["word"].casefold()] == 1 and glosses[r["output"].casefold()] == 1]
    records = [{"messages": json.dumps(define_turns(r["word"]), ensure_ascii=False),
                "input": "", "output": r["output"], "category": r["category"]} for r in rows]
    if not records:
        raise ValueError(f"task {WORDNET_DEFINE}: no WordNet synsets in data.classes={class_list}")
    # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
    import datasets

    index = {n: i for i, n in enumerate(class_list)}
    feats = datasets.Features({
        "messages": datasets.Value("string"), "input": datasets.Value("string"),
        "output": datasets.Value("string"), "label": datasets.ClassLabel(names=class_list),
    })
    cols = {k: [r[k] for r in records] for k in ("messages", "input", "output")}
    cols["label"] = [index[r["category"]] for r in records]
    return datasets.Dataset.from_dict(cols, features=feats), None, class_list, str(folder)

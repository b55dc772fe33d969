"""The catalog of labelled text datasets: turn a task name (and an optional local data folder) into
train/test splits.

Supported names
---------------
``wordnet`` (default)
    WordNet gloss -> semantic category (see :mod:`florg.data.wordnet`); offline. The global
    test split is a stratified, seed-fixed hold-out (``test_fraction``/``test_size``).
    Four noun classes by default (``classes`` chooses others).
``wordnet-nouns``
    The harder embedded benchmark: the twelve largest WordNet noun categories
    (:data:`~florg.data.wordnet.NOUN_CLASSES`), 2,500 definitions each (a fixed subset), so the
    classes are exactly balanced; the same hold-out as ``wordnet``. Its class list is fixed.
``glue/<task>`` (also ``glue:<task>`` or the bare ``<task>``)
    ``rte``, ``mrpc``, ``qnli``, ``mnli``, ``wnli``, ``sst2``, ``cola``, ``qqp``. Loaded from
    ``data_dir`` when given, else from the Hugging Face Hub (``nyu-mll/glue``). GLUE's own test
    labels are hidden (-1), so the validation split (``validation_matched`` for MNLI) is the
    test split.
``local:<path>`` (or a path to a folder / ``.csv`` / ``.tsv`` / ``.jsonl`` / ``.json`` file)
    Any labelled text data in the local layouts below; text columns are detected. The bare
    name ``local`` reads the same from ``data_dir``.

Local layouts (``data_dir`` for GLUE, the path for ``local:``)
--------------------------------------------------------------
* a ``datasets`` ``save_to_disk`` folder (a ``DatasetDict`` with ``train`` and
  ``validation``/``test``; a single saved ``Dataset`` is split like a lone train file);
* files ``train.{csv,tsv,jsonl,json}`` plus ``validation.*`` / ``dev.*`` / ``test.*``
  (MNLI also ``validation_matched.*`` / ``dev_matched.*``); a lone train file is split with
  ``test_fraction``;
* for GLUE, either layout may also sit in a sub-folder named after the task
  (``<data_dir>/rte/``, ``<data_dir>/RTE/``, ``<data_dir>/SST-2/``, ...).

Columns: the task's own text columns (e.g. ``sentence1``/``sentence2`` for RTE) or generic
ones (``text``, ``text_a``+``text_b``, ``sentence1``+``sentence2``), and a ``label`` column
holding class indices or class names. Rows labelled -1 are dropped.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .splits import _check_split_args, _holdout, column_values, random_subset, stratified_holdout
from .wordnet import DEFAULT_CLASSES, NOUN_CLASSES, NOUN_PER_CLASS, balanced_subset, load_wordnet

if TYPE_CHECKING:
    pass

__all__ = [
    "GLUE_HUB_ID",
    "GLUE_TASKS",
    "DataUnavailableError",
    "GlueSpec",
    "TaskData",
    "available_tasks",
    "load_local",
    "load_task",
    "random_subset",
    "stratified_holdout",
]

#: Hub repository the GLUE tasks are fetched from when no local copy is given.
GLUE_HUB_ID = "nyu-mll/glue"

_FILE_EXTS = (".csv", ".tsv", ".jsonl", ".json")


class DataUnavailableError(FileNotFoundError):
    """A task's data could be found neither locally nor on the Hub (one-line message)."""


@dataclass(frozen=True)
class GlueSpec:
    """Text columns, class names and test split of one GLUE task."""

    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    test_splits: tuple[str, ...] = ("validation", "dev", "test")
    folder_names: tuple[str, ...] = ()


#: The GLUE classification tasks florg knows (STS-B is a regression task and not included).
GLUE_TASKS: dict[str, GlueSpec] = {
    "rte": GlueSpec(("sentence1", "sentence2"), ("entailment", "not_entailment"), folder_names=("RTE",)),
    "mrpc": GlueSpec(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), folder_names=("MRPC",)),
    "qnli": GlueSpec(("question", "sentence"), ("entailment", "not_entailment"), folder_names=("QNLI",)),
    "mnli": GlueSpec(
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        test_splits=("validation_matched", "dev_matched", "validation", "dev", "test_matched", "test"),
        folder_names=("MNLI",),
    ),
    "wnli": GlueSpec(("sentence1", "sentence2"), ("not_entailment", "entailment"), folder_names=("WNLI",)),
    "sst2": GlueSpec(("sentence",), ("negative", "positive"), folder_names=("SST-2", "sst-2", "SST2")),
    "cola": GlueSpec(("sentence",), ("unacceptable", "acceptable"), folder_names=("CoLA", "COLA")),
    "qqp": GlueSpec(("question1", "question2"), ("not_duplicate", "duplicate"), folder_names=("QQP",)),
}

# Generic column names, tried after a task's own ones.
_PAIR_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("text_a", "text_b"),
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("text1", "text2"),
)
_SINGLE_CANDIDATES: tuple[tuple[str], ...] = (("text",), ("sentence",), ("text_a",))
_LABEL_CANDIDATES = ("label", "labels")


@dataclass
class TaskData:
    """A classification task ready for partitioning and tokenization.

    Attributes
    ----------
    name: canonical task name (``wordnet``, ``glue/rte``, ``local:/path``).
    train, test: ``datasets.Dataset`` with the ``text_fields`` columns and an int ``label``
        column (a ``ClassLabel`` whose names are ``label_names``).
    text_fields: one column name, or two for sentence-pair tasks.
    label_names: class names; ``label`` indexes this list.
    source: where the data came from (a folder, ``hub:nyu-mll/glue``, ...), for logs.
    """

    name: str
    train: Any
    test: Any
    text_fields: tuple[str, ...]
    label_names: list[str]
    source: str = ""
    #: an optional validation split held out from the training data (``data.validation_fraction``)
    validation: Any = None

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (two text fields)."""
        return len(self.text_fields) == 2

    def summary(self) -> str:
        """One line for logs: name, sizes, classes and source."""
        fields = "+".join(self.text_fields)
        return (
            f"task {self.name}: train {len(self.train)}, test {len(self.test)}, "
            f"{self.num_labels} classes ({', '.join(self.label_names)}), text {fields}"
            + (f", from {self.source}" if self.source else "")
        )


def available_tasks() -> list[str]:
    """Names accepted by :func:`load_task` (besides ``local:<path>``)."""
    return ["wordnet", "wordnet-nouns", *(f"glue/{t}" for t in GLUE_TASKS)]


def load_task(
    name: str = "wordnet",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.1,
    test_size: int | None = None,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    classes: Sequence[str] | None = None,
    dedupe: bool = True,
) -> TaskData:
    """Load a task by name and return its train/test splits.

    Parameters
    ----------
    name:
        ``wordnet``, ``glue/<task>``, ``local:<path>``, or ``local`` (data in ``data_dir``);
        see the module docstring.
    data_dir:
        WordNet ``dict`` folder for ``wordnet``; local GLUE files for ``glue/*`` (when absent,
        the Hub is tried); the data for ``local``. Ignored for ``local:<path>``.
    seed:
        Fixes the WordNet (and lone-train-file) test hold-out and the example caps.
    test_fraction, test_size:
        Size of the hold-out when a test split has to be cut from the training data
        (``test_size``, an absolute count, wins when given). Stratified by label.
    max_train_examples, max_test_examples:
        Optional caps, a seed-fixed random subset, for fast runs. The hold-out is cut
        before the caps are applied, so the capped test set is a subset of the full one.
    classes:
        WordNet categories (default: the four-class noun set).
    dedupe:
        WordNet: drop repeated definitions (see :func:`~florg.data.wordnet.load_wordnet`).

    Raises
    ------
    ValueError
        Unknown task name or bad arguments.
    DataUnavailableError
        GLUE/local data found neither locally nor on the Hub (the message lists the
        accepted local layouts).
    """
    _check_split_args(test_fraction, test_size, max_train_examples, max_test_examples)
    key = name.strip()
    low = key.lower()
    glue_sub = (low[5:] if low.startswith(("glue/", "glue:")) else low).replace("-", "")
    if low == "wordnet":
        task = _load_wordnet_task(data_dir, classes, dedupe, seed, test_fraction, test_size)
    elif low == "wordnet-nouns":
        if classes:
            raise ValueError(
                f"task 'wordnet-nouns' has a fixed class list ({', '.join(NOUN_CLASSES)}); data.classes applies to "
                "task 'wordnet' only: remove data.classes or use data.task=wordnet"
            )
        task = _load_wordnet_task(data_dir, NOUN_CLASSES, dedupe, seed, test_fraction, test_size,
                                  per_class=NOUN_PER_CLASS, name="wordnet-nouns")
    elif glue_sub in GLUE_TASKS:
        task = _load_glue(glue_sub, data_dir, seed=seed, test_fraction=test_fraction, test_size=test_size)
    elif low == "local":
        if data_dir is None:
            raise ValueError("task 'local' needs data.data_dir (--data-dir) pointing at the data, or use local:<path>")
        task = load_local(data_dir, seed=seed, test_fraction=test_fraction, test_size=test_size)
    elif low.startswith("local:") or (not low.startswith("glue") and _looks_like_path(key)):
        path = key[len("local:") :] if low.startswith("local:") else key
        task = load_local(path, seed=seed, test_fraction=test_fraction, test_size=test_size)
    else:
        raise ValueError(
            f"unknown task {name!r} (data.task); valid: {', '.join(available_tasks())}, "
            "or local:<path> for your own CSV/JSONL/save_to_disk data"
        )

    task.train = random_subset(task.train, max_train_examples, seed)
    task.test = random_subset(task.test, max_test_examples, seed + 1)
    return task


# ---------------------------------------------------------------------------------------------
# WordNet


def _load_wordnet_task(
    data_dir: str | os.PathLike[str] | None, classes: Sequence[str] | None, dedupe: bool, seed: int,
    test_fraction: float, test_size: int | None, *, per_class: int = 0, name: str = "wordnet",
) -> TaskData:
    ds = load_wordnet(data_dir, tuple(classes) if classes is not None else DEFAULT_CLASSES, dedupe=dedupe)
    if per_class:
        ds = balanced_subset(ds, per_class)  # fixed: the same examples whatever the run seed
    train, test = _holdout(ds, seed, test_fraction, test_size)
    names = list(ds.features["label"].names)
    return TaskData(name, train, test, ("text",), names, source=str(data_dir or "/usr/share/wordnet"))


# ---------------------------------------------------------------------------------------------
# GLUE


def _load_glue(
    sub: str, data_dir: str | os.PathLike[str] | None, *, seed: int, test_fraction: float, test_size: int | None
) -> TaskData:
    spec = GLUE_TASKS[sub]
    tname = f"glue/{sub}"
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        folder = base
        for cand in (sub, *spec.folder_names):
            if (base / cand).is_dir():
                folder = base / cand
                break
        splits = _read_local_splits(folder, spec.test_splits)
        if splits is None:
            raise DataUnavailableError(
                f"task {tname}: no usable data in data.data_dir={str(base)!r}; {_layouts_hint(spec)}"
            )
        source = str(folder)
    else:
        splits = _read_hub(sub, spec)
        source = f"hub:{GLUE_HUB_ID}/{sub}"
    train, test = splits
    return _finish(tname, train, test, spec.text_fields, list(spec.label_names), source, seed, test_fraction, test_size)


def _read_hub(sub: str, spec: GlueSpec) -> tuple[Any, Any]:
    """Return ``(train, test_or_None)`` from the Hub; any failure is a DataUnavailableError."""
    try:
        # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
        import datasets

        dd = datasets.load_dataset(GLUE_HUB_ID, sub)
    except Exception as exc:  # offline, no such repo, network errors: all reported the same way
        raise DataUnavailableError(
            f"task glue/{sub}: no local data given and the Hub copy ({GLUE_HUB_ID}, {sub}) could not be "
            f"loaded ({type(exc).__name__}); pass data.data_dir (--data-dir) pointing at local files: "
            f"{_layouts_hint(spec)}"
        ) from exc
    test = None
    for s in spec.test_splits:
        if s in dd and _has_labels(dd[s]):
            test = dd[s]
            break
    return dd["train"], test


def _layouts_hint(spec: GlueSpec | None) -> str:
    cols = "+".join(spec.text_fields) if spec is not None else "text (or text_a+text_b)"
    return (
        "accepted layouts: a datasets save_to_disk folder with train + validation (or test) splits, "
        "or train.csv/.tsv/.jsonl plus validation.*/dev.*/test.* files (a lone train file is split), "
        f"optionally in a sub-folder named after the task; columns {cols} (or text / text_a+text_b / "
        "sentence1+sentence2) and label"
    )


# ---------------------------------------------------------------------------------------------
# Local files


def load_local(
    path: str | os.PathLike[str],
    *,
    text_fields: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
    seed: int = 0,
    test_fraction: float = 0.1,
    test_size: int | None = None,
) -> TaskData:
    """Load a labelled text dataset from a local folder or file (``local:<path>`` tasks).

    ``path`` is a ``save_to_disk`` folder, a folder with ``train.*`` (+ ``validation.*`` /
    ``dev.*`` / ``test.*``) files, or a single ``.csv``/``.tsv``/``.jsonl``/``.json`` file
    (split with ``test_fraction``). Text columns are detected unless ``text_fields`` is given;
    class names come from a ``ClassLabel`` feature, from string labels (sorted), or are
    ``"0".."n-1"``.
    """
    p = Path(path).expanduser()
    name = f"local:{path}"
    if p.is_file():
        train, test = _read_table(p), None
    elif p.is_dir():
        splits = _read_local_splits(p, ("validation", "dev", "test"))
        if splits is None:
            raise DataUnavailableError(f"task {name}: no usable data in {str(p)!r}; {_layouts_hint(None)}")
        train, test = splits
    else:
        raise DataUnavailableError(f"task {name}: {str(p)!r} does not exist; {_layouts_hint(None)}")
    fields = tuple(text_fields) if text_fields else None
    return _finish(
        name, train, test, fields, list(label_names) if label_names else None, str(p), seed, test_fraction, test_size
    )


def _looks_like_path(name: str) -> bool:
    return name.lower().endswith(_FILE_EXTS) or os.sep in name or name.startswith((".", "~"))


def _read_local_splits(folder: Path, test_splits: Sequence[str]) -> tuple[Any, Any] | None:
    """``(train, test_or_None)`` from a save_to_disk folder or split files; ``None`` if absent."""
    # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
    import datasets

    if not folder.is_dir():
        return None
    if (folder / "dataset_dict.json").is_file():
        dd = datasets.load_from_disk(str(folder), keep_in_memory=True)
        if "train" not in dd:
            raise ValueError(f"{folder}: the saved DatasetDict has splits {list(dd)}, but no 'train' split")
        test = next((dd[s] for s in test_splits if s in dd and _has_labels(dd[s])), None)
        return dd["train"], test
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(folder), keep_in_memory=True), None
    train_file = _find_file(folder, "train")
    if train_file is None:
        return None
    test = None
    for s in test_splits:
        f = _find_file(folder, s)
        if f is not None:
            cand = _read_table(f)
            if _has_labels(cand):
                test = cand
                break
    return _read_table(train_file), test


def _find_file(folder: Path, stem: str) -> Path | None:
    for ext in _FILE_EXTS:
        f = folder / f"{stem}{ext}"
        if f.is_file():
            return f
    return None


def _read_table(path: Path) -> Any:
    """Read a CSV/TSV/JSON(L) file into an in-memory ``datasets.Dataset`` (no HF cache files)."""
    import datasets  # lazy: datasets; florg predict's argument check imports florg.data
    import pandas as pd  # lazy: pandas; florg predict's argument check imports florg.data

    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False)
        elif suffix == ".tsv":
            df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
        elif suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        elif suffix == ".json":
            try:
                df = pd.read_json(path, lines=True, dtype=False)
            except ValueError:
                df = pd.read_json(path, dtype=False)
        else:  # pragma: no cover - callers only pass known suffixes
            raise ValueError(f"unsupported file type {suffix!r}")
    except ValueError as exc:
        raise ValueError(f"could not read {path}: {exc}") from exc
    return datasets.Dataset.from_pandas(df, preserve_index=False)


def _has_labels(ds: Any) -> bool:
    col = next((c for c in _LABEL_CANDIDATES if c in ds.column_names), None)
    if col is None or len(ds) == 0:
        return False
    vals = column_values(ds, col)
    return any(not (isinstance(v, int) and v < 0) and v is not None for v in vals)


# ---------------------------------------------------------------------------------------------
# Normalisation shared by GLUE and local tasks


def _finish(
    name: str, train: Any, test: Any, text_fields: Sequence[str] | None, label_names: list[str] | None, source: str,
    seed: int, test_fraction: float, test_size: int | None,
) -> TaskData:
    fields = _resolve_text_fields(train, text_fields, name)
    names = label_names if label_names is not None else _infer_label_names(train, test)
    train = _normalise(train, fields, names, name, "train")
    if test is None:
        train, test = _holdout(train, seed, test_fraction, test_size)
    else:
        test_fields = _resolve_text_fields(test, fields if _has_all(test, fields) else text_fields, name)
        test = _normalise(test, test_fields, names, name, "test")
        if test_fields != fields:
            test = test.rename_columns(dict(zip(test_fields, fields, strict=True)))
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"task {name}: empty split after loading (train {len(train)}, test {len(test)})")
    return TaskData(name, train, test, fields, list(names), source=source)


def _has_all(ds: Any, fields: Sequence[str]) -> bool:
    return all(f in ds.column_names for f in fields)


def _resolve_text_fields(ds: Any, wanted: Sequence[str] | None, name: str) -> tuple[str, ...]:
    cols = ds.column_names
    if wanted is not None:
        wanted = tuple(wanted)
        if _has_all(ds, wanted):
            return wanted
        cands = _PAIR_CANDIDATES if len(wanted) == 2 else _SINGLE_CANDIDATES
    else:
        cands = (*_PAIR_CANDIDATES, *_SINGLE_CANDIDATES)
    for c in cands:
        if _has_all(ds, c):
            return tuple(c)
    need = "+".join(wanted) if wanted else "text (or text_a+text_b, sentence1+sentence2)"
    raise ValueError(f"task {name}: no text columns {need} in the data (columns: {', '.join(cols)})")


def _label_column(ds: Any, name: str) -> str:
    col = next((c for c in _LABEL_CANDIDATES if c in ds.column_names), None)
    if col is None:
        raise ValueError(f"task {name}: the data has no 'label' column (columns: {', '.join(ds.column_names)})")
    return col


def _infer_label_names(train: Any, test: Any) -> list[str]:
    # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
    import datasets

    col = _label_column(train, "local")
    feat = train.features[col]
    if isinstance(feat, datasets.ClassLabel):
        return list(feat.names)
    values = column_values(train, col)
    if test is not None and col in test.column_names:
        values += column_values(test, col)
    values = [v for v in values if v is not None and not (isinstance(v, int) and v < 0)]
    if values and all(isinstance(v, str) for v in values):
        if all(v.strip().lstrip("-").isdigit() for v in values):
            return [str(i) for i in range(max(int(v) for v in values) + 1)]
        return sorted({v.strip() for v in values})
    try:
        top = max(int(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError("local task: labels must be class indices or class names") from exc
    return [str(i) for i in range(top + 1)]


def _normalise(ds: Any, fields: tuple[str, ...], names: Sequence[str], tname: str, split: str) -> Any:
    """Keep text columns + int ``label`` (ClassLabel), map string labels, drop -1 rows."""
    # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
    import datasets

    lcol = _label_column(ds, tname)
    lookup = {n.lower(): i for i, n in enumerate(names)}
    num = len(names)
    raw = column_values(ds, lcol)
    labels: list[int] = []
    for i, v in enumerate(raw):
        if isinstance(v, str):
            s = v.strip()
            if s.lower() in lookup:
                y = lookup[s.lower()]
            elif s.lstrip("-").isdigit():
                y = int(s)
            else:
                raise ValueError(
                    f"task {tname}: {split} row {i} has label {v!r}; expected one of {', '.join(names)} "
                    f"or an index 0..{num - 1}"
                )
        elif v is None:
            y = -1
        else:
            y = int(v)
        if y >= num or y < -1:
            raise ValueError(f"task {tname}: {split} row {i} has label {y}; expected 0..{num - 1} (or -1 = unlabelled)")
        labels.append(y)
    texts = {f: ["" if t is None else str(t) for t in column_values(ds, f)] for f in fields}
    keep = [i for i, y in enumerate(labels) if y >= 0]
    feats = {f: datasets.Value("string") for f in fields}
    feats["label"] = datasets.ClassLabel(names=list(names))
    data = {f: [texts[f][i] for i in keep] for f in fields}
    data["label"] = [labels[i] for i in keep]
    return datasets.Dataset.from_dict(data, features=datasets.Features(feats))



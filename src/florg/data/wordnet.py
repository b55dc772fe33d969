"""WordNet 3.0 gloss classification: "definition text -> semantic category".

Every WordNet synset carries a gloss (a short dictionary definition, often followed by quoted
usage examples) and a *lexicographer file* number that files it under one of 45 coarse
categories (``noun.animal``, ``noun.food``, ``verb.motion``, ...). Predicting that category
from the definition is a real-text sentence-classification task that ships with Debian's
``wordnet-base`` package and needs no network access.

File format (``data.noun``, ``data.verb``, ``data.adj``, ``data.adv``): one synset per line,
``offset lex_filenum ss_type w_cnt word lex_id ... p_cnt ptrs... | gloss``. Lines that start
with two spaces are the licence header.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CLASSES",
    "NOUN_CLASSES",
    "NOUN_PER_CLASS",
    "DEFAULT_WORDNET_DIR",
    "WORDNET_LEXNAMES",
    "WordNetNotFoundError",
    "WordNetSynset",
    "clean_gloss",
    "iter_synsets",
    "load_wordnet",
    "resolve_wordnet_dir",
    "balanced_subset",
]

#: Where Debian/Ubuntu's ``wordnet-base`` installs the WordNet 3.0 database.
DEFAULT_WORDNET_DIR = "/usr/share/wordnet"

#: The four-class noun subset used by the default demo task (29,699 synsets in WordNet 3.0).
DEFAULT_CLASSES: tuple[str, ...] = ("noun.animal", "noun.plant", "noun.food", "noun.artifact")

#: The 12-class noun benchmark (``data.task = "wordnet-nouns"``): the twelve largest noun categories of
#: WordNet 3.0 (each has at least 2,620 distinct definitions), concrete and abstract ones mixed.
NOUN_CLASSES: tuple[str, ...] = (
    "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.cognition", "noun.communication",
    "noun.group", "noun.location", "noun.person", "noun.plant", "noun.state", "noun.substance",
)  # fmt: skip

#: Definitions per class in ``wordnet-nouns``: a fixed (seed-independent) random subset of each class,
#: so the 12 classes are exactly balanced (30,000 examples; the majority class is 1/12 of any split).
NOUN_PER_CLASS = 2500

#: The standard WordNet 3.0 lexicographer file names; position = ``lex_filenum``.
WORDNET_LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip

_LEXNUM = {name: i for i, name in enumerate(WORDNET_LEXNAMES)}
# lexname prefix -> data file suffix
_POS_FILE = {"noun": "noun", "verb": "verb", "adj": "adj", "adv": "adv"}

_INSTALL_HINT = (
    "install it with `apt-get install -y --no-install-recommends wordnet-base` "
    "or point --data-dir (config key data.data_dir) at a WordNet 3.0 `dict` folder "
    "(the one holding data.noun, data.verb, data.adj, data.adv)"
)


class WordNetNotFoundError(FileNotFoundError):
    """The WordNet database files are not where we looked. The message says how to fix it."""


@dataclass(frozen=True)
class WordNetSynset:
    """One parsed line of a WordNet ``data.*`` file."""

    offset: int
    lexname: str
    words: tuple[str, ...]
    gloss: str


# A quoted usage example at the very end of the text, introduced by ':' ',' ';' or a space.
_TRAILING_EXAMPLE = re.compile(r'(?:[;:,]\s*|\s+)"[^"]*"?\s*$')
# Words after which a quotation is part of the definition ("as in the expression "on the job"").
_QUOTE_IS_DEFINITION = re.compile(r"(?:e\.g\.,?|i\.e\.,?|expression|phrase|as in|term)\s*$", re.IGNORECASE)


def clean_gloss(gloss: str) -> str:
    """Return the definition part of a WordNet gloss, without its quoted usage examples.

    WordNet writes examples after the definition, normally as ``; "example"; "example"``, but a
    few hundred glosses use ``: "..."``, ``, "..."`` or a bare space instead. All of these are
    cut. A quotation that *belongs* to the definition (``as in the expression "on the job"``,
    ``e.g. "a news roundup"``) is kept, without its quote marks. The result never contains a
    double quote and has no trailing separator.

    >>> clean_gloss('a human being; "there was too much for one person to do"')
    'a human being'
    >>> clean_gloss('restrict or confine, "I limit you to two visits to the pub a day"')
    'restrict or confine'
    """
    text = gloss.strip()
    cut = re.search(r';\s*"', text)
    if cut:
        text = text[: cut.start()]
    while '"' in text:
        m = _TRAILING_EXAMPLE.search(text)
        if m is None or _QUOTE_IS_DEFINITION.search(text[: m.start()]):
            break
        text = text[: m.start()]
    text = text.replace('"', "")
    text = re.sub(r"\s+", " ", text).strip()
    return text.rstrip(";:, ").strip()


def resolve_wordnet_dir(data_dir: str | os.PathLike[str] | None = None, pos: Sequence[str] = ("noun",)) -> Path:
    """Find the folder holding ``data.<pos>`` files, or raise :class:`WordNetNotFoundError`.

    ``data_dir`` may be the ``dict`` folder itself or its parent (a WordNet 3.0 tarball
    unpacks to ``WordNet-3.0/dict``). ``None`` means the Debian location
    :data:`DEFAULT_WORDNET_DIR`.
    """
    base = Path(data_dir if data_dir is not None else DEFAULT_WORDNET_DIR).expanduser()
    needed = [f"data.{_POS_FILE[p]}" for p in pos]
    for cand in (base, base / "dict"):
        if all((cand / f).is_file() for f in needed):
            return cand
    if not base.exists():
        problem = f"WordNet folder {str(base)!r} does not exist"
    else:
        missing = [f for f in needed if not (base / f).is_file()]
        problem = f"WordNet folder {str(base)!r} has no {', '.join(missing)}"
    raise WordNetNotFoundError(f"{problem}: {_INSTALL_HINT}")


def iter_synsets(data_dir: str | os.PathLike[str] | None = None, pos: str = "noun") -> Iterator[WordNetSynset]:
    """Yield every synset of one part of speech (``noun``, ``verb``, ``adj`` or ``adv``).

    Parsed files are cached in memory (keyed by path, size and modification time), so
    repeated loads in one process cost no re-parsing.
    """
    if pos not in _POS_FILE:
        raise ValueError(f"unknown WordNet part of speech {pos!r}; valid: {', '.join(_POS_FILE)}")
    folder = resolve_wordnet_dir(data_dir, (pos,))
    path = folder / f"data.{_POS_FILE[pos]}"
    st = path.stat()
    yield from _parse_data_file(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parse_data_file(path: str, size: int, mtime_ns: int) -> tuple[WordNetSynset, ...]:
    del size, mtime_ns  # cache key only
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.startswith("  ") or not line.strip():
                continue  # licence header
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            if not sep or len(fields) < 5:
                raise ValueError(
                    f"{path}:{lineno}: not a WordNet data line (expected 'offset lex_filenum ... | gloss')"
                )
            lexnum = int(fields[1])
            if not 0 <= lexnum < len(WORDNET_LEXNAMES):
                raise ValueError(f"{path}:{lineno}: lex_filenum {lexnum} is outside 0..{len(WORDNET_LEXNAMES) - 1}")
            w_cnt = int(fields[3], 16)
            words = tuple(fields[4 + 2 * i] for i in range(w_cnt))
            out.append(WordNetSynset(int(fields[0]), WORDNET_LEXNAMES[lexnum], words, gloss.strip()))
    return tuple(out)


def _validate_classes(classes: Sequence[str]) -> list[str]:
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    classes = list(classes)
    if len(classes) < 2:
        raise ValueError(f"WordNet classes: at least two categories are needed, got {classes!r}")
    unknown = [c for c in classes if c not in _LEXNUM]
    if unknown:
        raise ValueError(
            f"unknown WordNet class(es) {', '.join(map(repr, unknown))}; "
            f"valid lexnames: {', '.join(WORDNET_LEXNAMES)}"
        )
    dupes = [c for c, n in Counter(classes).items() if n > 1]
    if dupes:
        raise ValueError(f"WordNet classes list {', '.join(dupes)} more than once")
    return classes


def load_wordnet(
    data_dir: str | os.PathLike[str] | None = None,
    classes: Sequence[str] = DEFAULT_CLASSES,
    *,
    dedupe: bool = True,
    strip_examples: bool = True,
    include_words: bool = False,
) -> Any:
    """Load WordNet glosses labelled by lexicographer category as a ``datasets.Dataset``.

    Parameters
    ----------
    data_dir:
        WordNet 3.0 ``dict`` folder (or its parent); ``None`` means ``/usr/share/wordnet``.
    classes:
        Lexnames to keep (see :data:`WORDNET_LEXNAMES`); the label is the index into this
        sequence. A comma-separated string is accepted too.
    dedupe:
        Drop repeated definitions (on by default). A definition that occurs under two
        different classes is ambiguous and removed entirely; repeats within one class keep
        their first occurrence. This keeps identical texts from landing in both the train
        and the test split. With the default classes 29,320 of 29,699 rows remain (mostly
        repeated taxonomy glosses such as "a genus of bacteria").
    strip_examples:
        Remove quoted usage examples (see :func:`clean_gloss`). Off keeps the raw gloss.
    include_words:
        Add a ``words`` column (the synset's lemmas, space-separated, underscores kept).

    Returns
    -------
    datasets.Dataset
        Columns ``text`` (string) and ``label`` (``ClassLabel`` whose ``names`` are
        ``classes``), in WordNet file order (by part of speech, then offset).

    Raises
    ------
    WordNetNotFoundError
        The data files are missing (the message says how to install them).
    ValueError
        An unknown class name (the message lists the valid lexnames).
    """
    class_list = _validate_classes(classes)
    pos_needed = list(dict.fromkeys(name.split(".", 1)[0] for name in class_list))
    folder = resolve_wordnet_dir(data_dir, pos_needed)
    stamp = tuple((p, (folder / f"data.{p}").stat().st_mtime_ns) for p in pos_needed)
    return _build_dataset(str(folder.resolve()), stamp, tuple(class_list), dedupe, strip_examples, include_words)


@functools.lru_cache(maxsize=4)
def _build_dataset(
    folder: str, stamp: tuple, class_list: tuple[str, ...], dedupe: bool, strip_examples: bool, include_words: bool
) -> Any:
    """Cached body of :func:`load_wordnet` (datasets are immutable, so sharing them is safe)."""
    # lazy: datasets: florg predict's argument check imports florg.data (test_predict_startup.py)
    import datasets

    del stamp  # cache key only: a changed file gives a new entry
    wanted = {name: i for i, name in enumerate(class_list)}
    pos_needed = list(dict.fromkeys(name.split(".", 1)[0] for name in class_list))

    texts: list[str] = []
    labels: list[int] = []
    words: list[str] = []
    for pos in pos_needed:
        for syn in iter_synsets(folder, pos):
            label = wanted.get(syn.lexname)
            if label is None:
                continue
            text = clean_gloss(syn.gloss) if strip_examples else syn.gloss
            if not text:
                continue
            texts.append(text)
            labels.append(label)
            words.append(" ".join(syn.words))

    if dedupe:
        keep = _dedupe_indices(texts, labels)
        texts = [texts[i] for i in keep]
        labels = [labels[i] for i in keep]
        words = [words[i] for i in keep]

    columns: dict[str, list] = {"text": texts, "label": labels}
    feats = {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(class_list))}
    if include_words:
        columns["words"] = words
        feats["words"] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(feats))


def _dedupe_indices(texts: Sequence[str], labels: Sequence[int]) -> list[int]:
    """Indices to keep: first occurrence of each text, none of a text seen with two labels."""
    labels_of: dict[str, set[int]] = {}
    for t, y in zip(texts, labels, strict=True):
        labels_of.setdefault(t.casefold(), set()).add(y)
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(texts):
        key = t.casefold()
        if len(labels_of[key]) > 1 or key in seen:
            continue
        seen.add(key)
        keep.append(i)
    return keep


def balanced_subset(ds: Any, per_class: int, seed: int = 0) -> Any:
    """At most ``per_class`` rows of every class of ``ds`` (a seeded random subset, kept in ``ds``'s order)."""
    # lazy: numpy: florg predict's argument check imports florg.data (test_predict_startup.py)
    import numpy as np

    labels = np.asarray(ds["label"])
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        keep.append(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False))
    return ds.select(sorted(int(i) for i in np.concatenate(keep)))

"""WordNet QA: an embedded extractive-QA task built from WordNet 3.0's usage examples (no downloads).

Most WordNet glosses end with quoted usage examples of the synset's words::

    run | move fast by using one's feet, ...; "Don't run--you'll be out of breath"; "The children ran to the store"

Each (synset, usage example) gives one SQuAD-style triple:

* **context**: the usage example (``The children ran to the store``);
* **question**: ``Which word in the passage means '<definition>'?``, the definition being the gloss
  without its examples (:func:`florg.data.wordnet.clean_gloss`);
* **answer**: the span of the synset's lemma in the example (``ran``).

Finding the lemma: the example is split into words (runs of letters and digits) and each word is
reduced to its candidate base forms with WordNet's own *morphy* rules for the synset's part of
speech (nouns: ``-s``, ``-ses``, ``-xes``, ``-zes``, ``-ches``, ``-shes``, ``-men``, ``-ies``; verbs:
``-s``, ``-ies``, ``-es``, ``-ed``, ``-ing``; adjectives: ``-er``, ``-est``), a doubled final
consonant undone (``stopped`` -> ``stop``), and the irregular forms of WordNet's exception lists
(``noun.exc``, ``verb.exc``, ``adj.exc``, ``adv.exc``: ``ran`` -> ``run``, ``geese`` -> ``goose``).
A lemma matches where its words (underscores are spaces) equal consecutive base forms,
case-insensitively, separated only by spaces, hyphens, apostrophes or periods (``take_a_breath``
matches ``took a breath``). The answer is the matched text as written (``ran``), so inflected
answers are common. The synset's lemmas are tried in WordNet's order; the first that occurs gives
the training answer, and every occurrence of every lemma is a gold answer for EM/F1. Examples in
which no lemma is found (synonyms, derived words, typos: about 1.6 %) are counted and skipped;
repeated (question, context) pairs are kept once.

WordNet 3.0 gives 47,550 triples (48,317 usage examples, 764 without the lemma, 3 repeats). The test
split holds out whole synsets (no definition is asked in both splits), and the partitioning
label is the synset's lexicographer category.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .catalog import TaskData
from .squad import QA_COLUMNS, capped, group_holdout, qa_dataset
from .wordnet import WORDNET_LEXNAMES, clean_gloss, iter_synsets, resolve_wordnet_dir

__all__ = ["QUESTION_TEMPLATE", "base_forms", "build_wordnet_qa", "find_lemma", "load_wordnet_qa", "morphy_exceptions",
           "usage_examples"]

#: The question asked for every triple (``{definition}`` is the cleaned gloss).
QUESTION_TEMPLATE = "Which word in the passage means '{definition}'?"

_POS = ("noun", "verb", "adj", "adv")

# WordNet's morphy detachment rules (morph.c), per part of speech.
_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "noun": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
             ("ies", "y")),
    "verb": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}
_WORD = re.compile(r"[^\W_]+")
_GAP = re.compile(r"[\s\-'\u2019.]+")
_QUOTED = re.compile(r'"([^"]*)"')
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: galore(ip), elect(p)


def usage_examples(gloss: str, definition: str | None = None) -> list[str]:
    """The quoted usage examples of a gloss (not the quotations that belong to the definition,
    ``definition`` = :func:`~florg.data.wordnet.clean_gloss` of it, computed when not given)."""
    definition = clean_gloss(gloss) if definition is None else definition
    out = []
    for m in _QUOTED.finditer(gloss):
        text = re.sub(r"\s+", " ", m.group(1)).strip()
        if text and text not in definition:
            out.append(text)
    return out


def morphy_exceptions(folder: str | os.PathLike[str], pos: str) -> dict[str, tuple[str, ...]]:
    """WordNet's irregular forms of one part of speech (``{pos}.exc``): ``{inflected: (base, ...)}``."""
    path = Path(folder) / f"{pos}.exc"
    table: dict[str, tuple[str, ...]] = {}
    if path.is_file():
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 2:
                    table[parts[0].lower()] = tuple(p.lower() for p in parts[1:])
    return table


def base_forms(word: str, pos: str, exceptions: dict[str, tuple[str, ...]] | None = None) -> frozenset[str]:
    """Candidate base forms of ``word`` (lower case) for a part of speech: itself, morphy, exceptions."""
    w = word.lower()
    out = {w, *(exceptions or {}).get(w, ())}
    for suffix, replacement in _RULES[pos]:
        if w.endswith(suffix) and len(w) > len(suffix):
            base = w[: len(w) - len(suffix)] + replacement
            out.add(base)
            if not replacement and len(base) > 2 and base[-1] == base[-2] and base[-1] not in "aeiou":
                out.add(base[:-1])  # stopped -> stopp -> stop
    return frozenset(out)


def find_lemma(lemma: str, context: str, pos: str,
               exceptions: dict[str, tuple[str, ...]] | None = None) -> list[tuple[int, int]]:
    """Every ``(start, end)`` character span of ``lemma`` (or an inflection of it) in ``context``."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(context)]
    bases = [base_forms(context[a:b], pos, exceptions) for a, b in words]
    return _spans(_lemma_tokens(lemma), context, words, bases)


def _lemma_tokens(lemma: str) -> list[str]:
    return _WORD.findall(_MARKER.sub("", lemma).replace("_", " ").lower())


def _spans(tokens: list[str], context: str, words: list[tuple[int, int]], bases: list[frozenset[str]]) -> list[tuple[int, int]]:
    """Spans where ``tokens`` equal the base forms of consecutive words joined by :data:`_GAP` text."""
    if not tokens:
        return []
    n = len(tokens)
    spans = []
    for i in range(len(words) - n + 1):
        if tokens[0] in bases[i] and all(tokens[j] in bases[i + j] for j in range(1, n)) and all(
            _GAP.fullmatch(context[words[i + j][1]:words[i + j + 1][0]]) for j in range(n - 1)
        ):
            spans.append((words[i][0], words[i + n - 1][1]))
    return spans


def _triples(folder: Path) -> Iterator[tuple[str, str, str, dict, str] | None]:
    """``(group, question, context, answers, lexname)`` per usage example; ``None`` where no lemma is found."""
    for pos in _POS:
        exc = morphy_exceptions(folder, pos)
        memo: dict[str, frozenset[str]] = {}
        for syn in iter_synsets(folder, pos):
            if '"' not in syn.gloss:
                continue
            definition = clean_gloss(syn.gloss)
            lemmas = [_lemma_tokens(w) for w in syn.words]
            for context in usage_examples(syn.gloss, definition):
                words = [(m.start(), m.end()) for m in _WORD.finditer(context)]
                bases = []
                for a, b in words:
                    w = context[a:b]
                    if w not in memo:
                        memo[w] = base_forms(w, pos, exc)
                    bases.append(memo[w])
                texts, starts, seen = [], [], set()
                for tokens in lemmas:
                    for start, end in _spans(tokens, context, words, bases):
                        if start not in seen:
                            seen.add(start)
                            texts.append(context[start:end])
                            starts.append(start)
                if not texts or not definition:
                    yield None
                    continue
                question = QUESTION_TEMPLATE.format(definition=definition)
                yield f"{pos}:{syn.offset}", question, context, {"text": texts, "answer_start": starts}, syn.lexname


@functools.lru_cache(maxsize=2)
def _build(folder: str, stamp: tuple) -> tuple[dict[str, list], list[str], list[str], dict[str, int]]:
    del stamp  # cache key only
    cols: dict[str, list] = {c: [] for c in QA_COLUMNS}
    groups, lexnames = [], []
    seen: set[tuple[str, str]] = set()
    counts = {"examples": 0, "no_lemma": 0, "repeats": 0}
    for item in _triples(Path(folder)):
        counts["examples"] += 1
        if item is None:
            counts["no_lemma"] += 1
            continue
        group, question, context, answers, lexname = item
        key = (question.casefold(), context.casefold())
        if key in seen:
            counts["repeats"] += 1
            continue
        seen.add(key)
        cols["id"].append(f"{group}:{len(cols['id'])}")
        cols["title"].append(lexname)
        cols["context"].append(context)
        cols["question"].append(question)
        cols["answers"].append(answers)
        groups.append(group)
        lexnames.append(lexname)
    counts["triples"] = len(groups)
    return cols, groups, lexnames, counts


def build_wordnet_qa(
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, list], list[str], list[str], dict[str, int]]:
    """All WordNet QA triples: ``(columns, synset group per row, lexname per row, counts)``.

    ``counts`` holds ``examples`` (quoted usage examples seen), ``no_lemma`` (skipped: no lemma
    found), ``repeats`` (skipped duplicates) and ``triples`` (kept). Cached per folder.
    """
    folder = resolve_wordnet_dir(data_dir, _POS)
    stamp = tuple((pos, (folder / f"data.{pos}").stat().st_mtime_ns) for pos in _POS)
    return _build(str(folder.resolve()), stamp)


def load_wordnet_qa(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.1,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
) -> TaskData:
    """The ``wordnet-qa`` task: whole synsets held out as the test split, ``label`` = lexicographer category."""
    cols, groups, lexnames, counts = build_wordnet_qa(data_dir)
    names = [n for n in WORDNET_LEXNAMES if n in set(lexnames)]
    index = {n: i for i, n in enumerate(names)}
    train_idx, test_idx = group_holdout(groups, seed, test_fraction)
    train_idx = capped(train_idx, max_train_examples, seed)
    test_idx = capped(test_idx, max_test_examples, seed + 1)

    def split(idx: list[int]):  # noqa: ANN202
        return qa_dataset({c: [v[i] for i in idx] for c, v in cols.items()}, [index[lexnames[i]] for i in idx], names)

    where = str(resolve_wordnet_dir(data_dir, _POS))
    return TaskData(
        "wordnet-qa",
        split(train_idx),
        split(test_idx),
        ("question", "context"),
        names,
        source=f"{where} ({counts['triples']} triples; {counts['no_lemma']} examples without the lemma skipped)",
    )

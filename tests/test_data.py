"""Data layer: WordNet parsing, the task registry (WordNet, local GLUE files) and partitioning."""

import json
import logging
from collections import Counter

import datasets
import pytest

from florg.data import (
    DEFAULT_CLASSES,
    NOUN_CLASSES,
    NOUN_PER_CLASS,
    WORDNET_LEXNAMES,
    DataUnavailableError,
    WordNetNotFoundError,
    available_tasks,
    clean_gloss,
    format_partition_stats,
    load_task,
    load_wordnet,
    partition_dataset,
    partition_stats,
)

WN_DIR = "/usr/share/wordnet"


@pytest.fixture(scope="module")
def wn_raw():
    return load_wordnet(WN_DIR, dedupe=False)


@pytest.fixture(scope="module")
def wn_task():
    return load_task("wordnet", seed=0)


@pytest.fixture(scope="module")
def small_train(wn_task):
    return wn_task.train.select(range(5000))


@pytest.fixture(scope="module")
def tiny_train(wn_task):
    return wn_task.train.select(range(1500))


# ------------------------------------------------------------------------------ WordNet


def test_lexnames_table():
    assert len(WORDNET_LEXNAMES) == 45
    assert WORDNET_LEXNAMES[5] == "noun.animal" and WORDNET_LEXNAMES[13] == "noun.food"
    assert WORDNET_LEXNAMES[20] == "noun.plant" and WORDNET_LEXNAMES[6] == "noun.artifact"


def test_wordnet_four_class_counts(wn_raw):
    assert wn_raw.column_names == ["text", "label"]
    assert wn_raw.features["label"].names == list(DEFAULT_CLASSES)
    counts = Counter(wn_raw["label"])
    by_name = {DEFAULT_CLASSES[i]: c for i, c in counts.items()}
    # WordNet 3.0: 7,509 animal, 8,030 plant, 2,573 food, 11,587 artifact synsets.
    assert by_name["noun.animal"] == pytest.approx(7509, abs=50)
    assert by_name["noun.plant"] == pytest.approx(8030, abs=50)
    assert by_name["noun.food"] == pytest.approx(2573, abs=50)
    assert by_name["noun.artifact"] == pytest.approx(11587, abs=50)
    assert len(wn_raw) == pytest.approx(29699, abs=100)


def test_wordnet_texts_are_clean_definitions(wn_raw):
    texts = wn_raw["text"]
    assert all(t and t == t.strip() for t in texts)
    assert not any('"' in t for t in texts)
    assert not any(t.endswith((";", ":", ",")) for t in texts)
    # The examples are gone, the definition stays.
    assert "a human being" not in texts  # noun.person is not among the classes
    tops = load_wordnet(WN_DIR, ("noun.Tops", "noun.object"))["text"]
    assert "a tangible and visible entity; an entity that can cast a shadow" in tops


def test_wordnet_raw_glosses_keep_examples():
    raw = load_wordnet(WN_DIR, ("noun.artifact", "noun.food"), strip_examples=False, dedupe=False)
    assert sum('"' in t for t in raw["text"]) > 500


def test_wordnet_dedupe(wn_raw):
    deduped = load_wordnet(WN_DIR)
    assert len(deduped) < len(wn_raw)
    assert len(wn_raw) - len(deduped) < 0.03 * len(wn_raw)
    keys = [t.casefold() for t in deduped["text"]]
    assert len(keys) == len(set(keys))
    # "one species" is the gloss of animal and plant genera: ambiguous, so dropped entirely.
    assert "one species" in wn_raw["text"] and "one species" not in deduped["text"]


def test_wordnet_other_parts_of_speech():
    ds = load_wordnet(WN_DIR, ("verb.motion", "adj.all", "adv.all"), dedupe=False)
    counts = Counter(ds["label"])
    assert counts[0] == pytest.approx(1408, abs=20)  # verb.motion
    assert counts[1] == pytest.approx(14435, abs=100)  # adj.all (head + satellite adjectives)
    assert counts[2] == pytest.approx(3621, abs=40)  # adv.all


@pytest.mark.parametrize(
    ("gloss", "expected"),
    [
        ('a human being; "there was too much for one person to do"', "a human being"),
        ('an action; "how could you do such a thing?"; "a second one"', "an action"),
        ('restrict or confine, "I limit you to two visits to the pub a day"', "restrict or confine"),
        ('assail or attack on all sides: "The zebra was beset by leopards"', "assail or attack on all sides"),
        ('causing a sharp taste experience;"quinine is bitter"', "causing a sharp taste experience"),
        ('woven of worsted yarns "he wore a worsted suit"', "woven of worsted yarns"),
        ('a workplace; as in the expression "on the job";', "a workplace; as in the expression on the job"),
        ('a summary list; as in e.g. "a news roundup"', "a summary list; as in e.g. a news roundup"),
        ("(botany) a plant with no examples  ", "(botany) a plant with no examples"),
    ],
)
def test_clean_gloss(gloss, expected):
    assert clean_gloss(gloss) == expected


def test_wordnet_missing_dir(tmp_path):
    with pytest.raises(WordNetNotFoundError) as exc:
        load_wordnet(tmp_path / "nowhere")
    msg = str(exc.value)
    assert "apt-get install -y --no-install-recommends wordnet-base" in msg
    assert "data.data_dir" in msg and "--data-dir" in msg and "nowhere" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError, match="has no data.noun"):
        load_wordnet(tmp_path)  # exists but is empty
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        load_task("wordnet", data_dir=tmp_path / "nowhere")


def test_wordnet_unknown_class():
    with pytest.raises(ValueError, match="noun.animals") as exc:
        load_wordnet(WN_DIR, ("noun.animals", "noun.plant"))
    assert "noun.animal," in str(exc.value) and "verb.weather" in str(exc.value)
    with pytest.raises(ValueError, match="at least two"):
        load_wordnet(WN_DIR, ("noun.plant",))


def test_wordnet_synthetic_dict_folder(tmp_path):
    """Parser on a hand-written file in a WordNet-3.0/dict layout (licence header, hex w_cnt)."""
    d = tmp_path / "WordNet-3.0" / "dict"
    d.mkdir(parents=True)
    lines = [
        "  1 This software and database is being provided to you  ",
        "  2 by Princeton University.  ",
        '00001 05 n 02 cat 0 true_cat 0 000 | feline mammal; "cats purr"  ',
        '00002 20 n 01 oak 0 000 | a tree of the genus Quercus; "an old oak"  ',
        "00003 13 n 0a w1 0 w2 0 w3 0 w4 0 w5 0 w6 0 w7 0 w8 0 w9 0 w10 0 000 | a dish  ",
        "00004 18 n 01 pilot 0 000 | a person who flies  ",
    ]
    (d / "data.noun").write_text("\n".join(lines) + "\n")
    ds = load_wordnet(tmp_path / "WordNet-3.0", ("noun.animal", "noun.plant", "noun.food"), include_words=True)
    assert ds["text"] == ["feline mammal", "a tree of the genus Quercus", "a dish"]
    assert ds["label"] == [0, 1, 2]
    assert ds["words"][0] == "cat true_cat" and ds["words"][2].split()[-1] == "w10"


# ------------------------------------------------------------------------------ task registry


def test_wordnet_task_split(wn_task):
    t = wn_task
    assert t.name == "wordnet" and t.text_fields == ("text",) and not t.is_pair
    assert t.label_names == list(DEFAULT_CLASSES) and t.num_labels == 4
    n = len(t.train) + len(t.test)
    assert n == len(load_wordnet(WN_DIR))
    assert len(t.test) == round(0.1 * n)
    assert not set(t.train["text"]) & set(t.test["text"])
    # stratified: class shares in test match the train shares within 1 point
    tr, te = Counter(t.train["label"]), Counter(t.test["label"])
    for c in range(4):
        assert abs(tr[c] / len(t.train) - te[c] / len(t.test)) < 0.01
    assert "train" in t.summary() and "noun.food" in t.summary()


def test_wordnet_task_seed_and_caps(wn_task):
    same = load_task("wordnet", seed=0, max_train_examples=500, max_test_examples=100)
    again = load_task("wordnet", seed=0, max_train_examples=500, max_test_examples=100)
    other = load_task("wordnet", seed=1, max_train_examples=500, max_test_examples=100)
    assert len(same.train) == 500 and len(same.test) == 100
    assert same.train["text"] == again.train["text"] and same.test["text"] == again.test["text"]
    assert same.train["text"] != other.train["text"]
    # The hold-out is cut before capping: the capped test set is a subset of the full one.
    assert set(same.test["text"]) <= set(wn_task.test["text"])
    fixed = load_task("wordnet", seed=0, test_size=300)
    assert len(fixed.test) == 300
    with pytest.raises(ValueError, match="test_fraction"):
        load_task("wordnet", test_fraction=1.5)


def test_wordnet_nouns_is_a_balanced_twelve_class_benchmark():
    t = load_task("wordnet-nouns", seed=0)
    assert t.name == "wordnet-nouns" and t.label_names == list(NOUN_CLASSES) and t.num_labels == 12
    assert all(c.startswith("noun.") for c in NOUN_CLASSES) and len(set(NOUN_CLASSES)) == 12
    assert len(t.train) + len(t.test) == 12 * NOUN_PER_CLASS == 30000 and len(t.test) == 3000
    everything = Counter(t.train["label"]) + Counter(t.test["label"])
    assert set(everything.values()) == {NOUN_PER_CLASS}  # exactly balanced: a majority-class model scores 1/12
    assert set(Counter(t.test["label"]).values()) == {250}
    assert not set(t.train["text"]) & set(t.test["text"])
    # every example is a real, de-duplicated definition of its class
    full = load_wordnet(WN_DIR, NOUN_CLASSES)
    by_text = dict(zip(full["text"], full["label"]))
    assert all(by_text[x] == y for x, y in zip(t.test["text"], t.test["label"]))
    # the pool of 30,000 is fixed; the seed only moves the hold-out (and the caps)
    other = load_task("wordnet-nouns", seed=3, max_train_examples=4000, max_test_examples=2000)
    assert set(other.train["text"]) | set(other.test["text"]) <= set(t.train["text"]) | set(t.test["text"])
    assert len(other.train) == 4000 and len(other.test) == 2000
    with pytest.raises(ValueError, match="fixed class list.*data.classes"):
        load_task("wordnet-nouns", classes=["noun.animal", "noun.plant"])
    assert "wordnet-nouns" in available_tasks()


def _rte_rows(n, offset=0):
    names = ["entailment", "not_entailment"]
    return [
        {
            "idx": i,
            "sentence1": f"Premise number {i + offset} about a cat.",
            "sentence2": f"Hypothesis {i + offset}.",
            "label": names[i % 2],
        }
        for i in range(n)
    ]


def test_glue_from_csv(tmp_path):
    import pandas as pd

    pd.DataFrame(_rte_rows(40)).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(_rte_rows(10, 100)).to_csv(tmp_path / "validation.csv", index=False)
    t = load_task("glue/rte", data_dir=tmp_path)
    assert t.name == "glue/rte" and t.is_pair and t.text_fields == ("sentence1", "sentence2")
    assert t.label_names == ["entailment", "not_entailment"]
    assert len(t.train) == 40 and len(t.test) == 10
    assert t.train.column_names == ["sentence1", "sentence2", "label"]
    assert t.train["label"][:4] == [0, 1, 0, 1]  # string labels mapped to indices
    assert t.test[0]["sentence1"] == "Premise number 100 about a cat."


def test_glue_from_jsonl_generic_columns_in_task_subfolder(tmp_path):
    sub = tmp_path / "MRPC"
    sub.mkdir()

    def write(name, n):
        with open(sub / name, "w") as fh:
            for i in range(n):
                fh.write(json.dumps({"text_a": f"first {i}", "text_b": f"second {i}", "label": i % 2}) + "\n")

    write("train.jsonl", 30)
    write("dev.jsonl", 8)
    t = load_task("glue/mrpc", data_dir=tmp_path)
    assert t.text_fields == ("text_a", "text_b")
    assert t.label_names == ["not_equivalent", "equivalent"]
    assert (len(t.train), len(t.test)) == (30, 8)
    assert t.test["text_b"][3] == "second 3"


def test_glue_from_save_to_disk(tmp_path):
    feats = datasets.Features(
        {
            "question": datasets.Value("string"),
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
            "idx": datasets.Value("int32"),
        }
    )

    def split(n, unlabelled=False):
        return datasets.Dataset.from_dict(
            {
                "question": [f"q{i}?" for i in range(n)],
                "sentence": [f"s{i}." for i in range(n)],
                "label": [-1 if unlabelled else i % 2 for i in range(n)],
                "idx": list(range(n)),
            },
            features=feats,
        )

    dd = datasets.DatasetDict({"train": split(50), "validation": split(12), "test": split(9, unlabelled=True)})
    dd.save_to_disk(str(tmp_path / "qnli"))
    t = load_task("glue/qnli", data_dir=tmp_path)  # found through the task-named sub-folder
    assert t.text_fields == ("question", "sentence")
    assert (len(t.train), len(t.test)) == (50, 12)
    assert set(t.test["label"]) == {0, 1}
    assert t.train.column_names == ["question", "sentence", "label"]


def test_glue_mnli_uses_validation_matched_and_lone_train_is_split(tmp_path):
    def rows(n):
        return {
            "premise": [f"p{i}" for i in range(n)],
            "hypothesis": [f"h{i}" for i in range(n)],
            "label": [i % 3 for i in range(n)],
        }

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows(60)),
            "validation_mismatched": datasets.Dataset.from_dict(rows(5)),
            "validation_matched": datasets.Dataset.from_dict(rows(7)),
        }
    )
    dd.save_to_disk(str(tmp_path / "mnli"))
    t = load_task("glue/mnli", data_dir=tmp_path / "mnli")
    assert len(t.test) == 7 and t.num_labels == 3

    lone = tmp_path / "sst"
    lone.mkdir()
    (lone / "train.tsv").write_text(
        "sentence\tlabel\n" + "".join(f'it was "great" {i}\t{i % 2}\n' for i in range(50))
    )
    t2 = load_task("glue/sst2", data_dir=lone, test_size=10)
    assert t2.text_fields == ("sentence",) and (len(t2.train), len(t2.test)) == (40, 10)
    assert t2.train[0]["sentence"].startswith('it was "great"')  # TSV read without quote handling


def test_glue_unavailable_is_one_clear_line(tmp_path):
    with pytest.raises(DataUnavailableError) as exc:
        load_task("glue/rte")  # Hub is offline in tests
    msg = str(exc.value)
    assert "\n" not in msg
    assert "glue/rte" in msg and "data.data_dir" in msg
    assert "save_to_disk" in msg and "train.csv" in msg and "sentence1+sentence2" in msg
    with pytest.raises(DataUnavailableError, match="no usable data") as exc2:
        load_task("glue/sst2", data_dir=tmp_path)
    assert "\n" not in str(exc2.value)


def test_glue_bad_columns_and_labels(tmp_path):
    import pandas as pd

    pd.DataFrame({"foo": ["a", "b"], "label": [0, 1]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ValueError, match="no text columns sentence1\\+sentence2"):
        load_task("glue/rte", data_dir=tmp_path)
    pd.DataFrame({"sentence": ["a", "b"], "label": ["positive", "meh"]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(ValueError, match="'meh'"):
        load_task("glue/sst2", data_dir=tmp_path)


def test_unknown_task():
    with pytest.raises(ValueError, match="glue/qnli") as exc:
        load_task("glue/stsb")
    assert "local:" in str(exc.value)


def test_local_task_from_file(tmp_path):
    f = tmp_path / "reviews.jsonl"
    topics = ["sports", "music", "cooking"]
    f.write_text("".join(json.dumps({"text": f"item {i}", "label": topics[i % 3]}) + "\n" for i in range(60)))
    t = load_task(f"local:{f}", seed=3, test_fraction=0.2)
    assert t.label_names == ["cooking", "music", "sports"]  # sorted class names
    assert (len(t.train), len(t.test)) == (48, 12) and t.text_fields == ("text",)
    assert load_task(str(f), seed=3, test_fraction=0.2).test["text"] == t.test["text"]
    folder = tmp_path / "mine"
    folder.mkdir()
    f.rename(folder / "train.jsonl")
    t2 = load_task("local", data_dir=folder, seed=3, test_fraction=0.2)
    assert t2.test["text"] == t.test["text"] and t2.source == str(folder)
    with pytest.raises(ValueError, match="data.data_dir"):
        load_task("local")


# ------------------------------------------------------------------------------ partitioning


def _texts(parts):
    return [p["text"] for p in parts]


@pytest.mark.parametrize("scheme", ["dirichlet", "iid", "pathological"])
def test_partition_deterministic_and_complete(tiny_train, scheme):
    a = partition_dataset(tiny_train, 10, scheme, seed=7)
    b = partition_dataset(tiny_train, 10, scheme, seed=7)
    c = partition_dataset(tiny_train, 10, scheme, seed=8)
    assert len(a) == 10 and all(len(p) > 0 for p in a)
    assert _texts(a) == _texts(b)
    assert _texts(a) != _texts(c)
    assert sum(len(p) for p in a) == len(tiny_train)
    assert sorted(t for p in a for t in p["text"]) == sorted(tiny_train["text"])


def test_dirichlet_is_skewed_iid_is_not(small_train):
    k = 20
    dirichlet = partition_stats(partition_dataset(small_train, k, "dirichlet", alpha=0.5, seed=1), 4)
    iid = partition_stats(partition_dataset(small_train, k, "iid", seed=1), 4)
    assert [s["size"] for s in iid] == [len(small_train) // k] * k

    def mean_top(st):
        return sum(s["top_share"] for s in st) / len(st)

    assert mean_top(iid) < 0.5  # close to the global share of the largest class (~0.39)
    assert mean_top(dirichlet) > mean_top(iid) + 0.15
    sizes = [s["size"] for s in dirichlet]
    assert max(sizes) > 2 * min(sizes) and min(sizes) >= 10  # default minimum met for 20 clients


def test_pathological_classes_per_client(tiny_train):
    parts = partition_dataset(tiny_train, 8, "pathological", classes_per_partition=2, seed=0)
    stats = partition_stats(parts, 4)
    assert all(s["num_classes"] == 2 for s in stats)
    assert set().union(*({i for i, c in enumerate(s["label_counts"]) if c} for s in stats)) == {0, 1, 2, 3}
    one = partition_stats(partition_dataset(tiny_train, 4, "pathological", classes_per_partition=1, seed=0), 4)
    assert sorted(s["label_counts"].index(s["size"]) for s in one) == [0, 1, 2, 3]


def test_dirichlet_tiny_data_never_leaves_a_client_empty(caplog):
    ds = datasets.Dataset.from_dict({"text": [str(i) for i in range(400)], "label": [i % 4 for i in range(400)]})
    with caplog.at_level(logging.WARNING, logger="florg.data.partition"):
        parts = partition_dataset(ds, 20, "dirichlet", alpha=0.1, seed=0, min_partition_size=10)
    assert all(len(p) >= 1 for p in parts)
    assert sorted(int(t) for p in parts for t in p["text"]) == list(range(400))
    assert "retrying with a minimum of" in caplog.text


def test_partition_bad_input(small_train):
    with pytest.raises(ValueError, match="data.num_clients"):
        partition_dataset(small_train, 0)
    with pytest.raises(ValueError, match="cannot split 5 examples among 6 clients"):
        partition_dataset(small_train.select(range(5)), 6)
    with pytest.raises(ValueError, match="data.alpha must be > 0; the paper uses 0.5"):
        partition_dataset(small_train, 4, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match="data.alpha must be > 0"):
        partition_dataset(small_train, 4, "dirichlet", alpha=-1.0)
    with pytest.raises(ValueError, match="valid: iid, dirichlet, pathological"):
        partition_dataset(small_train, 4, "shards")
    with pytest.raises(ValueError, match="data.classes_per_client"):
        partition_dataset(small_train, 4, "pathological", classes_per_partition=5)
    with pytest.raises(ValueError, match="label column 'y'"):
        partition_dataset(small_train, 4, label_column="y")


def test_partition_stats_and_summary(small_train):
    parts = partition_dataset(small_train, 5, "dirichlet", seed=0)
    stats = partition_stats(parts, 4)
    assert [s["partition"] for s in stats] == list(range(5))
    for s, p in zip(stats, parts, strict=True):
        assert s["size"] == len(p) == sum(s["label_counts"])
        assert s["top_share"] == max(s["label_counts"]) / s["size"]
    text = format_partition_stats(stats, list(DEFAULT_CLASSES))
    lines = text.splitlines()
    assert len(lines) == 6 and "noun.animal" in lines[0] and "5000 examples" in lines[0]
    assert lines[1].startswith("client 0") and f"n={stats[0]['size']}" in lines[1].replace(" ", "")
    with pytest.raises(ValueError, match="outside 0..1"):
        partition_stats(parts, 2)


def test_partition_summary_with_many_labels_names_the_largest():
    stats = [{"partition": 0, "size": 10, "label_counts": [0] * 10 + [6, 3, 0, 1, 0], "num_classes": 3,
              "top_share": 0.6}]
    names = [f"article{j}" for j in range(15)]
    lines = format_partition_stats(stats, names).splitlines()
    assert len(lines) == 2 and "15 labels" in lines[0]
    assert lines[1].endswith("labels 3/15  top article10 60%, article11 30%, article13 10%")

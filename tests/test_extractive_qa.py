"""The extractive-QA task family: SQuAD JSON, WordNet QA, stride windows, span decoding, EM/F1, model checks.

Fast tests use MiniLM's tokenizer and a tiny random BERT encoder saved next to it
(the ``tiny_qa_model`` fixture, :func:`helpers.tiny_qa_checkpoint`); the slow end-to-end test runs ``florg run`` on MiniLM.
"""

import json
import logging
import math

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from florg.config import ConfigError, RunConfig, load_config
from florg.data import DataUnavailableError
from florg.data.squad import SquadFormatError, group_holdout, load_squad, read_squad_json
from florg.data.wordnet import DEFAULT_WORDNET_DIR
from florg.data.wordnet_qa import (
    QUESTION_TEMPLATE,
    build_wordnet_qa,
    find_lemma,
    load_wordnet_qa,
    morphy_exceptions,
    usage_examples,
)
from florg.models import resolve_model
from florg.tasks import ClassificationFamily, ExtractiveQAFamily, family_class, task_forms
from florg.tasks.extractive_qa import (
    QAEvalSet,
    best_spans,
    encode_qa,
    exact_match_score,
    f1_score,
    normalize_answer,
    squad_scores,
)
from helpers import tiny_gpt2

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


# ----------------------------------------------------------------------------- EM / F1


def test_normalisation_is_squad_v11s():
    assert normalize_answer("The Cat's  hat!") == "cats hat"  # lower, no punctuation, no article, one space
    assert normalize_answer("An apple, a day.") == "apple day"
    assert normalize_answer("theatre  Anthem") == "theatre anthem"  # articles only as whole words
    assert normalize_answer(" \t") == ""


def test_exact_match_and_f1_hand_computed():
    assert exact_match_score("The Cat.", "cat") == 1.0
    assert exact_match_score("cats", "cat") == 0.0
    # pred {cat, sat} vs gold {cat, sat, down}: precision 1, recall 2/3 -> F1 = 0.8
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # a repeated token counts once per gold occurrence: precision 1/2, recall 1 -> 2/3
    assert f1_score("cat cat", "cat") == pytest.approx(2 / 3)
    assert f1_score("", "cat") == 0.0 and f1_score("dog", "cat") == 0.0
    assert squad_scores("Denver Broncos", ["The Denver Broncos", "Broncos"]) == (1.0, 1.0)
    # max over gold answers: "broncos win" vs "denver broncos" shares 1 of 2 tokens each way -> 0.5
    assert squad_scores("Broncos win", ["Denver Broncos", "Carolina"]) == (0.0, pytest.approx(0.5))
    with pytest.raises(ValueError, match="without gold answers"):
        squad_scores("x", [])


# ----------------------------------------------------------------------------- SQuAD JSON


CTX1 = "Denver Broncos won Super Bowl 50. The game was played in Santa Clara."
CTX2 = "Paris is the capital of France. It lies on the Seine."


def squad_file(path, *, articles=None):
    if articles is None:
        articles = [
            {"title": "Super_Bowl_50", "paragraphs": [{"context": CTX1, "qas": [
                {"id": "q1", "question": "Who won Super Bowl 50?",
                 "answers": [{"text": "Denver Broncos", "answer_start": 0},
                             {"text": "Broncos", "answer_start": 7}]},
                {"id": "q2", "question": "Where was the game played?",
                 "answers": [{"text": "Santa Clara", "answer_start": CTX1.index("Santa Clara")}]},
            ]}]},
            {"title": "Paris", "paragraphs": [{"context": CTX2, "qas": [
                {"id": "q3", "question": "What is the capital of France?",
                 "answers": [{"text": "Paris", "answer_start": 0}]},
                {"id": "q4", "question": "Which river?", "answers": [{"text": "Seine", "answer_start": CTX2.index("Seine")}]},
            ]}]},
            {"title": "Seine", "paragraphs": [{"context": CTX2, "qas": [
                {"id": "q5", "question": "Where does the Seine flow?",
                 "answers": [{"text": "France", "answer_start": CTX2.index("France")}]},
            ]}]},
        ]
    path.write_text(json.dumps({"version": "1.1", "data": articles}))
    return path


def test_read_squad_json_official_layout(tmp_path):
    cols, counts = read_squad_json(squad_file(tmp_path / "s.json"))
    assert cols["id"] == ["q1", "q2", "q3", "q4", "q5"]
    assert cols["title"][:3] == ["Super_Bowl_50", "Super_Bowl_50", "Paris"]
    assert cols["answers"][0] == {"text": ["Denver Broncos", "Broncos"], "answer_start": [0, 7]}
    assert counts == {"questions": 5, "answers": 6, "bad_answers": 0, "dropped_questions": 0}
    for context, answers in zip(cols["context"], cols["answers"]):
        for text, start in zip(answers["text"], answers["answer_start"]):
            assert context[start:start + len(text)] == text


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["data"][1]["paragraphs"][0]["qas"][1].pop("question"), "data[1].paragraphs[0].qas[1] has no 'question'"),
    (lambda d: d["data"][0]["paragraphs"][0].pop("context"), "data[0].paragraphs[0] has no 'context'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][1].update(answer_start="7"),
     "data[0].paragraphs[0].qas[0].answers[1].answer_start is a str, expected int"),
    (lambda d: d.pop("data"), "the top level has no 'data'"),
    (lambda d: d["data"][2].update(paragraphs={}), "data[2].paragraphs is a dict, expected list"),
])
def test_a_missing_or_mistyped_field_names_the_file_and_the_entry(tmp_path, edit, needle):
    path = squad_file(tmp_path / "bad.json")
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(SquadFormatError) as info:
        read_squad_json(path)
    assert str(path) in str(info.value) and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_answers_outside_their_context_are_counted_and_skipped(tmp_path, caplog):
    path = squad_file(tmp_path / "s.json")
    raw = json.loads(path.read_text())
    raw["data"][0]["paragraphs"][0]["qas"][0]["answers"][1]["answer_start"] = 3  # "Broncos" is not at 3
    raw["data"][1]["paragraphs"][0]["qas"][1]["answers"][0]["text"] = "Loire"  # q4's only answer
    path.write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="florg.data.squad"):
        cols, counts = read_squad_json(path)
    assert counts["bad_answers"] == 2 and counts["dropped_questions"] == 1 and counts["questions"] == 4
    assert "q4" not in cols["id"] and cols["answers"][0] == {"text": ["Denver Broncos"], "answer_start": [0]}
    assert any("skipped 2 answer(s)" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)

    for article in raw["data"]:  # now every answer is misplaced: nothing is left
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                for ans in qa["answers"]:
                    ans["answer_start"] += 1
    path.write_text(json.dumps(raw))
    with pytest.raises(SquadFormatError, match="no usable question: all 6 answers are outside their context"):
        read_squad_json(path)


def test_not_json_is_a_clear_error(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("{not json")
    with pytest.raises(SquadFormatError, match="not valid JSON"):
        read_squad_json(path)


def test_load_squad_folder_with_official_names(tmp_path):
    squad_file(tmp_path / "train-v1.1.json")
    dev = [{"title": "Dev_Article", "paragraphs": [{"context": CTX2, "qas": [
        {"id": "d1", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]}]}]}]
    squad_file(tmp_path / "dev-v1.1.json", articles=dev)
    task = load_squad(tmp_path)
    assert len(task.train) == 5 and task.test["id"] == ["d1"]
    assert task.label_names == ["Super_Bowl_50", "Paris", "Seine", "Dev_Article"]
    assert task.train["label"] == [0, 0, 1, 1, 2] and task.test["label"] == [3]
    assert task.text_fields == ("question", "context")


def test_load_squad_one_file_holds_out_whole_articles(tmp_path):
    path = squad_file(tmp_path / "all.json")
    for seed in range(4):
        task = load_squad(path, name=f"squad:{path}", seed=seed, test_fraction=0.3)
        train_titles, test_titles = set(task.train["title"]), set(task.test["title"])
        assert train_titles and test_titles and not train_titles & test_titles
        assert len(task.train) + len(task.test) == 5


def test_group_holdout():
    groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 2 + ["d"]
    train, test = group_holdout(groups, seed=1, fraction=0.3)
    assert sorted(train + test) == list(range(11))
    assert not {groups[i] for i in train} & {groups[i] for i in test}
    assert len(test) >= round(0.3 * 11) and len(train) > 0
    assert group_holdout(groups, 1, 0.3) == (train, test)  # seed-fixed
    with pytest.raises(ValueError, match="one group"):
        group_holdout(["a", "a"], 0, 0.5)


def test_squad_from_the_hub_fails_at_once_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailableError) as info:
        load_squad(None)
    msg = str(info.value)
    assert "rajpurkar/squad" in msg and "data.data_dir" in msg and "squad:<file.json>" in msg and "\n" not in msg


def test_missing_squad_folder_or_train_file(tmp_path):
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_squad(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataUnavailableError, match="no SQuAD train file"):
        load_squad(tmp_path / "empty")


# ----------------------------------------------------------------------------- stride windows


LONG = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
        "phi chi psi omega one two three four five six seven eight nine ten eleven twelve the Golden Gate Bridge "
        "stands tall over the bay thirteen fourteen fifteen")
ANSWER = "Golden Gate Bridge"


def _long_example():
    return {"question": ["Which bridge stands over the bay?"], "context": [LONG],
            "answers": [{"text": [ANSWER], "answer_start": [LONG.index(ANSWER)]}]}


def test_windows_label_the_answer_where_it_is_whole_and_cls_elsewhere(tokenizer):
    feats = encode_qa(_long_example(), tokenizer, max_length=32, doc_stride=6)
    n = len(feats["input_ids"])
    assert n >= 3 and feats["example_index"] == [0] * n
    a_start = LONG.index(ANSWER)
    a_end = a_start + len(ANSWER)
    holding, outside = 0, 0
    for ids, offsets, s, e in zip(feats["input_ids"], feats["offsets"], feats["start_positions"], feats["end_positions"]):
        assert len(ids) <= 32
        ctx = [o for o in offsets if o is not None]
        if ctx[0][0] <= a_start and ctx[-1][1] >= a_end:
            holding += 1
            assert offsets[s] is not None and offsets[e] is not None
            assert LONG[offsets[s][0]:offsets[e][1]] == ANSWER
            assert tokenizer.decode(ids[s:e + 1]) == ANSWER.lower()
        else:
            outside += 1
            assert (s, e) == (0, 0) and ids[0] == tokenizer.cls_token_id  # "not in this window"
    assert holding >= 1 and outside >= 2
    for w in range(n - 1):  # consecutive windows share exactly `stride` context tokens
        left = [o for o in feats["offsets"][w] if o is not None]
        right = [o for o in feats["offsets"][w + 1] if o is not None]
        assert left[-6:] == right[:6]


def test_a_long_question_is_cut_and_a_tiny_window_refused(tokenizer):
    ex = _long_example()
    ex["question"] = [" ".join(["which"] * 40) + "?"]
    feats = encode_qa(ex, tokenizer, max_length=32, doc_stride=6)
    for ids, offsets in zip(feats["input_ids"], feats["offsets"]):
        question_tokens = sum(1 for o in offsets if o is None) - 3  # [CLS] q [SEP] c [SEP]
        assert len(ids) <= 32 and question_tokens == 16  # half of model.max_length
    with pytest.raises(ValueError, match="model.max_length=16 leaves 5 tokens"):
        encode_qa(ex, tokenizer, max_length=16, doc_stride=4)


# ----------------------------------------------------------------------------- back to text


def _eval_set(tokenizer):
    ex = _long_example()
    ex["question"].append("What is first?")
    ex["context"].append("Alpha comes first, then beta.")
    ex["answers"].append({"text": ["Alpha"], "answer_start": [0]})
    feats = encode_qa(ex, tokenizer, max_length=32, doc_stride=6)
    examples = [{"id": f"e{i}", "context": c, "answers": a["text"], "label": i}
                for i, (c, a) in enumerate(zip(ex["context"], ex["answers"]))]
    return QAEvalSet(examples, feats)


def test_best_span_over_windows_maps_back_to_the_context_text(tokenizer):
    es = _eval_set(tokenizer)
    assert len(es) == 2 and es.num_windows >= 4
    start = [[0.0] * len(ids) for ids in es.features["input_ids"]]
    end = [[0.0] * len(ids) for ids in es.features["input_ids"]]
    w = next(i for i, (s, e) in enumerate(zip(es.features["start_positions"], es.features["end_positions"]))
             if s > 0 and es.features["example_index"][i] == 0)
    s, e = es.features["start_positions"][w], es.features["end_positions"][w]
    start[w][s] = end[w][e] = 5.0
    for other in es.windows_of[0]:  # large logits on question tokens and [CLS] never win
        start[other][1] = end[other][1] = start[other][0] = end[other][0] = 50.0
    w1 = es.windows_of[1][0]
    s1 = next(t for t, o in enumerate(es.features["offsets"][w1]) if o is not None)  # "alpha"
    start[w1][s1] = end[w1][s1] = 1.0
    assert best_spans(es, start, end, max_answer_length=30) == [ANSWER, "Alpha"]
    # the same logits with answers of at most 2 tokens: the 3-token span is not allowed
    assert best_spans(es, start, end, max_answer_length=2)[0] != ANSWER


def test_eval_set_select_keeps_each_examples_windows(tokenizer):
    es = _eval_set(tokenizer)
    sub = es.select([1])
    assert len(sub) == 1 and sub.examples[0]["id"] == "e1"
    assert sub.num_windows == len(es.windows_of[1]) and sub.features["example_index"] == [0] * sub.num_windows
    assert sub.features["input_ids"] == [es.features["input_ids"][w] for w in es.windows_of[1]]


# ----------------------------------------------------------------------------- WordNet QA


def test_find_lemma_inflections_and_boundaries():
    verb_exc = morphy_exceptions(DEFAULT_WORDNET_DIR, "verb")
    noun_exc = morphy_exceptions(DEFAULT_WORDNET_DIR, "noun")
    ctx = "The children ran to the store"
    assert [ctx[a:b] for a, b in find_lemma("run", ctx, "verb", verb_exc)] == ["ran"]  # verb.exc
    ctx = "He took a breath and dove"
    assert [ctx[a:b] for a, b in find_lemma("take_a_breath", ctx, "verb", verb_exc)] == ["took a breath"]
    ctx = "She stopped the car while stopping"
    assert [ctx[a:b] for a, b in find_lemma("stop", ctx, "verb", verb_exc)] == ["stopped", "stopping"]  # doubled
    ctx = "The geese flew over the Boxes"
    assert [ctx[a:b] for a, b in find_lemma("goose", ctx, "noun", noun_exc)] == ["geese"]
    assert [ctx[a:b] for a, b in find_lemma("box", ctx, "noun", noun_exc)] == ["Boxes"]  # case-insensitive
    assert find_lemma("dog", "dogma and hotdogs", "noun") == []  # whole words only
    ctx = "a well-known fact in New York."
    assert [ctx[a:b] for a, b in find_lemma("well-known", ctx, "adj")] == ["well-known"]
    assert [ctx[a:b] for a, b in find_lemma("New_York", ctx, "noun")] == ["New York"]
    assert find_lemma("New_York", "New, York", "noun") == []  # only spaces, hyphens, apostrophes, periods between
    assert [ctx[a:b] for a, b in find_lemma("fact(a)", ctx, "adj")] == ["fact"]  # position marker stripped


def test_usage_examples_leave_quotations_of_the_definition():
    gloss = 'as in the expression "on the job"; "he was on the job by seven"; "fine"'
    assert usage_examples(gloss) == ["he was on the job by seven", "fine"]


def test_wordnet_qa_triples_are_spans_of_their_context():
    cols, groups, lexnames, counts = build_wordnet_qa()
    n = counts["triples"]
    assert n == len(cols["id"]) == len(groups) == len(lexnames) > 40_000
    assert counts["examples"] == n + counts["no_lemma"] + counts["repeats"]
    assert 0 < counts["no_lemma"] < 0.03 * counts["examples"]
    prefix = QUESTION_TEMPLATE.split("{")[0]
    for context, question, answers in zip(cols["context"], cols["question"], cols["answers"]):
        assert question.startswith(prefix) and answers["text"]
        for text, start in zip(answers["text"], answers["answer_start"]):
            assert text and context[start:start + len(text)] == text


def test_wordnet_qa_task_holds_out_whole_synsets():
    task = load_wordnet_qa(seed=3, max_train_examples=3000, max_test_examples=400)
    assert len(task.train) == 3000 and len(task.test) == 400
    synsets = lambda ds: {i.rsplit(":", 1)[0] for i in ds["id"]}  # noqa: E731
    assert not synsets(task.train) & synsets(task.test)
    assert all(name.split(".")[0] in ("noun", "verb", "adj", "adv") for name in task.label_names)
    assert set(task.train["title"]) <= set(task.label_names)  # title = lexicographer category = label
    again = load_wordnet_qa(seed=3, max_train_examples=3000, max_test_examples=400)
    assert again.train["id"] == task.train["id"] and again.test["id"] == task.test["id"]


# ----------------------------------------------------------------------------- the family


def test_family_owns_its_task_forms():
    for task in ("wordnet-qa", "squad", "SQuAD", "squad:/data/train.json"):
        assert family_class(task) is ExtractiveQAFamily
    for task in ("wordnet", "glue/rte", "local:/x.csv"):
        assert family_class(task) is ClassificationFamily
    forms = task_forms()
    help_text = RunConfig.__dataclass_fields__["data"].default_factory.__dataclass_fields__["task"].metadata["help"]
    for form in ExtractiveQAFamily.task_forms():
        assert form in forms
        assert form.split("<")[0].rstrip(":") in help_text


def _qa_cfg(tmp_path, tiny_qa_model, *extra):
    return load_config(None, [f"data.task=squad:{squad_file(tmp_path / 'squad.json')}", f"model.name={tiny_qa_model}",
                              "data.num_clients=2", "data.test_fraction=0.4", "model.max_length=48",
                              "data.doc_stride=8", "federation.min_train_nodes=1", "federation.min_available_nodes=1",
                              *extra])


def test_experiment_on_squad_with_the_tiny_model(tmp_path, tiny_qa_model):
    from florg.run.experiment import build_experiment

    exp = build_experiment(_qa_cfg(tmp_path, tiny_qa_model))
    assert isinstance(exp.family, ExtractiveQAFamily) and exp.family.primary_metric == "f1"
    assert isinstance(exp.test, QAEvalSet) and len(exp.test) == len(exp.test.examples) >= 1
    assert sum(len(p) for p in exp.partitions) >= 2 and all(len(p) >= 1 for p in exp.partitions)
    assert any(k.startswith("head/") and "qa_outputs" in k for k in exp.initial_state)
    batch = next(iter(exp.client_loader(0, 1)))
    assert {"input_ids", "attention_mask", "start_positions", "end_positions"} <= set(batch)
    with torch.no_grad():
        assert math.isfinite(exp.model(**batch).loss.item())
    res = exp.evaluate()
    assert 0.0 <= res["exact_match"] <= res["f1"] <= 1.0 and math.isfinite(res["loss"])
    assert len(res["predictions"]) == len(exp.test)
    assert exp.evaluate(exp.personal_eval_set())["examples"] == len(exp.test)


def test_wordnet_qa_experiment_with_a_validation_split(tiny_qa_model):
    from florg.run.experiment import build_experiment

    cfg = load_config(None, ["data.task=wordnet-qa", f"model.name={tiny_qa_model}", "data.num_clients=3",
                             "data.max_train_examples=300", "data.max_test_examples=50", "data.validation_fraction=0.2",
                             "model.max_length=48"])
    exp = build_experiment(cfg)
    assert isinstance(exp.validation, QAEvalSet) and len(exp.validation) == 60 and len(exp.test) == 50
    assert sum(p["size"] for p in exp.partition_summary) == 240  # questions, by lexicographer category
    assert len(exp.partition_summary[0]["label_counts"]) == len(exp.label_names) == 45
    for data in (exp.validation, exp.test):
        res = exp.evaluate(data)
        assert 0.0 <= res["exact_match"] <= res["f1"] <= 1.0 and res["examples"] == len(data)


def test_client_score_weights_f1_by_the_clients_labels():
    fam = ExtractiveQAFamily(RunConfig())
    res = {"f1": 0.5, "label_total": {0: 2, 1: 2}, "label_f1": {0: 2.0, 1: 0.0}}
    assert fam.client_score(res, [1, 3]) == pytest.approx(0.25)  # 1/4 * 1.0 + 3/4 * 0.0
    assert fam.client_score(res, [0, 0, 5]) == 0.5  # no shared label (SQuAD's dev articles): plain F1


def test_a_causal_lm_is_refused_naming_task_and_model(tmp_path, tiny_qa_model):
    folder = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(folder)
    cfg = _qa_cfg(tmp_path, str(folder))
    with pytest.raises(ConfigError) as info:
        ExtractiveQAFamily(cfg).load_data()  # checked before any data is read
    msg = str(info.value)
    assert "data.task" in msg and f"model.name={str(folder)!r}" in msg and "GPT2LMHeadModel" in msg


def _cli(tmp_path, monkeypatch, *sets):
    from florg.cli.main import app

    monkeypatch.chdir(tmp_path)
    args = ["run", "--set", f"out_dir={tmp_path / 'runs'}"]
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(app, args, catch_exceptions=False)


def _one_error_no_run_dir(res, tmp_path):
    assert res.exit_code == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    return errors[0]


def test_cli_bad_qa_input_is_one_line_and_no_run_dir(tmp_path, monkeypatch):
    path = squad_file(tmp_path / "bad.json")
    raw = json.loads(path.read_text())
    del raw["data"][2]["paragraphs"][0]["qas"][0]["id"]
    path.write_text(json.dumps(raw))
    err = _one_error_no_run_dir(_cli(tmp_path, monkeypatch, f"data.task=squad:{path}"), tmp_path)
    assert str(path) in err and "data[2].paragraphs[0].qas[0] has no 'id'" in err

    folder = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(folder)
    good = squad_file(tmp_path / "good.json")
    err = _one_error_no_run_dir(_cli(tmp_path, monkeypatch, f"data.task=squad:{good}", f"model.name={folder}",
                                     "data.num_clients=2", "data.test_fraction=0.4"), tmp_path)
    assert "data.task" in err and "model.name" in err and "causal LM" in err

    err = _one_error_no_run_dir(_cli(tmp_path, monkeypatch, "data.task=squad"), tmp_path)
    assert "data.data_dir" in err and "rajpurkar/squad" in err


# ----------------------------------------------------------------------------- end to end


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_florg_run_on_wordnet_qa_end_to_end_with_dp_export_and_resume(tmp_path, monkeypatch):
    """``florg run`` (simulation) on WordNet QA with MiniLM and local DP: QA rows, summary, predictions,
    plots, the exported adapters answer as the server's final model did, and a resumed run matches."""
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering

    import florg  # noqa: F401  (registers the FLoRG PEFT type)
    from florg.fl.simulation import run_simulation_engine
    from florg.run.rundir import RunDir

    common = ["data.task=wordnet-qa", "data.num_clients=3", "train.local_steps=3", "train.batch_size=8",
              "data.max_train_examples=240", "data.max_test_examples=60", "model.max_length=48",
              "data.max_answer_length=8", "privacy.mode=local", "privacy.clip_norm=3.0",
              "privacy.noise_multiplier=0.3", "privacy.reproducible_noise=true"]
    res = _cli(tmp_path, monkeypatch, *common, "train.rounds=2", "name=full")
    assert res.exit_code == 0, res.stderr[-3000:]
    run_dir = tmp_path / "runs" / "full"
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert 0.0 <= r["test_exact_match"] <= r["test_f1"] <= 1.0 and math.isfinite(r["test_loss"])
        assert "test_accuracy" not in r
    for r in rows[1:]:
        assert r["participants"] == 3 and r["bytes_up"] > 0 and r["privacy_epsilon"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metric"] == "f1" and summary["f1_after"] == rows[-1]["test_f1"]
    assert (run_dir / "plots" / "f1_vs_round.png").is_file()
    partitions = json.loads((run_dir / "partitions.json").read_text())
    assert sum(p["size"] for p in partitions) == 240  # examples (questions) per client, by lexicographer category

    # the exported adapters reproduce the final global model's answers
    predictions = json.loads((run_dir / "predictions.json").read_text())
    cfg = load_config(run_dir / "config.toml")
    from florg.run.experiment import get_experiment

    exp = get_experiment(cfg)
    assert list(predictions) == [ex["id"] for ex in exp.test.examples]
    for folder, flips in (("adapter", 0), ("adapter_lora", 1)):  # the plain-LoRA export: float rounding only
        base = AutoModelForQuestionAnswering.from_pretrained(resolve_model("minilm"))
        # task_type QUESTION_ANS: PEFT's QA wrapper drops token_type_ids, so evaluate the wrapped model (model card)
        model = PeftModel.from_pretrained(base, str(run_dir / folder)).eval().get_base_model()
        out = exp.family.evaluate(model, exp.test, batch_size=16, tokenizer=exp.tokenizer)
        assert sum(a != b for a, b in zip(out["predictions"], predictions.values())) <= flips, folder
        if flips == 0:
            assert out["f1"] == rows[-1]["test_f1"] and out["exact_match"] == rows[-1]["test_exact_match"]

    # stopped after round 1, resumed to round 2: the same rows as the uninterrupted run
    res = _cli(tmp_path, monkeypatch, *common, "train.rounds=1", "name=short")
    assert res.exit_code == 0, res.stderr[-3000:]
    short = RunDir(tmp_path / "runs" / "short")
    cfg2 = load_config(None, [*common, "train.rounds=2", f"out_dir={tmp_path / 'runs'}", "name=short"])
    run_simulation_engine(cfg2, short, reporter=lambda row: None, resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "timing"} for r in rs]  # noqa: E731
    assert strip(_rows(short.path)) == strip(rows)

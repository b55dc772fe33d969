"""The instruction-tuning family: data forms, prompts and masking, metrics, generations, bad input.

Everything here runs on a tiny random Llama and a byte-level BPE tokenizer built in-process
(tests/helpers.py), except the WordNet loader (the Debian WordNet files) and the model/task
mismatch check (MiniLM's config).
"""

import json
import math
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from florg.cli.main import app
from florg.config import ConfigError, load_config
from florg.data import DataUnavailableError
from florg.data.instruct import (
    DEFINE_SYSTEM,
    NO_CATEGORY,
    InstructDataError,
    load_instruct_task,
    read_records,
)
from florg.data.loaders import make_loader
from florg.run.experiment import build_experiment
from florg.tasks import InstructionFamily, family_class, task_forms
from florg.tasks.instruction import (
    ALPACA_PREAMBLE,
    ALPACA_PREAMBLE_INPUT,
    encode_instructions,
    evaluate_lm,
    greedy_generate,
    make_lm_collate,
    render_prompt,
    rouge_l,
    truncate,
)
from helpers import save_tiny_llama, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ALPACA = [{"instruction": f"Name the number {i}", "input": "in words" if i % 2 else "", "output": f"number {i}",
           "category": "odd" if i % 2 else "even"} for i in range(30)]
CHAT = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"hello {i}"},
                      {"role": "assistant", "content": f"hi {i}"}], "category": "chat"} for i in range(10)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "mixed.jsonl", ALPACA + CHAT)


def tiny_cfg(llama_dir, data_file, *extra):
    return load_config(None, [f"data.task=instruct:{data_file}", f"model.name={llama_dir}", "data.num_clients=3",
                              "model.max_length=48", "eval.generate_examples=4", "eval.max_new_tokens=6",
                              "eval.batch_size=8", "train.batch_size=4", *extra])


# ----------------------------------------------------------------------------- task forms and data


def test_family_owns_its_task_forms_and_classification_stays_the_fallback():
    for task in ("wordnet-define", "instruct:data.jsonl", "instruct:hub:vicgalle/alpaca-gpt4"):
        assert family_class(task) is InstructionFamily
    for task in ("wordnet", "glue/rte", "local:x.csv", "data.jsonl"):
        assert family_class(task).name == "classification"
    forms = task_forms()
    assert {"wordnet-define", "instruct:<path>", "instruct:hub:<dataset id>"} <= set(forms)
    assert InstructionFamily.metrics == ("loss", "perplexity") and not InstructionFamily.higher_is_better


def test_alpaca_and_chat_rows_in_one_file(data_file):
    task = load_instruct_task(f"instruct:{data_file}", test_fraction=0.25, seed=0)
    assert len(task.train) + len(task.test) == 40 and len(task.test) == 10
    assert task.label_names == ["chat", "even", "odd"]
    rows = {r["output"]: r for r in [*task.train, *task.test]}
    odd = rows["number 3"]
    assert json.loads(odd["messages"]) == [{"role": "user", "content": "Name the number 3"}]
    assert odd["input"] == "in words" and task.label_names[odd["label"]] == "odd"
    chat = rows["hi 4"]
    assert json.loads(chat["messages"]) == [{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "hello 4"}]
    assert chat["input"] == "" and task.label_names[chat["label"]] == "chat"
    # the hold-out is stratified by category: 25 % of 10 / 15 / 15, largest remainders rounded up
    test_labels = [task.label_names[y] for y in task.test["label"]]
    assert {c: test_labels.count(c) for c in task.label_names} == {"chat": 2, "even": 4, "odd": 4}


def test_folder_with_train_and_test_files_and_no_category(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(12)]
    write_jsonl(tmp_path / "train.jsonl", rows[:9])
    write_jsonl(tmp_path / "test.jsonl", rows[9:])
    task = load_instruct_task(f"instruct:{tmp_path}")
    assert len(task.train) == 9 and len(task.test) == 3  # the test file is the test split: nothing held out
    assert task.label_names == [NO_CATEGORY] and set(task.train["label"]) == {0}
    assert sorted(task.test["output"]) == ["a10", "a11", "a9"]


def test_json_list_file(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}] * 3))
    assert [r["output"] for r in read_records(path)] == ["a"] * 3


@pytest.mark.parametrize("row, needle", [
    ({"instruction": "q"}, "missing field 'output'"),
    ({"output": "a"}, "missing field 'instruction'"),
    ({"instruction": "q", "output": 3}, "field 'output' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last message must be the assistant"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}, "role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "needs a user turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0] needs 'role' and 'content'"),
    ([1, 2], "expected a JSON object"),
])
def test_a_bad_row_names_the_file_and_line(tmp_path, row, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(InstructDataError) as info:
        read_records(path)
    assert str(info.value).startswith(f"{path}:3: ") and needle in str(info.value)


def test_not_json_and_missing_paths(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n')
    with pytest.raises(InstructDataError, match=r"broken.jsonl:2: not valid JSON"):
        read_records(path)
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_instruct_task(f"instruct:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataUnavailableError, match="no train.jsonl"):
        load_instruct_task(f"instruct:{tmp_path}")


def test_hub_dataset_offline_fails_fast_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(DataUnavailableError) as info:
        load_instruct_task("instruct:hub:someone/no-such-instruct-data")
    assert time.perf_counter() - t0 < 30
    msg = str(info.value)
    assert "instruct:hub:someone/no-such-instruct-data" in msg and "OFFLINE" in msg and "\n" not in msg
    assert "instruct:<path" in msg  # says what to do instead


def test_wordnet_define_questions_answers_and_categories():
    task = load_instruct_task("wordnet-define", seed=0, test_fraction=0.1)
    assert len(task.label_names) == 26 and all(n.startswith("noun.") for n in task.label_names)
    n = len(task.train) + len(task.test)
    assert n > 40000
    words = []
    for row in task.train.select(range(200)):
        turns = json.loads(row["messages"])
        assert turns[0] == {"role": "system", "content": DEFINE_SYSTEM}
        q = turns[1]["content"]
        assert q.startswith("What does the word '") and q.endswith("' mean?") and "_" not in q
        assert row["output"] and '"' not in row["output"] and row["input"] == ""
        words.append(q)
    assert len(set(words)) == len(words)
    questions = {json.loads(m)[1]["content"] for m in [*task.train["messages"], *task.test["messages"]]}
    assert len(questions) == n  # one answer per question
    assert "What does the word 'dog' mean?" not in questions  # "dog" heads several synsets: ambiguous, dropped
    assert "What does the word 'aardvark' mean?" in questions
    verbs = load_instruct_task("wordnet-define", classes=["verb.motion", "verb.weather"], max_train_examples=50)
    assert verbs.label_names == ["verb.motion", "verb.weather"] and len(verbs.train) == 50


def test_wordnet_define_unknown_class():
    with pytest.raises(ValueError, match="data.classes: unknown WordNet category 'noun.dragons'"):
        load_instruct_task("wordnet-define", classes=["noun.animal", "noun.dragons"])


# ----------------------------------------------------------------------------- prompts and masking


def encode_rows(tok, rows, max_length=200, keep_text=False):
    import datasets

    from florg.data.instruct import parse_record

    recs = [parse_record(r, f"row {i}") for i, r in enumerate(rows)]
    ds = datasets.Dataset.from_dict({k: [r[k] for r in recs] for k in ("messages", "input", "output")})
    return encode_instructions(ds, tok, max_length, keep_text=keep_text)


def test_chat_template_prompt_and_response():
    tok = tiny_tokenizer(chat_template=True)
    prompt, response, templated = render_prompt(tok, json.dumps([{"role": "user", "content": "q"}]), "ctx", "a")
    assert templated
    assert prompt == "<|im_start|>user\nq\n\nctx<|im_end|>\n<|im_start|>assistant\n"
    assert response == "a<|im_end|>"


def test_fallback_alpaca_prompt_without_a_chat_template():
    tok = tiny_tokenizer(chat_template=False)
    user = json.dumps([{"role": "user", "content": "Name it"}])
    prompt, response, templated = render_prompt(tok, user, "", "a")
    assert not templated and response == "a"
    assert prompt == f"{ALPACA_PREAMBLE}\n\n### Instruction:\nName it\n\n### Response:\n"
    prompt, _, _ = render_prompt(tok, user, "the input", "a")
    assert prompt == f"{ALPACA_PREAMBLE_INPUT}\n\n### Instruction:\nName it\n\n### Input:\nthe input\n\n### Response:\n"
    chat = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "u1"},
                       {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}])
    prompt, _, _ = render_prompt(tok, chat, "", "a2")
    assert prompt == "Be brief.\n\n### Instruction:\nu1\n\n### Response:\na1\n\n### Instruction:\nu2\n\n### Response:\n"


@pytest.mark.parametrize("chat_template", [True, False])
def test_labels_are_minus_100_exactly_on_the_prompt(chat_template):
    tok = tiny_tokenizer(chat_template)
    enc = encode_rows(tok, ALPACA[:6] + CHAT[:3], keep_text=True)
    for ex, row in zip(enc, ALPACA[:6] + CHAT[:3]):
        k = ex["prompt_len"]
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) == len(ex["attention_mask"]) and k >= 1
        assert labels[:k] == [-100] * k
        assert labels[k:] == ids[k:] and all(y != -100 for y in labels[k:])
        answer = row["output"] if "output" in row else row["messages"][-1]["content"]
        assert ex["reference"] == answer
        assert tok.decode(ids[k:], skip_special_tokens=True).strip() == answer
        assert ids[-1] == tok.eos_token_id  # the answer ends the turn (template) / with EOS (fallback)
        prompt = render_prompt(tok, *_raw(row))[0]
        assert ids[:k] == tok(prompt, add_special_tokens=not chat_template)["input_ids"]


def _raw(row):
    from florg.data.instruct import parse_record

    r = parse_record(row, "row")
    return r["messages"], r["input"], r["output"]


def test_truncation_keeps_the_prompt_and_cuts_the_response():
    assert truncate([1, 2, 3], [4, 5], 8) == ([1, 2, 3], [4, 5])
    assert truncate([1, 2, 3], [4, 5, 6, 7, 8, 9], 5) == ([1, 2, 3], [4, 5])
    # the prompt alone is too long: cut from the left, leaving max_length // 2 response tokens
    assert truncate(list(range(10)), [20, 21, 22, 23], 6) == ([7, 8, 9], [20, 21, 22])
    assert truncate(list(range(10)), [20], 6) == ([5, 6, 7, 8, 9], [20])
    tok = tiny_tokenizer(True)
    long = [{"instruction": "x " * 80, "output": "y " * 40}]
    ex = encode_rows(tok, long, max_length=16)[0]
    assert len(ex["input_ids"]) == 16 and ex["prompt_len"] == 8 and ex["labels"][:8] == [-100] * 8
    prompt_only = tok(render_prompt(tok, *_raw(long[0]))[0], add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:8] == prompt_only[-8:]  # the end of the prompt (the generation prompt) stays


# ----------------------------------------------------------------------------- metrics


def test_loss_is_the_mean_over_response_tokens_and_perplexity_its_exp():
    tok = tiny_tokenizer(True)
    model = tiny_llama(len(tok))
    enc = encode_rows(tok, ALPACA[:5] + CHAT[:2])
    res = evaluate_lm(model, make_loader(enc, 3, collate_fn=make_lm_collate(tok.pad_token_id)))
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in enc:  # one example at a time, no padding
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for t in range(ex["prompt_len"], len(ex["input_ids"])):
                total -= float(logp[t - 1, ex["input_ids"][t]])
                count += 1
    assert res["tokens"] == count and res["examples"] == 7
    assert res["loss"] == pytest.approx(total / count, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)


@pytest.mark.parametrize("pred, ref, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("the cat is on the mat", "the cat sat on the mat", 5 / 6),  # LCS "the cat on the mat": P = R = 5/6
    ("a b c d", "a c", 2 * (2 / 4) * 1.0 / (2 / 4 + 1.0)),  # LCS 2: P = 1/2, R = 1 -> F = 2/3
    ("mat the on", "the mat", 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)),  # LCS 1 (order matters)
    ("Dogs, BARK!", "dogs bark", 1.0),  # lower-cased, punctuation dropped
    ("", "anything", 0.0),
    ("nothing in common", "a plant", 0.0),
])
def test_rouge_l_hand_computed(pred, ref, expected):
    assert rouge_l(pred, ref) == pytest.approx(expected, abs=1e-12)


def test_batched_greedy_generation_equals_one_at_a_time():
    tok = tiny_tokenizer(True)
    model = tiny_llama(len(tok), seed=3)
    enc = encode_rows(tok, ALPACA[:3] + CHAT[:2])
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in enc]  # different lengths: left padding in a batch
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_generate(model, tok, prompts, max_new_tokens=8, batch_size=5)
    single = [greedy_generate(model, tok, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single


# ----------------------------------------------------------------------------- the experiment and finish


def test_experiment_has_no_head_and_adapts_q_and_v(llama_dir, data_file):
    exp = build_experiment(tiny_cfg(llama_dir, data_file))
    assert exp.target_modules == ["q_proj", "v_proj"]
    assert exp.family.head_modules(exp.model) == []
    assert all(k.startswith("A/") for k in exp.initial_state)  # FLoRG factors only: no head/ keys
    assert len(exp.initial_state) == 2 * 2  # 2 layers x (q_proj, v_proj)
    batch = next(iter(exp.client_loader(0, 1)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    with torch.no_grad():
        assert float(exp.model(**batch).loss) > 0
    res = exp.evaluate()
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))


def test_finish_writes_generations_before_and_after(llama_dir, data_file, tmp_path):
    from florg.train import cycle, make_optimizer, train_steps

    cfg = tiny_cfg(llama_dir, data_file, "train.lr=0.05")
    exp = build_experiment(cfg)
    exp.method.load_global(exp.model, exp.initial_state)
    opt = make_optimizer(exp.model.parameters(), cfg.train, 0.05)
    train_steps(exp.model, cycle(exp.client_loader(0, 1)), opt, 5)
    trained = {k: v.clone() for k, v in exp.model.state_dict().items()}
    extras = exp.family.finish(exp.model, exp, tmp_path)
    assert all(torch.equal(v, trained[k]) for k, v in exp.model.state_dict().items())  # the final state is back
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 4 == extras["generate_examples"]
    assert set(rows[0]) == {"index", "prompt", "reference", "before", "after", "rouge_l_before", "rouge_l_after"}
    sample = exp.test.select([r["index"] for r in rows])
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in sample]
    assert [r["after"] for r in rows] == greedy_generate(exp.model, exp.tokenizer, prompts, max_new_tokens=6)
    exp.method.load_global(exp.model, exp.initial_state)
    assert [r["before"] for r in rows] == greedy_generate(exp.model, exp.tokenizer, prompts, max_new_tokens=6)
    assert [r["reference"] for r in rows] == list(sample["reference"])
    assert extras["rouge_l_after"] == pytest.approx(sum(r["rouge_l_after"] for r in rows) / 4)
    assert extras["rouge_l_before"] == pytest.approx(sum(rouge_l(r["before"], r["reference"]) for r in rows) / 4)
    # the same seed draws the same prompts
    other = tmp_path / "again"
    other.mkdir()
    again = build_experiment(cfg)
    again.family.finish(again.model, again, other)
    assert [json.loads(x)["index"] for x in (other / "generations.jsonl").read_text().splitlines()] == \
        [r["index"] for r in rows]


def test_no_generations_when_generate_examples_is_0(llama_dir, data_file, tmp_path):
    exp = build_experiment(tiny_cfg(llama_dir, data_file, "eval.generate_examples=0"))
    assert exp.family.finish(exp.model, exp, tmp_path) == {}
    assert not (tmp_path / "generations.jsonl").exists()


def test_an_encoder_model_does_not_fit_instruction_tuning():
    cfg = load_config(None, ["data.task=wordnet-define", "model.name=minilm"])
    with pytest.raises(ConfigError) as info:
        InstructionFamily(cfg).check_model()
    msg = str(info.value)
    assert "data.task" in msg and "model.name" in msg and "'minilm'" in msg and "bert" in msg
    assert "smollm2" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- the CLI: bad input

ROW_OK = {"instruction": "q", "output": "a"}


@pytest.mark.parametrize("make, needle", [
    (lambda d: ["--set", "data.task=wordnet-define", "--set", "model.name=minilm"], "model.name='minilm'"),
    (lambda d: ["--set", f"data.task=instruct:{write_jsonl(d / 'b.jsonl', [ROW_OK, {'instruction': 'q'}])}"],
     "b.jsonl:2: missing field 'output'"),
    (lambda d: ["--set", f"data.task=instruct:{d / 'none.jsonl'}"], "does not exist"),
    (lambda d: ["--set", "data.task=instruct:hub:someone/nothing"], "could not be loaded"),
    (lambda d: ["--set", "data.task=wordnet-define", "--set", "eval.max_new_tokens=0"], "eval.max_new_tokens"),
])
def test_bad_instruction_input_is_one_line_and_no_run_dir(tmp_path, monkeypatch, llama_dir, make, needle):
    monkeypatch.chdir(tmp_path)
    args = ["run", "--set", f"out_dir={tmp_path / 'runs'}", "--set", f"model.name={llama_dir}", *make(tmp_path)]
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    assert res.exit_code == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- export parity


def test_exported_plain_lora_generates_the_same_greedy_tokens(tmp_path):
    """The FLoRG adapter of a causal LM, exported to plain PEFT LoRA and loaded on a fresh base model."""
    from peft import PeftModel

    from florg.adapters import save_as_lora
    from florg.methods import get_method
    from florg.tasks.instruction import greedy_tokens

    tok = tiny_tokenizer(True)
    cfg = load_config(None, ["method.name=florg", "method.rank=4", "method.alpha=16"])
    model = get_method(cfg).build(tiny_llama(len(tok), seed=0), ["q_proj", "v_proj", "up_proj"], [])
    enc = encode_rows(tok, ALPACA[:12] + CHAT[:4])
    loader = make_loader(enc, 4, shuffle=True, seed=0, collate_fn=make_lm_collate(tok.pad_token_id))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for batch in [*loader, *loader]:
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in enc]
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=None, max_new_tokens=12, batch_size=8)  # no early stop
    florg_tokens = greedy_tokens(model, prompts, **kw)
    save_as_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(tiny_llama(len(tok), seed=0), str(tmp_path / "lora"))
    assert greedy_tokens(lora, prompts, **kw) == florg_tokens
    with torch.no_grad():
        ids = torch.tensor([enc[0]["input_ids"]])
        assert torch.allclose(lora(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    # the adapter matters: the base model alone answers differently
    assert greedy_tokens(tiny_llama(len(tok), seed=0), prompts, **kw) != florg_tokens


# ----------------------------------------------------------------------------- more of the generic machinery


def test_same_seed_same_partitions_and_metrics_and_a_validation_split(llama_dir, data_file):
    cfg = tiny_cfg(llama_dir, data_file, "data.validation_fraction=0.2")
    a, b = build_experiment(cfg), build_experiment(cfg)
    assert [p["input_ids"] for p in a.partitions] == [p["input_ids"] for p in b.partitions]
    assert a.partition_summary == b.partition_summary
    assert a.evaluate() == b.evaluate()
    assert len(a.validation) == round(0.2 * (len(a.validation) + sum(len(p) for p in a.partitions)))
    res = a.evaluate(a.validation)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))


@pytest.mark.parametrize("mode", ["local", "central"])
def test_florg_differential_privacy_on_a_headless_causal_lm(mode):
    from florg.methods import get_method

    tok = tiny_tokenizer(True)
    cfg = load_config(None, ["method.name=florg", f"privacy.mode={mode}", "method.weighting=uniform",
                             "privacy.reproducible_noise=true"])
    method = get_method(cfg)
    model = method.build(tiny_llama(len(tok)), ["q_proj", "v_proj"], [])
    state = method.initial_global(model)
    gen = torch.Generator().manual_seed(0)
    uploads = [{k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in state.items()} for _ in range(3)]
    if mode == "local":
        private = method.privatize_upload(uploads[0], state, gen)
        assert set(private) == set(state) and not torch.equal(private[next(iter(state))], uploads[0][next(iter(state))])
        new, _ = method.aggregate([method.privatize_upload(u, state, gen) for u in uploads], [1, 1, 1], state)
    else:
        new, diag = method.aggregate_private(uploads, state, denominator=3, generator=gen)
        assert diag["dp_gram_noise_std"] > 0
    assert set(new) == set(state) and all(torch.isfinite(v).all() for v in new.values())


@pytest.mark.slow
def test_florg_run_instruct_config_end_to_end(tmp_path, monkeypatch):
    """``florg run --config configs/instruct.toml`` (reduced) through the simulation: rows, generations, export."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from florg.models import load_pretrained

    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "instruct.toml"
    small = ["data.num_clients=2", "train.rounds=1", "train.local_steps=2", "data.max_train_examples=100",
             "data.max_test_examples=8", "eval.generate_examples=3", "eval.max_new_tokens=10",
             f"out_dir={tmp_path / 'runs'}", "name=e2e"]
    res = CliRunner().invoke(app, ["run", "--config", str(config), *[x for s in small for x in ("--set", s)]],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "e2e"
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["test_perplexity"] == pytest.approx(math.exp(r["test_loss"])) for r in rows)
    assert rows[1]["bytes_up"] > 0 and rows[1]["participants"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["metric"] == "loss" and summary["generations"] == "generations.jsonl"
    assert {"rouge_l_before", "rouge_l_after"} <= set(summary)
    assert "rouge_l after" in res.stdout and "ppl" in res.stdout
    gens = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 3 and all(g["prompt"].startswith("What does the word '") for g in gens)
    assert (run / "plots" / "loss_vs_round.png").is_file()
    # the exported plain LoRA on the original model answers exactly as the run's final FLoRG model did
    base, tok = load_pretrained("smollm2", AutoModelForCausalLM)
    lora = PeftModel.from_pretrained(base, str(run / "adapter_lora"))
    from florg.data.instruct import define_turns

    prompts = []
    for g in gens:
        word = g["prompt"][len("What does the word '"):-len("' mean?")]
        text = tok.apply_chat_template(define_turns(word), tokenize=False, add_generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    assert greedy_generate(lora, tok, prompts, max_new_tokens=10) == [g["after"] for g in gens]


def test_a_template_that_refuses_system_turns_gets_them_in_the_first_user_turn():
    tok = tiny_tokenizer(True)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
                         "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    turns = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}])
    prompt, response, _ = render_prompt(tok, turns, "", "a")
    assert prompt == "[user] Be brief.\n\nq\n[assistant] " and response == "a"
    tok.chat_template = "{{ raise_exception('never') }}"
    with pytest.raises(ValueError, match="cannot format the prompt turns .*never"):
        render_prompt(tok, turns, "", "a")

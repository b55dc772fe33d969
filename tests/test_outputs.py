"""Self-describing run outputs (task_type, portable base id, labels, model card) and florg.predict / florg predict."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

import florg
from florg.cli.main import app
from florg.config import load_config
from florg.fl.simulation import run_simulation_engine
from florg.models import portable_model_id, resolve_model
from florg.run.experiment import get_experiment
from florg.run.outputs import describe_adapters
from florg.run.rundir import RunDir
from helpers import TINY_OVERRIDES, save_tiny_encoder, save_tiny_llama

TEXTS = ["a domestic animal kept for companionship", "a plant with green leaves", "food made from flour"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT encoder (with its pooler) and MiniLM's tokenizer (helpers.save_tiny_encoder)."""
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory, tiny_encoder):
    """A real tiny FLoRG classification run (3 clients, 2 rounds) on a tiny BERT given as a local path."""
    tmp = tmp_path_factory.mktemp("cls-run")
    cfg = load_config(None, [*TINY_OVERRIDES, f"out_dir={tmp}", "name=run", f"model.name={tiny_encoder}"])
    run_dir = RunDir.create(cfg)
    summary = run_simulation_engine(cfg, run_dir, reporter=lambda row: None)
    return run_dir.path, cfg, summary


def _test_batches(cfg):
    """The run's test split, collated as the run evaluated it (labels dropped)."""
    from florg.data.loaders import make_loader

    exp = get_experiment(cfg)
    loader = make_loader(exp.test, 64, shuffle=False, seed=0, tokenizer=exp.tokenizer)
    return [{k: v for k, v in b.items() if k != "labels"} for b in loader], [b["labels"] for b in loader]


def _accuracy(model, batches, labels):
    with torch.no_grad():
        preds = torch.cat([model(**b).logits.argmax(-1) for b in batches])
    gold = torch.cat(labels)
    return int((preds == gold).sum()) / len(gold)  # as evaluate_classifier counts it


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_adapter_folders_describe_themselves(cls_run, tiny_encoder):
    path, cfg, summary = cls_run
    exp = get_experiment(cfg)
    for folder, peft_type in (("adapter", "FLORG"), ("adapter_lora", "LORA")):
        config = json.loads((path / folder / "adapter_config.json").read_text())
        assert config["peft_type"] == peft_type
        assert config["task_type"] == "SEQ_CLS"
        assert config["base_model_name_or_path"] == tiny_encoder  # a user-given local path stays as given
        labels = json.loads((path / folder / "labels.json").read_text())
        assert labels["id2label"] == {str(i): n for i, n in enumerate(exp.label_names)}
        assert labels["label2id"] == {n: i for i, n in enumerate(exp.label_names)}
        assert (path / folder / "tokenizer.json").is_file()
        card = (path / folder / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: peft\n")
        assert "wordnet" in card and "SEQ_CLS" in card
        assert all(f"| {i} | {n} |" in card for i, n in enumerate(exp.label_names))
        assert f"| accuracy | {summary['accuracy_before']:.4f} | {summary['accuracy_after']:.4f} |" in card
        assert "AutoPeftModelForSequenceClassification" in card
        assert ("import florg" in card.split("With PEFT")[1]) == (folder == "adapter")


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
@pytest.mark.parametrize("folder", ["adapter", "adapter_lora"])
def test_auto_peft_loads_the_adapters_and_reproduces_the_run(cls_run, folder):
    from peft import AutoPeftModelForSequenceClassification

    path, cfg, summary = cls_run
    labels = json.loads((path / folder / "labels.json").read_text())
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        str(path / folder), num_labels=len(labels["id2label"]),
        id2label={int(i): n for i, n in labels["id2label"].items()}, label2id=labels["label2id"]).eval()
    batches, gold = _test_batches(cfg)
    assert _accuracy(model, batches, gold) == pytest.approx(summary["accuracy_after"], abs=1e-9)
    run_model = florg.load_run_model(path)
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(model(**b).logits, run_model.model(**b).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_predict_python_and_cli(cls_run, tmp_path):
    path, cfg, _ = cls_run
    run_model = florg.load_run_model(path)
    rows = florg.predict(run_model, TEXTS, top_k=2)
    assert [r["text"] for r in rows] == TEXTS
    enc = run_model.tokenizer(TEXTS, truncation=True, max_length=cfg.model.max_length, padding=True,
                              return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(run_model.model(**enc).logits, -1)
    for row, p in zip(rows, probs):
        assert row["label"] == run_model.labels[int(p.argmax())]
        assert row["probability"] == pytest.approx(float(p.max()), abs=1e-5)
        assert len(row["top"]) == 2 and row["top"][0][0] == row["label"]
    res = CliRunner().invoke(app, ["predict", str(path), *TEXTS, "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    cli_rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["label"], round(r["probability"], 5)) for r in cli_rows] == \
        [(r["label"], round(r["probability"], 5)) for r in rows]
    bad = CliRunner().invoke(app, ["predict", str(tmp_path), "text"])
    assert bad.exit_code == 2 and "not a florg run directory" in bad.stderr


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_predict_checks_arguments_before_loading_the_model(cls_run, tmp_path, monkeypatch):
    """Every bad argument errors (exit 2, one line) without loading the model: load_run_model must not run."""
    import shutil

    import florg.run.predict as predict_mod

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(predict_mod, "load_run_model", no_load)
    path, _, _ = cls_run
    qa = tmp_path / "qa-run"  # the classification run relabelled as extractive QA: only config.toml is read
    shutil.copytree(path, qa)
    text = (qa / "config.toml").read_text()
    (qa / "config.toml").write_text(re.sub(r'(?m)^task = ".*"$', 'task = "wordnet-qa"', text, count=1))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(path, incomplete)
    shutil.rmtree(incomplete / "adapter")
    cases = [
        ([str(qa), "what is a dog?"], "--context"),
        ([str(path), "a", "b", "--pair", "x"], "--pair"),
        ([str(qa), "q", "--context", "c", "--pair", "x"], "--pair"),
        ([str(path), "a", "--top-k", "0"], "--top-k"),
        ([str(incomplete), "a"], "has not completed"),
        ([str(tmp_path / "missing"), "a"], "not a directory"),
    ]
    for args, needle in cases:
        res = CliRunner().invoke(app, ["predict", *args])
        assert res.exit_code == 2, (args, res.stdout, res.stderr)
        assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
    with pytest.raises(ValueError, match="--context"):
        florg.predict(qa, ["what is a dog?"])


def _perturbed_run(cfg, tmp_path, seed=0, perturb_base=False):
    """A run directory holding the experiment's model with random adapter weights (no federated training);
    ``perturb_base`` also changes the adapted layers' frozen weights (as FedEx-LoRA and FLoRA do)."""
    exp = get_experiment(cfg)
    exp.method.load_global(exp.model, exp.initial_state)
    exp.model.eval()  # no dropout in the reference outputs
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in exp.model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        if perturb_base:
            for layer in exp.method.layers(exp.model).values():
                w = layer.get_base_layer().weight
                w.add_(0.1 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
    run_dir = RunDir.create(cfg, tmp_path / "run")
    exp.method.save_artifacts(exp.model, run_dir.path)
    summary = {"metric": exp.family.primary_metric, f"{exp.family.primary_metric}_before": 1.0,
               f"{exp.family.primary_metric}_after": 0.5}
    describe_adapters(exp, run_dir.path, summary)
    return exp, run_dir.path


@pytest.mark.parametrize("method", ["florg", "fedit"])
def test_question_answering_adapters_load_with_auto_peft_and_predict(tmp_path, tiny_qa_model, method):
    from peft import AutoPeftModelForQuestionAnswering

    from florg.tasks.extractive_qa import evaluate_qa
    from test_extractive_qa import squad_file

    cfg = load_config(None, [f"data.task=squad:{squad_file(tmp_path / 'squad.json')}", f"model.name={tiny_qa_model}",
                             "data.num_clients=2", "model.max_length=64", f"method.name={method}"])
    exp, path = _perturbed_run(cfg, tmp_path)
    folders = ["adapter", "adapter_lora"] if method == "florg" else ["adapter"]
    assert not (path / "adapter_lora").exists() or method == "florg"
    batch = {k: torch.tensor([exp.test.features[k][0]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        ref = exp.model(**batch)
    for folder in folders:
        config = json.loads((path / folder / "adapter_config.json").read_text())
        assert config["task_type"] == "QUESTION_ANS" and not (path / folder / "labels.json").exists()
        model = AutoPeftModelForQuestionAnswering.from_pretrained(str(path / folder)).eval()
        assert "token_type_ids" in (path / folder / "README.md").read_text()
        with torch.no_grad():
            out = model.get_base_model()(**batch)  # PEFT's QA wrapper drops token_type_ids (see the model card)
        torch.testing.assert_close(out.start_logits, ref.start_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.end_logits, ref.end_logits, atol=1e-4, rtol=1e-4)
    example = exp.test.examples[0]
    sub = exp.test.select([0])
    expected = evaluate_qa(exp.model, sub, batch_size=8, pad_token_id=int(exp.tokenizer.pad_token_id or 0),
                           max_answer_length=cfg.data.max_answer_length)["predictions"][0]
    ds_question = _raw_question(cfg, example["id"])
    rows = florg.predict(path, [ds_question], context=example["context"])
    assert rows == [{"question": ds_question, "answer": expected}]
    with pytest.raises(ValueError, match="--context"):
        florg.predict(path, [ds_question])


def _raw_question(cfg, example_id):
    exp = get_experiment(cfg)
    data = exp.family.load_data()
    return next(q for i, q in zip(data.test["id"], data.test["question"]) if i == example_id)


def test_causal_lm_adapters_load_with_auto_peft_and_generate(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from florg.tasks.instruction import greedy_generate
    from test_instruction import ALPACA, CHAT, write_jsonl

    llama = save_tiny_llama(tmp_path / "llama")
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA + CHAT)
    cfg = load_config(None, [f"data.task=instruct:{data}", f"model.name={llama}", "data.num_clients=2",
                             "model.max_length=48", "eval.generate_examples=0"])
    exp, path = _perturbed_run(cfg, tmp_path)
    ids = torch.tensor([exp.test["input_ids"][0]])
    with torch.no_grad():
        ref = exp.model(input_ids=ids).logits
    for folder in ("adapter", "adapter_lora"):
        config = json.loads((path / folder / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == llama
        model = AutoPeftModelForCausalLM.from_pretrained(str(path / folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=1e-4, rtol=1e-4)
    prompt = "What does the word mean? cat"
    enc = exp.family.encode(_one_prompt(prompt), exp.tokenizer, train=False)
    expected = greedy_generate(exp.model, exp.tokenizer, [enc["input_ids"][0][: enc["prompt_len"][0]]],
                               max_new_tokens=5)
    assert florg.predict(path, [prompt], max_new_tokens=5) == [{"prompt": prompt, "generation": expected[0]}]


def _one_prompt(text):
    import datasets

    return datasets.Dataset.from_dict({"messages": [json.dumps([{"role": "user", "content": text}])], "input": [""],
                                       "output": [""]})


def test_portable_base_model_ids_resolve_offline(monkeypatch):
    assert portable_model_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_model_id("SmolLM2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_model_id("/some/local/model") == "/some/local/model"
    assert portable_model_id("FacebookAI/roberta-large") == "FacebookAI/roberta-large"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == resolve_model("minilm")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_a_method_that_changes_the_base_weights_is_reproduced_by_load_run_model(tmp_path, tiny_encoder):
    cfg = load_config(None, [f"model.name={tiny_encoder}", "data.num_clients=2", "data.max_train_examples=40",
                             "data.max_test_examples=16", "model.max_length=24", "method.name=fedex-lora"])
    exp, path = _perturbed_run(cfg, tmp_path, perturb_base=True)
    assert (path / "base_delta.safetensors").is_file()
    assert "base_delta.safetensors" in (path / "adapter" / "README.md").read_text()
    enc = exp.tokenizer(TEXTS, truncation=True, max_length=24, padding=True, return_tensors="pt")
    run_model = florg.load_run_model(path)
    with torch.no_grad():
        torch.testing.assert_close(run_model.model(**enc).logits, exp.model(**enc).logits, atol=1e-5, rtol=1e-5)
    assert [r["label"] for r in florg.predict(run_model, TEXTS)] == \
        [exp.label_names[i] for i in exp.model(**enc).logits.argmax(-1).tolist()]


def test_predict_text_pairs(tmp_path, tiny_encoder):
    cfg = load_config(None, [f"model.name={tiny_encoder}", "data.num_clients=2", "data.max_train_examples=40",
                             "data.max_test_examples=16", "model.max_length=24"])
    exp, path = _perturbed_run(cfg, tmp_path)
    seconds = ["an animal", "a plant", "a food"]
    rows = florg.predict(path, TEXTS, pairs=seconds, top_k=1)
    enc = exp.tokenizer(TEXTS, seconds, truncation=True, max_length=24, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(exp.model(**enc).logits, -1)
    assert [(r["pair"], r["label"]) for r in rows] == list(zip(seconds, [exp.label_names[i] for i in probs.argmax(-1)]))
    assert [r["probability"] for r in rows] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="pairs"):
        florg.predict(path, TEXTS, pairs=seconds[:2])

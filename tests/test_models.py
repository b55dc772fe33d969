"""Model layer: offline aliases, LoRA targets, classification heads, tokenization and loaders."""

import os

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from florg.data import TaskData
from florg.data.loaders import make_collate, make_loader
from florg.models import ModelNotFoundError, default_target_modules, head_module_names, load_model, resolve_model
from florg.tasks.classification import encode


@pytest.fixture(scope="module")
def minilm():
    return load_model("minilm", 3, label_names=["a", "b", "c"])


@pytest.fixture(scope="module")
def pairs():
    return datasets.Dataset.from_dict(
        {
            "sentence1": ["A man is eating food.", "The cat sleeps.", "It rains in Paris today, heavily."],
            "sentence2": ["A man eats bread.", "A dog barks loudly at night.", "The weather is wet."],
            "label": [0, 1, 2],
        }
    )


def test_minilm_alias_loads_offline(minilm):
    model, tok = minilm
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.model_type == "bert" and model.config.num_labels == 3
    assert model.classifier.out_features == 3
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert tok.pad_token == "[PAD]" and model.config.pad_token_id == tok.pad_token_id == 0
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    assert os.path.isdir(resolve_model("minilm"))


def test_dtype_is_applied():
    model, _ = load_model("minilm", 2, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_minilm_targets_and_head(minilm):
    model, _ = minilm
    assert default_target_modules(model) == ["query", "value"]
    assert head_module_names(model) == ["classifier"]
    names = {n for n, _ in model.named_modules()}
    assert "bert.encoder.layer.0.attention.self.query" in names


def test_targets_and_heads_other_architectures():
    llama = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_labels=2,
        )
    )  # fmt: skip
    assert default_target_modules(llama) == ["q_proj", "v_proj"]
    assert head_module_names(llama) == ["score"]
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, num_labels=2))
    assert default_target_modules(gpt2) == ["c_attn"]
    assert head_module_names(gpt2) == ["score"]


def test_unknown_architecture_asks_for_target_modules():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {"model_type": "oddformer"})()
            self.proj_in = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 2)

    with pytest.raises(ValueError, match="model.target_modules") as exc:
        default_target_modules(Odd())
    assert "oddformer" in str(exc.value) and "proj_in" in str(exc.value)
    with pytest.raises(ValueError, match="classification head"):
        head_module_names(Odd())


def test_unknown_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError) as exc:
        load_model("no-such-org/no-such-model", 2)
    msg = str(exc.value)
    assert "no-such-org/no-such-model" in msg and "minilm" in msg and "local" in msg
    assert "\n" not in msg
    with pytest.raises(ModelNotFoundError, match="no such local file or folder"):
        load_model(str(tmp_path / "missing"), 2)
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(str(tmp_path), 2)
    with pytest.raises(ValueError, match="num_labels"):
        load_model("minilm", 0)


def test_encode_sentence_pairs(minilm, pairs):
    _, tok = minilm
    enc = encode(pairs, tok, max_length=32)  # text fields detected: sentence1 + sentence2
    assert set(enc.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert enc["labels"] == [0, 1, 2]
    first = enc[0]
    assert tok.decode(first["input_ids"]) == "[CLS] a man is eating food. [SEP] a man eats bread. [SEP]"
    assert set(first["token_type_ids"]) == {0, 1}
    short = encode(pairs, tok, max_length=10)
    assert all(len(ids) <= 10 for ids in short["input_ids"])  # longest-first truncation
    assert all(ids.count(tok.sep_token_id) == 2 for ids in short["input_ids"])  # both texts kept
    single = encode(pairs, tok, max_length=32, text_fields=["sentence2"])
    assert single[0]["input_ids"].count(tok.sep_token_id) == 1


def test_encode_task_data(minilm, pairs):
    _, tok = minilm
    task = TaskData("t", pairs, pairs.select([0]), ("sentence1", "sentence2"), ["a", "b", "c"])
    assert len(encode(task, tok, 16, split="test")) == 1
    assert encode(task, tok, 16)["input_ids"] == encode(pairs, tok, 16)["input_ids"]
    with pytest.raises(ValueError, match="columns"):
        encode(pairs, tok, 16, text_fields=["nope"])


def test_make_loader_deterministic_and_padded(minilm):
    model, tok = minilm
    ds = datasets.Dataset.from_dict(
        {"text": [f"example number {i} " + "word " * (i % 7) for i in range(40)], "label": [i % 3 for i in range(40)]}
    )
    enc = encode(ds, tok, 32)

    def order(seed):
        return [b["labels"].tolist() + b["input_ids"][:, 3].tolist() for b in make_loader(enc, 8, True, seed)]

    assert order(5) == order(5)
    assert order(5) != order(6)
    # Two epochs over one loader differ, yet replay identically from the seed.
    dl = make_loader(enc, 8, shuffle=True, seed=5)
    e1 = [b["labels"].tolist() for b in dl]
    e2 = [b["labels"].tolist() for b in dl]
    dl2 = make_loader(enc, 8, shuffle=True, seed=5)
    assert [b["labels"].tolist() for b in dl2] == e1 and [b["labels"].tolist() for b in dl2] == e2
    plain = [b["labels"].tolist() for b in make_loader(enc, 8)]
    assert sum(plain, []) == [i % 3 for i in range(40)]

    batch = next(iter(make_loader(enc, 40, tokenizer=tok)))
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())
    short = int(lengths.argmin())
    assert (batch["input_ids"][short, int(lengths[short]) :] == tok.pad_token_id).all()
    with torch.no_grad():
        assert model(**batch).logits.shape == (40, 3)


def test_collate_uses_the_pad_id():
    batch = make_collate(pad_token_id=7)(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
            {"input_ids": [4], "attention_mask": [1], "labels": 0},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]


@pytest.mark.slow
def test_smollm2_alias_converts_and_caches(tmp_path):
    model, tok = load_model("smollm2", 2, cache_dir=tmp_path)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    v = model.model.layers[0].self_attn.v_proj
    assert (v.in_features, v.out_features) == (576, 192)  # grouped-query attention: non-square
    assert default_target_modules(model) == ["q_proj", "v_proj"]
    assert head_module_names(model) == ["score"]
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    cached = tmp_path / "smollm2-135m-instruct-fp32"
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()
    assert (cached / "tokenizer.json").is_file()
    # Right padding with the pad id leaves the prediction of the short example unchanged.
    texts = datasets.Dataset.from_dict({"text": ["a short one", "a much longer example sentence"], "label": [0, 1]})
    enc = encode(texts, tok, 16)
    batch = next(iter(make_loader(enc, 2, tokenizer=tok)))
    with torch.no_grad():
        padded = model(**batch).logits[0]
        alone = model(input_ids=torch.tensor([enc[0]["input_ids"]])).logits[0]
    torch.testing.assert_close(padded, alone, atol=1e-4, rtol=1e-4)
    # Second load comes from the fp32 cache.
    model2, _ = load_model("smollm2", 3, cache_dir=tmp_path)
    assert model2.score.out_features == 3

"""Shared test helpers: tiny random transformers, the tiny run configuration and float64 linear algebra.

conftest.py exposes the model factories and the tiny overrides as fixtures; the linear-algebra
helpers are imported directly where test inputs are built at collection time (parametrize lists).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    GPT2LMHeadModel,
)

F64 = torch.float64

# ------------------------------------------------------------------------ tiny models (BERT: nn.Linear; GPT-2: Conv1D)

BERT_CONFIG = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
    max_position_embeddings=32, num_labels=3,
)  # fmt: skip
GPT2_CONFIG = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)


def tiny_bert(seed: int = 0, num_labels: int = 3, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised 2-layer BERT classifier (hidden 32), in eval mode."""
    torch.manual_seed(seed)
    config = BertConfig(**{**BERT_CONFIG, "num_labels": num_labels})
    return AutoModelForSequenceClassification.from_config(config).to(dtype).eval()


def tiny_bert_qa(seed: int = 0) -> torch.nn.Module:
    """The tiny BERT with an extractive-QA span head (``qa_outputs``: start and end logit per token), in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForQuestionAnswering.from_config(BertConfig(**{**BERT_CONFIG, "num_labels": 2})).eval()


def tiny_qa_checkpoint(folder, seed: int = 0) -> str:
    """A tiny random BERT encoder (no head) saved with MiniLM's tokenizer, as a local ``model.name`` folder.

    Loaded with ``AutoModelForQuestionAnswering`` it gets a fresh ``qa_outputs`` span head, as MiniLM
    does; tokenization is MiniLM's (WordPiece, 30,522 tokens), so it runs the real QA pipeline in seconds.
    """
    from transformers import AutoTokenizer, BertModel

    from florg.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 2-layer GPT-2 LM (hidden 32), in eval mode."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2_CONFIG)).eval()


# ------------------------------------------------------------------------ a tiny causal LM (Llama) and its tokenizer

LLAMA_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
#: ChatML, as SmolLM2's template but without its default system prompt
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_CORPUS = [
    "What does the word mean? a domestic animal kept for companionship",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction: ### Input: ### Response: user assistant system",
    "the cat sat on the mat; a small carnivorous mammal; a plant with green leaves; food made from flour",
]


def tiny_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer (any text encodes; 400 tokens, trained in-process) with ChatML specials;
    ``<|im_end|>`` is EOS and pad, as in SmolLM2. ``chat_template=False`` leaves it without a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 2-layer Llama causal LM (hidden 32, 4 heads, 2 KV heads), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=2, **LLAMA_CONFIG)
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(folder, chat_template: bool = True, seed: int = 0) -> str:
    """A tiny causal-LM checkpoint folder (model + tokenizer) usable as ``model.name``; returns its path."""
    tok = tiny_tokenizer(chat_template)
    model = tiny_llama(len(tok), seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def save_tiny_encoder(folder, seed: int = 0) -> str:
    """A tiny random BERT encoder saved *with* its pooler (as MiniLM's checkpoint is), with MiniLM's tokenizer.

    Only the classifier is new when it loads as a sequence classifier, so plain PEFT loading can
    reproduce a run (a checkpoint without the pooler would get a random one at every load)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from florg.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def perturb_adapter(model: torch.nn.Module, std: float, seed: int, head_std: float | None = None) -> torch.nn.Module:
    """Pretend training happened: add ``std * N(0, 1)`` to every FLoRG ``A`` and ``head_std`` (default: ``std``)
    times the same to every saved module (the head); seeded. Returns the model."""
    from florg.adapters import florg_layers

    gen = torch.Generator().manual_seed(seed)
    head_std = std if head_std is None else head_std
    with torch.no_grad():
        for layer in florg_layers(model).values():
            a = layer.florg_A["default"]
            a.add_(std * torch.randn(a.shape, generator=gen, dtype=a.dtype))
        for name, p in model.named_parameters():
            if "modules_to_save.default" in name:
                p.add_(head_std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


# ------------------------------------------------------------------------ tiny run configuration

# 3 clients, 2 rounds of 2 local steps on small splits: an end-to-end run in well under a minute.
# Tests append their own deviations after these (later overrides win).
TINY_OVERRIDES = (
    "data.num_clients=3",
    "train.rounds=2",
    "train.local_steps=2",
    "train.batch_size=8",
    "data.max_train_examples=240",
    "data.max_test_examples=80",
    "model.max_length=24",
    "federation.min_train_nodes=2",
    "federation.min_available_nodes=2",
)

# Multi-process deployments (a SuperLink and SuperNodes as separate processes).
RUN_TIMEOUT = 240.0  # upper bound for `flwr run` (about 45-60 s on an idle 2-core machine; slower under load)
READY_TIMEOUT = 60.0  # seconds for the SuperLink / each SuperNode to come up

# ------------------------------------------------------------------------ float64 linear algebra


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Seeded standard normal tensor, drawn in float64 (then cast to ``dtype``)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def orthonormal_rows(n: int, k: int, seed: int) -> torch.Tensor:
    """An ``n x k`` matrix with orthonormal rows."""
    q, _ = torch.linalg.qr(randn(k, n, seed=seed))
    return q.T.contiguous()


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """Haar-distributed ``n x n`` orthogonal matrix (both determinant signs occur)."""
    q, r = torch.linalg.qr(randn(n, n, seed=seed))
    return q * torch.sign(torch.diagonal(r))


def random_orthogonals(n: int, count: int, seed: int) -> torch.Tensor:
    """``count`` Haar-distributed ``n x n`` orthogonal matrices."""
    q, r = torch.linalg.qr(randn(count, n, n, seed=seed))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


def random_semi_orthogonals(rows: int, cols: int, count: int, seed: int) -> torch.Tensor:
    """``count`` matrices ``rows x cols`` (``rows <= cols``) with orthonormal rows."""
    q, _ = torch.linalg.qr(randn(count, cols, rows, seed=seed))
    return q.transpose(1, 2)


def fro(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x))


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of ``x`` against ``ref``, in float64."""
    return fro(x.to(F64) - ref.to(F64)) / fro(ref.to(F64))


def gram_of(a: torch.Tensor) -> torch.Tensor:
    a = a.to(F64)
    return a.T @ a


def probs(n: int, weights: list[float] | None) -> list[float]:
    """``weights`` normalised to sum to one (uniform when ``None``)."""
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    return [x / sum(w) for x in w]


def dense_q(factors: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """The dense reference ``Q = sum_n p_n A_n^T A_n`` in float64."""
    p = probs(len(factors), weights)
    q = torch.zeros(factors[0].shape[1], factors[0].shape[1], dtype=F64)
    for a, pn in zip(factors, p):
        q += pn * gram_of(a)
    return q


def top_r_truncation(q: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-``r`` approximation of the symmetric PSD matrix ``q``."""
    lam, v = torch.linalg.eigh(q)
    lam, v = lam.flip(0)[:r], v.flip(1)[:, :r]
    return (v * lam) @ v.T

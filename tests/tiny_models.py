"""Tiny randomly initialised transformers shared by the adapter tests (BERT: nn.Linear; GPT-2: Conv1D)."""

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config, GPT2LMHeadModel

BERT_CONFIG = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
    max_position_embeddings=32, num_labels=3,
)  # fmt: skip
GPT2_CONFIG = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(BertConfig(**BERT_CONFIG)).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**GPT2_CONFIG)).eval()

"""The causal LM with a FLoRG adapter (PEFT's ``get_peft_model``; ``import florg`` registers the type),
the learning step and the evaluation."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from florg import FLoRGConfig
from florg.models import resolve_model
from florg.tasks.instruction import evaluate_lm, make_lm_collate


@lru_cache(maxsize=2)
def get_tokenizer(name: str) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def get_model(cfg: dict) -> torch.nn.Module:
    """``model.name`` wrapped in a FLoRG adapter of rank ``model.florg.rank`` on ``model.florg.target-modules``."""
    m = cfg["model"]
    model = AutoModelForCausalLM.from_pretrained(resolve_model(str(m["name"])), dtype=torch.float32)
    config = FLoRGConfig(
        r=int(m["florg"]["rank"]), lora_alpha=float(m["florg"]["alpha"]),
        target_modules=[t.strip() for t in str(m["florg"]["target-modules"]).split(",") if t.strip()],
        task_type="CAUSAL_LM", seed=int(cfg["train"]["seed"]),
    )
    return get_peft_model(model, config)


def _loader(ds: Any, tokenizer: Any, batch_size: int, seed: int | None) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=seed is not None, generator=generator,
                                       collate_fn=make_lm_collate(tokenizer.pad_token_id))


def train(model: torch.nn.Module, ds: Any, tokenizer: Any, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """``steps`` AdamW steps on the response tokens (cycling over the local data); the mean loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < steps:
        for batch in _loader(ds, tokenizer, batch_size, seed + epoch):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
        epoch += 1
    return sum(losses) / len(losses)


def evaluate(model: torch.nn.Module, ds: Any, tokenizer: Any, batch_size: int = 16) -> dict:
    """Mean response-token loss and perplexity."""
    return evaluate_lm(model, _loader(ds, tokenizer, batch_size, None))

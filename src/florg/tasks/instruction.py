"""Instruction tuning: a causal LM learns to answer prompts (loss on the response tokens only).

Tasks (``data.task``): ``wordnet-define`` (embedded: "What does the word 'X' mean?" -> the WordNet
gloss), ``instruct:<path>`` (your Alpaca or chat JSONL), ``instruct:hub:<id>`` (a Hub dataset);
see :mod:`florg.data.instruct`. Model: ``AutoModelForCausalLM`` of a decoder-only checkpoint
(``smollm2`` offline); no head is trained besides the adapter. Partitioning label: the row's
category (the lexicographer file for ``wordnet-define``).

Prompt format
-------------
When the tokenizer has a chat template, the prompt is the template applied to the prompt turns
with the generation prompt (``add_generation_prompt=True``), and the response is what the template
appends for the assistant's answer (for SmolLM2: the answer, then ``<|im_end|>``), trailing
whitespace removed. Without a chat template, Alpaca's prompt format is used::

    Below is an instruction that describes a task[, paired with an input that provides further
    context]. Write a response that appropriately completes the request.

    ### Instruction:
    {instruction}

    [### Input:
    {input}

    ]### Response:
    {output}<eos>

(a system turn replaces the first paragraph; earlier chat turns come first as
``### Instruction:`` / ``### Response:`` pairs). Prompt and response are tokenised separately, so
the boundary between them is exact.

Loss targets and truncation
---------------------------
``labels`` are the input ids with every prompt token (and padding) set to -100, so the loss is the
mean cross-entropy over response tokens. Sequences are cut to ``model.max_length``: the prompt is
kept whole and the response truncated. When the prompt alone leaves no room for a response token
(prompt >= ``max_length`` tokens), the prompt is cut from the left (its start is lost, the end with
the generation prompt stays) to leave ``min(response length, max_length // 2)`` response tokens.

Metrics
-------
Each round: ``loss`` (mean token cross-entropy over all response tokens of the split; primary,
lower is better) and ``perplexity`` = exp(loss). After the last round (:meth:`finish`): greedy
generations for ``eval.generate_examples`` held-out prompts (drawn once with the run seed), before
(the initial global model, the one round 0 evaluates) and after training, written to
``generations.jsonl``, and their ROUGE-L F-measure against the references (``rouge-score``, no
stemming, mean over the prompts) as ``rouge_l_before``/``rouge_l_after`` in ``summary.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from florg.config import ConfigError
from florg.core.seeds import derive_seed
from florg.data.instruct import instruct_task_forms, is_instruct_task, load_instruct_task
from florg.data.loaders import make_loader
from florg.models import load_pretrained, resolve_model

from .base import TaskFamily

__all__ = [
    "ALPACA_PREAMBLE",
    "ALPACA_PREAMBLE_INPUT",
    "InstructionFamily",
    "encode_instructions",
    "evaluate_lm",
    "greedy_generate",
    "greedy_tokens",
    "make_lm_collate",
    "render_prompt",
    "rouge_l",
]

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.")
GENERATIONS_FILE = "generations.jsonl"

#: encoder-only model types: transformers can attach a causal-LM head to some of them (e.g.
#: BertLMHeadModel), but they were not pretrained to generate text
_ENCODER_TYPES = frozenset({
    "albert", "bert", "big_bird", "camembert", "convbert", "data2vec-text", "deberta", "deberta-v2", "distilbert",
    "electra", "ernie", "esm", "funnel", "layoutlm", "longformer", "megatron-bert", "mobilebert", "modernbert",
    "mpnet", "nezha", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "squeezebert", "xlm-roberta",
    "xlm-roberta-xl", "xmod", "bert-generation",
})


class InstructionFamily(TaskFamily):
    name = "instruction"
    peft_task_type = "CAUSAL_LM"
    metrics = ("loss", "perplexity")
    higher_is_better = False
    cache_encoded = True  # encode returns datasets; load_data and encode keep no state on the family

    @classmethod
    def accepts(cls, task: str) -> bool:
        return is_instruct_task(task)

    @classmethod
    def task_forms(cls) -> list[str]:
        return instruct_task_forms()

    # ---- examples ------------------------------------------------------------------------------
    def load_data(self):  # noqa: ANN201
        self.check_model()  # an encoder is refused before any data is read
        d = self.cfg.data
        return load_instruct_task(
            d.task,
            data_dir=d.data_dir or None,
            seed=self.cfg.seed,
            test_fraction=d.test_fraction,
            max_train_examples=d.max_train_examples or None,
            max_test_examples=d.max_test_examples or None,
            classes=list(d.classes) or None,
        )

    def encode(self, ds: Any, tokenizer: Any, *, train: bool) -> Any:
        return encode_instructions(ds, tokenizer, self.cfg.model.max_length, keep_text=not train)

    def collate(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
        return make_lm_collate(int(tokenizer.pad_token_id))

    # ---- model ---------------------------------------------------------------------------------
    def load_model(self, data, dtype: torch.dtype) -> tuple[Any, Any]:  # noqa: ANN001
        self.check_model()
        return load_pretrained(self.cfg.model.name, AutoModelForCausalLM, dtype=dtype)

    def check_model(self) -> None:
        """Refuse a model that cannot generate text (an encoder such as BERT/MiniLM), before loading weights."""
        name = self.cfg.model.name
        source = resolve_model(name)
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError, KeyError):
            return  # load_pretrained reports an unloadable model in its own words
        model_type = getattr(config, "model_type", "") or ""
        fits = (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in _ENCODER_TYPES
                and not getattr(config, "is_encoder_decoder", False))
        if not fits:
            kind = "an encoder" if model_type in _ENCODER_TYPES else "not a decoder-only language model"
            raise ConfigError(
                f"config keys 'data.task' and 'model.name' do not fit together: data.task={self.cfg.data.task!r} is "
                f"instruction tuning (a causal LM that generates the answer), but model.name={name!r} is a "
                f"{model_type or 'model of unknown type'} ({kind}); use a decoder-only causal LM: 'smollm2' (offline) "
                "or a Llama/Qwen2/Mistral/GPT-2-style checkpoint folder or Hub id, or a classification task "
                "(e.g. data.task='wordnet') for this model"
            )

    # ---- metrics -------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, data: Any, *, batch_size: int, tokenizer: Any,
                 device: torch.device | None = None) -> dict[str, Any]:
        loader = make_loader(data, batch_size, shuffle=False, seed=0, collate_fn=self.collate(tokenizer))
        return evaluate_lm(model, loader, device=device)

    def finish(self, model: torch.nn.Module, experiment: Any, run_path: Path) -> dict[str, Any]:
        """Greedy generations before/after training for a seeded held-out sample; ROUGE-L of both."""
        cfg = self.cfg
        n = min(int(cfg.eval.generate_examples), len(experiment.test))
        if n <= 0:
            return {}
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "generate"))
        idx = sorted(torch.randperm(len(experiment.test), generator=gen)[:n].tolist())
        sample = experiment.test.select(idx)
        prompts = [list(ids[:k]) for ids, k in zip(sample["input_ids"], sample["prompt_len"], strict=True)]
        kw = dict(max_new_tokens=int(cfg.eval.max_new_tokens), batch_size=int(cfg.eval.batch_size))
        after = greedy_generate(model, experiment.tokenizer, prompts, **kw)
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        try:  # "before": the initial global model (what round 0 evaluated)
            experiment.method.load_global(model, {k: v.clone() for k, v in experiment.initial_state.items()})
            before = greedy_generate(model, experiment.tokenizer, prompts, **kw)
        finally:
            model.load_state_dict(final)
        refs = list(sample["reference"])
        scores_before = [rouge_l(p, r) for p, r in zip(before, refs, strict=True)]
        scores_after = [rouge_l(p, r) for p, r in zip(after, refs, strict=True)]
        lines = [
            json.dumps({"index": i, "prompt": q, "reference": r, "before": b, "after": a,
                        "rouge_l_before": sb, "rouge_l_after": sa}, ensure_ascii=False)
            for i, q, r, b, a, sb, sa in zip(idx, sample["question"], refs, before, after, scores_before, scores_after,
                                             strict=True)
        ]
        (Path(run_path) / GENERATIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return {"rouge_l_before": sum(scores_before) / n, "rouge_l_after": sum(scores_after) / n,
                "generate_examples": n, "generations": GENERATIONS_FILE}


# ---------------------------------------------------------------------------------------------
# Prompts and encoding


def _turns(messages_json: str, input_text: str) -> list[dict[str, str]]:
    turns = json.loads(messages_json)
    if input_text:
        last = max(i for i, t in enumerate(turns) if t["role"] == "user")
        turns[last] = {"role": "user", "content": f"{turns[last]['content']}\n\n{input_text}"}
    return turns


def _alpaca_prompt(turns: list[dict[str, str]], input_text: str) -> str:
    system = [t["content"] for t in turns if t["role"] == "system"]
    dialog = [t for t in turns if t["role"] != "system"]
    parts = [system[0] if system else (ALPACA_PREAMBLE_INPUT if input_text else ALPACA_PREAMBLE), ""]
    for t in dialog[:-1]:  # earlier turns: instruction / response pairs
        head = "### Instruction:" if t["role"] == "user" else "### Response:"
        parts += [head, t["content"], ""]
    parts += ["### Instruction:", dialog[-1]["content"], ""]
    if input_text:
        parts += ["### Input:", input_text, ""]
    parts.append("### Response:\n")
    return "\n".join(parts)


def render_prompt(tokenizer: Any, messages_json: str, input_text: str, output: str) -> tuple[str, str, bool]:
    """``(prompt, response_text, templated)`` of one example (see the module docstring).

    With a chat template, ``response_text`` is what the template adds for the answer (including its
    end-of-turn marker); without one it is the answer alone (the EOS token is added as an id).
    """
    if getattr(tokenizer, "chat_template", None):
        turns = _turns(messages_json, input_text)
        prompt, full = _apply_template(tokenizer, turns, output)
        if full.startswith(prompt):
            return prompt, full[len(prompt):].rstrip(), True
        return prompt, output, True
    turns = json.loads(messages_json)
    return _alpaca_prompt(turns, input_text), output, False


def _apply_template(tokenizer: Any, turns: list[dict[str, str]], output: str) -> tuple[str, str]:
    """``(prompt, prompt + answer)`` rendered by the chat template.

    Some templates refuse a system turn (they raise); then the system text is put in front of the
    first user turn. Any other refusal is a ``ValueError`` naming the model.
    """
    def render(ts: list[dict[str, str]]) -> tuple[str, str]:
        prompt = tokenizer.apply_chat_template(ts, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*ts, {"role": "assistant", "content": output}], tokenize=False)
        return prompt, full

    try:
        return render(turns)
    except Exception as exc:  # noqa: BLE001 - jinja2 raises TemplateError (and others) from the template
        first = exc
    if turns and turns[0]["role"] == "system" and len(turns) > 1:
        merged = [{"role": turns[1]["role"], "content": f"{turns[0]['content']}\n\n{turns[1]['content']}"}, *turns[2:]]
        try:
            return render(merged)
        except Exception:  # noqa: BLE001
            pass
    name = getattr(tokenizer, "name_or_path", "") or "the model"
    raise ValueError(f"the chat template of {name} (model.name) cannot format the prompt turns "
                     f"({type(first).__name__}: {str(first).strip()[:200]}); use a model whose template accepts "
                     "system/user/assistant turns, or data without system turns")


def _question(messages_json: str, input_text: str) -> str:
    turns = json.loads(messages_json)
    user = [t["content"] for t in turns if t["role"] == "user"][-1]
    return f"{user}\n\n{input_text}" if input_text else user


def truncate(prompt_ids: list[int], response_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the prompt and cut the response to ``max_length``; a prompt that leaves no room is cut from the left."""
    if len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids, response_ids
    if len(prompt_ids) < max_length:
        return prompt_ids, response_ids[: max_length - len(prompt_ids)]
    keep = min(len(response_ids), max_length // 2)
    return prompt_ids[len(prompt_ids) - (max_length - keep):], response_ids[:keep]


def encode_instructions(ds: Any, tokenizer: Any, max_length: int, *, keep_text: bool = False,
                        batch_size: int = 1000) -> Any:
    """Tokenise raw instruction rows: ``input_ids``, ``attention_mask``, ``labels`` (-100 on the prompt), ``prompt_len``.

    ``keep_text`` also keeps ``question`` (the last user turn and input) and ``reference`` (the
    answer) for generation.
    """
    # lazy: datasets: florg.run.experiment imports florg.tasks and must not load it (test_gpu_check.py)
    import datasets

    if int(max_length) < 4:
        raise ValueError(f"model.max_length must be >= 4, got {max_length}")
    eos = tokenizer.eos_token_id

    def tok(batch: dict[str, list]) -> dict[str, list]:
        rendered = [render_prompt(tokenizer, m, i, o) for m, i, o in
                    zip(batch["messages"], batch["input"], batch["output"], strict=True)]
        templated = rendered[0][2] if rendered else True
        prompts = tokenizer([r[0] for r in rendered], add_special_tokens=not templated)["input_ids"]
        responses = tokenizer([r[1] for r in rendered], add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_len": []}
        for p, r, rend in zip(prompts, responses, rendered, strict=True):
            r = list(r)
            if not rend[2] and eos is not None:
                r.append(int(eos))
            p, r = truncate(list(p), r, int(max_length))
            out["input_ids"].append(p + r)
            out["attention_mask"].append([1] * (len(p) + len(r)))
            out["labels"].append([-100] * len(p) + r)
            out["prompt_len"].append(len(p))
        if keep_text:
            out["question"] = [_question(m, i) for m, i in zip(batch["messages"], batch["input"], strict=True)]
            out["reference"] = list(batch["output"])
        return out

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return ds.map(tok, batched=True, batch_size=batch_size, remove_columns=ds.column_names, keep_in_memory=True)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def make_lm_collate(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right-pad ``input_ids`` (``pad_token_id``), ``attention_mask`` (0) and ``labels`` (-100) to the longest example."""

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(ex["input_ids"]) for ex in batch)
        out = {}
        for key, fill in (("input_ids", pad_token_id), ("attention_mask", 0), ("labels", -100)):
            rows = [list(ex[key]) + [fill] * (longest - len(ex[key])) for ex in batch]
            out[key] = torch.tensor(rows, dtype=torch.long)
        return out

    return collate


# ---------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, loader: Any, device: torch.device | None = None) -> dict[str, Any]:
    """Mean token cross-entropy over the response tokens (``labels != -100``) of ``loader``, and its exp."""
    model.eval()
    total, tokens, examples = 0.0, 0, 0
    for batch in loader:
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        shift_logits = logits[:, :-1].float()
        shift_labels = labels[:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=-100, reduction="sum"))
        tokens += int((shift_labels != -100).sum())
        examples += int(labels.shape[0])
    if tokens == 0:
        raise ValueError("the evaluation set has no response tokens")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": float(examples),
            "tokens": float(tokens)}


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, pad_token_id: int,
                  eos_token_id: int | None, max_new_tokens: int = 32, batch_size: int = 16) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids): the new token ids of each, up to and including EOS.

    Prompts are left-padded in batches (the attention mask hides the padding); generation stops at
    ``eos_token_id`` or after ``max_new_tokens`` tokens.
    """
    model.eval()
    pad = int(pad_token_id)
    gen_cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1,
                               pad_token_id=pad, eos_token_id=eos_token_id)
    device = next(model.parameters()).device
    step = max(1, int(batch_size))
    out: list[list[int]] = []
    for start in range(0, len(prompts), step):
        chunk = [list(p) for p in prompts[start:start + step]]
        longest = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in chunk], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long, device=device)
        seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        for row in seqs[:, longest:].tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]  # what follows EOS in a batch is padding
            out.append(row)
    return out


def greedy_generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """:func:`greedy_tokens` decoded without special tokens (whitespace stripped)."""
    rows = greedy_tokens(model, prompts, pad_token_id=int(tokenizer.pad_token_id), eos_token_id=tokenizer.eos_token_id,
                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` (``rouge-score``, no stemming)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


_SCORER: Any = None


def _scorer() -> Any:
    global _SCORER
    if _SCORER is None:
        # lazy: rouge_score imports pandas: florg.run.experiment imports florg.tasks and must not load it (test_gpu_check.py)
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER

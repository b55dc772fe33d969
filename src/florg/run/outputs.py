"""Make a run's saved adapters explain themselves.

After the last round each adapter folder of the run directory (``adapter/``, and ``adapter_lora/``
where the method exports one) gets:

* ``adapter_config.json`` with PEFT's ``task_type`` of the task family (``SEQ_CLS``,
  ``QUESTION_ANS``, ``CAUSAL_LM``), so ``AutoPeftModelFor...`` picks the right class, and a
  portable ``base_model_name_or_path`` (an alias's Hub id, e.g.
  ``sentence-transformers/all-MiniLM-L6-v2``; a local path or Hub id exactly as given in
  ``model.name``). The task type is set on the saved config only: training builds its adapter
  without one, because PEFT's task-specific wrappers also train the head when given one.
* the tokenizer of the run (so a loader needs only the base weights);
* ``labels.json`` (classification): ``id2label`` and ``label2id`` of the head;
* ``README.md``: a model card with the task, the labels, the metrics before and after training
  from ``summary.json``, and how to load the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from florg import __version__

if TYPE_CHECKING:
    from florg.run.experiment import Experiment

__all__ = ["ADAPTER_DIRS", "LABELS_FILE", "describe_adapters", "model_card"]

#: the adapter folders of a run directory, in the order they are described
ADAPTER_DIRS = ("adapter", "adapter_lora")
LABELS_FILE = "labels.json"

_AUTO_CLASS = {
    "SEQ_CLS": ("AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification"),
    "QUESTION_ANS": ("AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering"),
    "CAUSAL_LM": ("AutoPeftModelForCausalLM", "AutoModelForCausalLM"),
}


def describe_adapters(exp: Experiment, run_path: Path, summary: dict[str, Any]) -> list[Path]:
    """Complete every adapter folder under ``run_path`` (see the module docstring); the folders done."""
    # lazy: florg.models imports torch; florg.run.predict imports this module before torch
    from florg.models import portable_model_id

    cfg, family = exp.cfg, exp.family
    base_id = portable_model_id(cfg.model.name)
    labels = list(exp.label_names) if family.name == "classification" else None
    done = []
    for name in ADAPTER_DIRS:
        folder = Path(run_path) / name
        config_file = folder / "adapter_config.json"
        if not config_file.is_file():
            continue
        config = json.loads(config_file.read_text())
        config["task_type"] = family.peft_task_type
        config["base_model_name_or_path"] = base_id
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        exp.tokenizer.save_pretrained(str(folder))
        if labels is not None:
            (folder / LABELS_FILE).write_text(json.dumps(
                {"id2label": {str(i): n for i, n in enumerate(labels)}, "label2id": {n: i for i, n in enumerate(labels)}},
                indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        plain = config.get("peft_type") != "FLORG"
        card = model_card(exp, summary, base_id=base_id, folder=name, plain_lora=plain, labels=labels,
                          base_delta=(Path(run_path) / "base_delta.safetensors").is_file())
        (folder / "README.md").write_text(card, encoding="utf-8")
        done.append(folder)
    return done


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(exp: Experiment, summary: dict[str, Any], *, base_id: str, folder: str, plain_lora: bool,
               labels: list[str] | None, base_delta: bool = False) -> str:
    """The ``README.md`` of one adapter folder (Hugging Face model-card layout: YAML header, then Markdown)."""
    cfg, family = exp.cfg, exp.family
    task_type = family.peft_task_type
    peft_auto, hf_auto = _AUTO_CLASS[task_type]
    kind = "a plain PEFT LoRA adapter (the exact export of the FLoRG adapter)" if plain_lora and cfg.method.name == \
        "florg" else ("a PEFT LoRA adapter" if plain_lora else "a FLoRG adapter in PEFT format")
    tags = list(dict.fromkeys(["florg", "federated-learning", cfg.method.name, "lora" if plain_lora else "florg-adapter"]))
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {base_id}",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {cfg.method.name} adapter for `{cfg.data.task}`",
        "",
        f"This folder holds {kind}, trained with florg {__version__} by federated fine-tuning "
        f"(method `{cfg.method.name}`, rank {cfg.method.rank}, {cfg.data.num_clients} clients, "
        f"{cfg.train.rounds} rounds, `{cfg.data.partition}` partition, seed {cfg.seed}). "
        "The run's full config is `../config.toml`; its per-round metrics are `../metrics.jsonl`.",
        "",
        "## Task",
        "",
        f"- task family: {family.name} (PEFT `task_type` `{task_type}`)",
        f"- data: `data.task = {cfg.data.task!r}`",
        f"- base model: `{base_id}`" + (f" (florg alias `{cfg.model.name}`)" if base_id != cfg.model.name else ""),
        f"- adapted modules: {', '.join(f'`{m}`' for m in exp.target_modules)}",
    ]
    if cfg.model.name.strip().lower() in ("smollm2", "smollm2-135m"):
        lines.append("- the base weights were the Q4_1 GGUF copy of SmolLM2-135M-Instruct dequantized to float32 "
                     "(florg's offline `smollm2`), not the Hub's original weights")
    if labels is not None:
        lines += ["", "## Labels", "", "| id | label |", "|---:|---|"]
        lines += [f"| {i} | {name} |" for i, name in enumerate(labels)]
        lines += ["", f"`{LABELS_FILE}` holds `id2label` and `label2id`."]
        if not cfg.method.train_head:
            lines += ["", "The classification head was not trained (`method.train_head = false`): it is the seeded "
                      "random initialisation of the run and is not in this adapter. `florg.load_run_model` "
                      "rebuilds it from the run's seed; plain PEFT loading gets a different head."]
    metric = summary.get("metric", family.primary_metric)
    rows = [(metric, summary.get(f"{metric}_before"), summary.get(f"{metric}_after"))]
    for key, value in summary.items():
        if key.endswith("_before") and not key.startswith(f"{metric}_"):
            name = key[: -len("_before")]
            rows.append((name, value, summary.get(f"{name}_after")))
    lines += ["", "## Metrics (held-out test split)", "", "| metric | before training | after training |",
              "|---|---:|---:|"]
    lines += [f"| {name} | {_fmt(before)} | {_fmt(after)} |" for name, before, after in rows]
    if "bytes_total" in summary:
        lines += ["", f"Communication: {summary['bytes_total']:,} bytes in total "
                  f"({summary.get('bytes_up_total', 0):,} up, {summary.get('bytes_down_total', 0):,} down)."]
    lines += ["", "## How to load it", "", "With florg (resolves the base model offline, rebuilds everything exactly "
              "as the run did):", "", "```python", "import florg", "",
              'print(florg.predict("path/to/run", ["some text"]))   # or: florg predict path/to/run "some text"',
              'model, tokenizer = florg.load_run_model("path/to/run")', "```", "",
              "With PEFT" + (" alone (florg is not needed for this folder), from the run directory:" if plain_lora
                             else ", from the run directory; **`import florg` must come first**: it registers the "
                             "FLoRG adapter type with PEFT:"),
              "", "```python"]
    if not plain_lora:
        lines.append("import florg  # registers the FLORG PEFT type")
    lines.append(f"from peft import {peft_auto}")
    extra = ""
    if labels is not None:
        lines += ["import json", "", f'labels = json.load(open("{folder}/{LABELS_FILE}"))']
        extra = (', num_labels=len(labels["id2label"]),\n    id2label={int(i): n for i, n in labels["id2label"].items()}, '
                 'label2id=labels["label2id"]')
    else:
        lines.append("")
    lines += [f'model = {peft_auto}.from_pretrained("{folder}"{extra})', "```", "",
              f"`{peft_auto}` loads the base model `{base_id}` with `transformers.{hf_auto}`. "
              "Offline, florg maps the Hub ids of its aliases (`sentence-transformers/all-MiniLM-L6-v2`, "
              "`HuggingFaceTB/SmolLM2-135M-Instruct`) to its packaged copies: load the base with "
              f"`{hf_auto}.from_pretrained(florg.models.resolve_model(\"{base_id}\")"
              + (f", num_labels={len(labels)}" if labels is not None else "") + ")` and then "
              f'`peft.PeftModel.from_pretrained(base, "{folder}")`.']
    if task_type == "QUESTION_ANS":
        lines += ["", "Note: PEFT 0.21's `PeftModelForQuestionAnswering.forward` does not pass `token_type_ids` on to "
                  "the model, which changes a BERT-style model's outputs; call the wrapped model instead: "
                  "`model.get_base_model()(**inputs)`."]
    if base_delta:
        lines += ["", "This method also changed the frozen base weights: add `../base_delta.safetensors` "
                  "(`<layer>.weight` deltas) to the base model before applying the adapter "
                  "(`florg.load_run_model` does this)."]
    return "\n".join(lines) + "\n"

"""The ServerApp: FLoRG with a cosine learning-rate schedule, the global adapter evaluated on the test
instructions every round, and the final adapter saved with ``save_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.config import unflatten_dict
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from florg.fl import FLoRG
from flowertune_florg.dataset import load_data, tokenized
from flowertune_florg.models import evaluate, get_model, get_tokenizer

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = unflatten_dict(context.run_config)
    d, t = cfg["dataset"], cfg["train"]
    rounds = int(cfg["num-server-rounds"])
    data = load_data(str(d["name"]), int(d["max-train-examples"]), int(d["max-test-examples"]), int(t["seed"]))
    tokenizer = get_tokenizer(str(cfg["model"]["name"]))
    test = tokenized(data.test, tokenizer, int(cfg["model"]["max-length"]))
    model = get_model(cfg)
    history: list[dict[str, float]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())
        res = evaluate(model, test, tokenizer)
        history.append({"round": server_round, "loss": res["loss"], "perplexity": res["perplexity"]})
        return MetricRecord({"loss": res["loss"], "perplexity": res["perplexity"]})

    florg_cfg = cfg["model"]["florg"]
    strategy = FLoRG(
        rank=int(florg_cfg["rank"]), alpha=float(florg_cfg["alpha"]),
        fraction_train=float(cfg["strategy"]["fraction-train"]), min_train_nodes=1, min_available_nodes=1,
        lr=float(t["learning-rate-max"]), lr_min=float(t["learning-rate-min"]), lr_schedule="cosine",
        num_rounds=rounds,
    )
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(get_peft_model_state_dict(model)),
                            num_rounds=rounds, evaluate_fn=evaluate_fn)

    if save := str(t["save-path"]):
        set_peft_model_state_dict(model, result.arrays.to_torch_state_dict())
        model.save_pretrained(save)  # load with: import florg; PeftModel.from_pretrained(base, save)
        get_tokenizer(str(cfg["model"]["name"])).save_pretrained(save)
        (Path(save) / "history.json").write_text(json.dumps(history, indent=1))

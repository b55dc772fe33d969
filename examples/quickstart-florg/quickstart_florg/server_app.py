"""The ServerApp: FLoRG instead of FedAvg, central evaluation of the global adapter, the final adapter saved."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from florg.fl import FLoRG
from quickstart_florg.task import evaluate, get_model, load_data, load_tokenizer

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rounds = int(rc["num-server-rounds"])
    data = load_data(int(rc["max-train-examples"]), int(rc["max-test-examples"]), int(rc["seed"]))
    model = get_model(str(rc["model"]), tuple(data.label_names), int(rc["rank"]), float(rc["alpha"]), int(rc["seed"]))
    tokenizer = load_tokenizer(str(rc["model"]))

    history: list[dict[str, float]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())
        loss, accuracy = evaluate(model, data.test, tokenizer, batch_size=64, max_length=int(rc["max-length"]))
        history.append({"round": server_round, "loss": loss, "accuracy": accuracy})
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    # FLoRG aggregates every florg_A by Gram aggregation + Procrustes alignment, the head by FedAvg
    strategy = FLoRG(rank=int(rc["rank"]), alpha=float(rc["alpha"]), fraction_train=float(rc["fraction-train"]),
                     lr=float(rc["lr"]), head_lr=float(rc["head-lr"]), num_rounds=rounds, min_train_nodes=1,
                     min_available_nodes=1)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(get_peft_model_state_dict(model)),
        num_rounds=rounds,
        train_config=ConfigRecord({}),
        evaluate_fn=evaluate_fn,
    )

    if out := str(rc["out-dir"]):
        set_peft_model_state_dict(model, result.arrays.to_torch_state_dict())
        model.save_pretrained(out)  # load with: import florg; PeftModel.from_pretrained(base, out)
        (Path(out) / "history.json").write_text(json.dumps(history, indent=1))
        (Path(out) / "labels.json").write_text(json.dumps({"labels": list(data.label_names)}, indent=1))

"""The ClientApp: load the global FLoRG adapter, train on the local instructions, send the adapter back."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.config import unflatten_dict
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from flowertune_florg.dataset import load_data, load_partition, tokenized
from flowertune_florg.models import get_model, get_tokenizer, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    cfg = unflatten_dict(context.run_config)
    d, t = cfg["dataset"], cfg["train"]
    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data = load_data(str(d["name"]), int(d["max-train-examples"]), int(d["max-test-examples"]), int(t["seed"]))
    tokenizer = get_tokenizer(str(cfg["model"]["name"]))
    shard = tokenized(load_partition(pid, parts, data, int(t["seed"])), tokenizer, int(cfg["model"]["max-length"]))

    model = get_model(cfg)
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    loss = train(model, shard, tokenizer, steps=int(t["local-steps"]), batch_size=int(t["batch-size"]),
                 lr=float(config["lr"]), seed=int(t["seed"]) + 1000 * int(config["server-round"]) + pid)

    content = RecordDict({
        "arrays": ArrayRecord(get_peft_model_state_dict(model)),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(shard)}),
    })
    return Message(content=content, reply_to=msg)

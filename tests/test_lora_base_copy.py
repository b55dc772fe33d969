"""The pretrained-W0 copy of methods that change the base weight is a non-persistent buffer of its layer."""

import warnings

import pytest
import torch

from florg.config import load_config
from florg.methods import get_method
from florg.methods.lora_common import lora_layers


def _build(tiny_bert, name):
    cfg = load_config(None, [f"method.name={name}", "method.rank=2", "method.alpha=4"])
    method = get_method(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = method.build(tiny_bert(), ["query", "value"], ["classifier"])
    return method, model


@pytest.mark.parametrize("name", ["fedex-lora", "federa", "flora"])
def test_w0_copy_is_a_buffer_that_follows_the_model_but_is_not_saved(name, tiny_bert):
    method, model = _build(tiny_bert, name)
    layers = lora_layers(model)
    assert layers
    buffers = [n for n, _ in model.named_buffers() if n.endswith(".florg_w0_pretrained")]
    assert len(buffers) == len(layers)
    for lname, layer in layers.items():
        assert "florg_w0_pretrained" in dict(layer.named_buffers(recurse=False)), lname
    assert not any("florg_w0_pretrained" in key for key in model.state_dict())
    deltas = {lname: method.base_delta(layer) for lname, layer in layers.items()}

    model.to(torch.float64)
    for lname, layer in layers.items():
        assert layer.florg_w0_pretrained.dtype == torch.float64, lname
        assert torch.allclose(method.base_delta(layer).float(), deltas[lname], atol=1e-6), lname
    model.to("meta")
    assert all(layer.florg_w0_pretrained.is_meta for layer in layers.values())


def test_methods_that_keep_w0_have_no_copy(tiny_bert):
    _, model = _build(tiny_bert, "fedit")
    assert not any("florg_w0_pretrained" in n for n, _ in model.named_buffers())

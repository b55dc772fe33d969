"""FLoRG tuner layer: forward/gradient against dense references, merge, compensation, bases, errors."""

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

import florg.adapters as fa
from florg.core.bases import init_factor, make_bases

# PEFT triggers a transformers deprecation warning that is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# ----------------------------------------------------------------------------- fixtures


class TwoLayer(nn.Module):
    """A minimal model with one adaptable layer ``proj`` (Linear or Conv1D) and a fixed ``head``."""

    def __init__(self, d_in: int, d_out: int, conv1d: bool = False, dtype=torch.float64):
        super().__init__()
        self.proj = Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.proj.weight.normal_(0, 0.3)
            self.proj.bias.normal_(0, 0.1)
        self.head = nn.Linear(d_out, 3)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.proj(x))


def adapted(d_in, d_out, conv1d=False, r=2, lora_alpha=6, seed=0, **kwargs):
    torch.manual_seed(123)
    model = TwoLayer(d_in, d_out, conv1d)
    w0 = model.proj.weight.detach().clone()
    config = fa.FLoRGConfig(r=r, lora_alpha=lora_alpha, target_modules=["proj"], seed=seed, fan_in_fan_out=conv1d,
                            **kwargs)  # fmt: skip
    peft_model = get_peft_model(model, config)
    layer = fa.florg_layers(peft_model)["proj"]
    with torch.no_grad():  # move A away from its tiny initial value so the update is not negligible
        layer.florg_A["default"].normal_(0, 0.5)
    return peft_model, layer, w0


def dense_delta(layer):
    """s * L A^T A R in float64, (d_out, d_in) layout."""
    left = layer.florg_L["default"].double()
    right = layer.florg_R["default"].double()
    a = layer.florg_A["default"].detach().double()
    return layer.scaling["default"] * left @ a.T @ a @ right


SHAPES = [(12, 12), (16, 8), (8, 16)]  # (d_in, d_out): square, d_out < d_in, d_out > d_in


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_forward_matches_dense_reference(d_in, d_out, conv1d):
    model, layer, w0 = adapted(d_in, d_out, conv1d)
    w0 = w0.T if conv1d else w0  # reference layout (d_out, d_in)
    assert layer.florg_L["default"].shape == (d_out, min(d_in, d_out))
    assert layer.florg_R["default"].shape == (min(d_in, d_out), d_in)
    x = torch.randn(5, 3, d_in, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
    ref = x @ (w0 + dense_delta(layer)).T + layer.get_base_layer().bias
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert (got - (x @ w0.T + layer.get_base_layer().bias)).abs().max() > 1e-3  # the adapter does something


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if name in {"mm", "addmm", "bmm", "baddbmm"}:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_forward_is_lora_shaped(conv1d):
    """No d x d (or k x k) product and no activation routed through k dimensions on the hot path."""
    d_in, d_out, r, n = 12, 20, 2, 3  # k = 12 = d_in; never an output width otherwise
    model, layer, _ = adapted(d_in, d_out, conv1d, r=r)
    x = torch.randn(n, d_in, dtype=torch.float64)
    with _MatmulShapes() as rec:
        layer(x)
    assert rec.shapes, "no matmul recorded"
    for shape in rec.shapes:
        assert min(shape) <= max(r, n), f"large matmul output {shape} on the forward path"
        assert shape != (n, min(d_in, d_out)), "activations were routed through the k-dimensional bases"


# ----------------------------------------------------------------------------- gradient


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("d_in,d_out", SHAPES)
def test_grad_matches_closed_form(d_in, d_out, conv1d):
    model, layer, w0 = adapted(d_in, d_out, conv1d)
    w0 = w0.T if conv1d else w0
    bias = layer.get_base_layer().bias.detach()
    x = torch.randn(7, d_in, dtype=torch.float64)
    c = torch.randn(7, d_out, dtype=torch.float64)

    a = layer.florg_A["default"]
    a.grad = None
    (layer(x) * c).sum().backward()
    got = a.grad.detach().clone()

    # G = dloss/dW of the dense reference model at W = W0 + dW
    w = (w0 + dense_delta(layer)).clone().requires_grad_(True)
    ((x @ w.T + bias) * c).sum().backward()
    g = w.grad
    left, right = layer.florg_L["default"].double(), layer.florg_R["default"].double()
    h = left.T @ g @ right.T
    expected = layer.scaling["default"] * a.detach() @ (h + h.T)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_only_a_is_trainable(tiny_bert):
    model = get_peft_model(tiny_bert(), fa.FLoRGConfig(target_modules=["query", "value"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("florg_A.default") for n in trainable)
    buffers = {n for n, _ in model.named_buffers()}
    assert any("florg_L.default" in n for n in buffers) and any("florg_R.default" in n for n in buffers)


# ----------------------------------------------------------------------------- merge / compensation


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_merge_unmerge_round_trip(conv1d):
    model, layer, w0 = adapted(16, 8, conv1d)
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.merge_adapter()
        assert layer.merged
        torch.testing.assert_close(layer.get_base_layer().weight - w0, layer.get_delta_weight("default"))
        merged = model(x)
        model.unmerge_adapter()
        after = model(x)
    torch.testing.assert_close(merged, before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.get_base_layer().weight, w0, rtol=0, atol=1e-14)
    delta = layer.get_delta_weight("default")
    assert delta.shape == layer.get_base_layer().weight.shape  # storage layout (transposed for Conv1D)
    expected = dense_delta(layer)
    torch.testing.assert_close(delta, expected.T if conv1d else expected)


def test_merge_and_unload_gives_same_function(tiny_bert):
    model = get_peft_model(tiny_bert(), fa.FLoRGConfig(target_modules=["query", "value"], init_scale=0.3))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        adapted_out = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert not any(isinstance(m, fa.FLoRGLayer) for m in merged.modules())
        merged_out = merged(input_ids=ids).logits
    torch.testing.assert_close(merged_out, adapted_out, rtol=1e-5, atol=1e-6)


def test_compensate_init_starts_at_pretrained_function(tiny_bert):
    base = tiny_bert()
    ids = torch.randint(0, 97, (3, 11))
    w0 = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    config = fa.FLoRGConfig(r=4, target_modules=["query", "value"], compensate_init=True, init_scale=0.3)
    model = get_peft_model(base, config)
    layer = fa.florg_layers(model)["bert.encoder.layer.0.attention.self.query"]
    assert layer.florg_compensated["default"]
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert (layer.get_base_layer().weight - w0).abs().max() > 1e-4  # W0 really was changed
    assert (out - ref).abs().max().item() <= 1e-6

    # without compensation the same init visibly changes the function
    plain_config = fa.FLoRGConfig(r=4, target_modules=["query", "value"], init_scale=0.3)
    uncompensated = get_peft_model(tiny_bert(), plain_config)
    with torch.no_grad():
        assert (uncompensated(input_ids=ids).logits - ref).abs().max().item() > 1e-4

    # unload() restores the pretrained weights (compensation added back)
    with torch.no_grad():
        fa.florg_layers(model)["bert.encoder.layer.0.attention.self.query"].florg_A["default"].mul_(2.0)
        restored = model.unload()
        torch.testing.assert_close(restored.bert.encoder.layer[0].attention.self.query.weight, w0, atol=1e-6, rtol=0)
        torch.testing.assert_close(restored(input_ids=ids).logits, ref, atol=1e-6, rtol=0)


def test_compensated_merge_and_unload_keeps_adapted_function(tiny_bert):
    model = get_peft_model(tiny_bert(), fa.FLoRGConfig(target_modules=["query", "value"], compensate_init=True,
                                                       init_scale=0.3))  # fmt: skip
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        for layer in fa.florg_layers(model).values():
            layer.florg_A["default"].normal_(0, 0.3)
        out = model(input_ids=ids).logits
        merged_out = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged_out, out, rtol=1e-5, atol=1e-6)


def test_second_adapter_and_delete(tiny_bert):
    base = tiny_bert()
    w0 = base.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    model = get_peft_model(base, fa.FLoRGConfig(target_modules=["query"], compensate_init=True, init_scale=0.3))
    ids = torch.randint(0, 97, (2, 6))
    model.add_adapter("other", fa.FLoRGConfig(target_modules=["query"], seed=1, init_scale=0.3))
    layers = fa.florg_layers(model, "other")
    assert list(layers) == list(fa.florg_layers(model))
    assert not torch.equal(layers[next(iter(layers))].florg_L["other"], layers[next(iter(layers))].florg_L["default"])
    with torch.no_grad():
        out_default = model(input_ids=ids).logits
        model.set_adapter("other")
        assert not torch.equal(model(input_ids=ids).logits, out_default)
    with pytest.raises(ValueError, match="only one adapter per layer"):
        model.add_adapter("third", fa.FLoRGConfig(target_modules=["query"], compensate_init=True))
    # deleting the compensated adapter gives the pretrained weights back
    model.delete_adapter("default")
    layer = fa.florg_layers(model, "other")["bert.encoder.layer.0.attention.self.query"]
    assert "default" not in layer.florg_A and "default" not in layer.florg_L
    torch.testing.assert_close(layer.get_base_layer().weight.detach(), w0, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- bases / determinism


def test_bases_and_init_deterministic_and_orthonormal(tiny_bert):
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    m1 = get_peft_model(tiny_bert(seed=1), fa.FLoRGConfig(target_modules=["query", "value"], seed=7))
    m2 = get_peft_model(tiny_bert(seed=2), fa.FLoRGConfig(target_modules=["query", "value"], seed=7))
    l1, l2 = fa.florg_layers(m1), fa.florg_layers(m2)
    assert set(names) <= set(l1) and list(l1) == list(l2)
    for name in l1:
        a, b = l1[name], l2[name]
        for attr in ("florg_L", "florg_R", "florg_A"):
            ta, tb = getattr(a, attr)["default"], getattr(b, attr)["default"]
            assert ta.dtype == torch.float32 and torch.equal(ta, tb), (name, attr)
        left, right = a.florg_L["default"], a.florg_R["default"]
        eye = torch.eye(a.k)
        assert (left.T @ left - eye).abs().max() <= 1e-6
        assert (right @ right.T - eye).abs().max() <= 1e-6
        # seeded by the clean module path of the original model
        ref_l, ref_r = make_bases(a.out_features, a.in_features, seed=7, layer_name=name)
        assert torch.equal(left, ref_l) and torch.equal(right, ref_r)
        assert torch.equal(a.florg_A["default"], init_factor(4, a.k, seed=7, layer_name=name, scale=0.01))
    # different layers and different seeds give different bases
    assert not torch.equal(l1[names[0]].florg_L["default"], l1[names[1]].florg_L["default"])
    m3 = get_peft_model(tiny_bert(seed=1), fa.FLoRGConfig(target_modules=["query", "value"], seed=8))
    assert not torch.equal(fa.florg_layers(m3)[names[0]].florg_L["default"], l1[names[0]].florg_L["default"])


def test_bfloat16_base_keeps_bases_in_base_dtype(tiny_bert):
    m1 = get_peft_model(tiny_bert(dtype=torch.bfloat16), fa.FLoRGConfig(target_modules=["query"]))
    m2 = get_peft_model(tiny_bert(dtype=torch.bfloat16), fa.FLoRGConfig(target_modules=["query"]))
    for (name, a), b in zip(fa.florg_layers(m1).items(), fa.florg_layers(m2).values()):
        left, right = a.florg_L["default"], a.florg_R["default"]
        assert left.dtype == right.dtype == torch.bfloat16
        assert torch.equal(left, b.florg_L["default"]) and torch.equal(right, b.florg_R["default"])
        ref_l, ref_r = make_bases(a.out_features, a.in_features, seed=0, layer_name=name, dtype=torch.bfloat16)
        assert torch.equal(left, ref_l) and torch.equal(right, ref_r)
        # A is trained in float32 (PEFT autocast) and equals the float32 A0 bit for bit (no bf16 round trip)
        assert a.florg_A["default"].dtype == torch.float32
        assert torch.equal(a.florg_A["default"], init_factor(4, a.k, seed=0, layer_name=name))
    # exactly one copy of L and R per layer
    n_bases = sum(1 for n, _ in m1.named_buffers() if ".florg_L." in n or ".florg_R." in n)
    assert n_bases == 2 * len(fa.florg_layers(m1))
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        out = m1(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_dropout_only_in_training():
    model, layer, _ = adapted(12, 12, lora_dropout=0.5)
    x = torch.randn(6, 12, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


# ----------------------------------------------------------------------------- florg_layers / factors


def test_florg_layers_names_and_factor_access(tiny_bert):
    base = tiny_bert()
    expected = [n for n, _ in base.named_modules() if n.endswith((".query", ".value"))]
    model = get_peft_model(base, fa.FLoRGConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    assert list(fa.florg_layers(model)) == expected
    assert list(fa.florg_layers(model.base_model)) == expected
    assert list(fa.florg_layers(model.get_base_model())) == expected
    factors = fa.get_florg_factors(model)
    assert set(factors) == set(expected) and all(v.shape == (4, 32) for v in factors.values())
    new = {k: torch.full_like(v, 0.5) for k, v in factors.items()}
    fa.set_florg_factors(model, new)
    assert all(torch.equal(layer.florg_A["default"], new[k]) for k, layer in fa.florg_layers(model).items())
    with pytest.raises(KeyError, match="missing"):
        fa.set_florg_factors(model, {expected[0]: new[expected[0]]})
    with pytest.raises(ValueError, match="does not match"):
        fa.florg_layers(model)[expected[0]].set_factor(torch.zeros(3, 32))
    with pytest.raises(ValueError, match="no FLoRG layers"):
        fa.florg_layers(model, adapter_name="other")


def test_clean_module_name():
    assert fa.clean_module_name("base_model.model.bert.encoder.layer.0.attention.self.query") == (
        "bert.encoder.layer.0.attention.self.query"
    )
    assert fa.clean_module_name("_orig_mod.transformer.h.0.attn.c_attn.base_layer") == "transformer.h.0.attn.c_attn"


# ----------------------------------------------------------------------------- errors / config


def test_unknown_target_module_lists_model_modules(tiny_bert):
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_bert(), fa.FLoRGConfig(target_modules=["query", "foo"]))
    msg = str(info.value)
    assert "'foo'" in msg and "not found" in msg
    for leaf in ("query", "key", "value", "dense", "classifier"):
        assert leaf in msg


def test_non_linear_target_rejected(tiny_bert):
    with pytest.raises(ValueError, match="LayerNorm"):
        get_peft_model(tiny_bert(), fa.FLoRGConfig(target_modules=["LayerNorm"]))


def test_rank_larger_than_k_rejected():
    base = TwoLayer(16, 5)
    with pytest.raises(ValueError) as info:
        get_peft_model(base, fa.FLoRGConfig(r=6, target_modules=["proj"]))
    msg = str(info.value)
    assert "'proj'" in msg and "r=6" in msg and "= 5" in msg
    # the model was not left half-modified
    assert not any(isinstance(m, fa.FLoRGLayer) for m in base.modules())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"init_scale": 0.0}, "init_scale"),
        ({"bias": "all"}, "bias"),
        ({"seed": "x"}, "seed"),
        ({"target_modules": []}, "target_modules"),
        ({"layers_pattern": "layer"}, "layers_pattern"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=rf"FLoRGConfig\.{field}"):
        fa.FLoRGConfig(**kwargs)


def test_config_defaults_and_scaling():
    config = fa.FLoRGConfig(target_modules=["q"])
    assert (config.r, config.lora_alpha, config.lora_dropout, config.seed) == (4, 16, 0.0, 0)
    assert (config.init_scale, config.compensate_init) == (0.01, False)
    assert (config.fan_in_fan_out, config.bias) == (False, "none")
    assert config.peft_type == "FLORG" and config.scaling == 4.0
    assert fa.FLoRGConfig(r=4, lora_alpha=16, use_rslora=True).scaling == 8.0
    model, layer, _ = adapted(12, 12, r=3, lora_alpha=9)
    assert layer.scaling["default"] == 3.0


def test_effective_factors_keep_bases_in_storage_dtype_and_match_autograd():
    """The custom autograd function gives the same gradients as casting the bases up front."""
    from florg.adapters.florg.layer import _EffectiveFactors

    g = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(48, 32, generator=g))[0].to(torch.bfloat16)
    right = torch.linalg.qr(torch.randn(40, 32, generator=g))[0].T.contiguous().to(torch.bfloat16)
    a1 = torch.randn(4, 32, generator=g, requires_grad=True)
    a2 = a1.detach().clone().requires_grad_(True)
    w_b, w_a = torch.randn(48, 4, generator=g), torch.randn(4, 40, generator=g)
    b_eff, a_eff = _EffectiveFactors.apply(a1, left, right)
    ((b_eff * w_b).sum() + (a_eff * w_a).sum()).backward()
    ref_b, ref_a = left.float() @ a2.T, a2 @ right.float()
    ((ref_b * w_b).sum() + (ref_a * w_a).sum()).backward()
    assert torch.equal(b_eff, ref_b) and torch.equal(a_eff, ref_a)
    assert torch.allclose(a1.grad, a2.grad, atol=1e-6)
    assert b_eff.grad_fn is not None and left.dtype == torch.bfloat16

"""Large-model training settings on the CPU: half-precision bases with float32 trainables for every
method, gradient accumulation and gradient checkpointing giving the update of one big batch."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, LlamaConfig

from florg.config import load_config
from florg.methods import METHODS, get_method
from florg.methods.base import ClientInfo, wire_state
from florg.run.experiment import float32_trainables
from florg.train import loss_items, make_optimizer, set_gradient_checkpointing, split_batch, train_steps

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BERT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
            max_position_embeddings=32, num_labels=3)  # fmt: skip
LLAMA = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
TARGETS = ["query", "value"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bert(dtype=torch.float32, dropout=0.1):
    torch.manual_seed(0)
    cfg = BertConfig(**BERT, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return AutoModelForSequenceClassification.from_config(cfg, dtype=dtype)


def llama(dtype=torch.float32):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), dtype=dtype)


def build(name, base, targets=TARGETS, heads=("classifier",), *overrides):
    cfg = load_config(None, [f"method.name={name}", "method.rank=2", "method.alpha=4", *overrides])
    method = get_method(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = method.build(base, list(targets), list(heads))
    float32_trainables(model)
    return cfg, method, model


def cls_batch(seed, rows=8, seq=12):
    """Right-padded classification batch with rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seq + 1, (rows,), generator=g)
    ids = torch.randint(1, 97, (rows, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 3, (rows,), generator=g)}


def lm_batch(seed, rows=8, seq=16):
    """Right-padded causal-LM batch: prompt tokens and padding are ignored (-100), answer lengths differ."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, seq + 1, (rows,), generator=g)
    ids = torch.randint(1, 101, (rows, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def trainables(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- bfloat16 bases, float32 trainables
@pytest.mark.parametrize("name", sorted(METHODS))
def test_bfloat16_base_with_float32_factors_for_every_method(name):
    cfg, method, model = build(name, bert(torch.bfloat16))
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n  # adapter factors and the head
    frozen = [p.dtype for n, p in model.named_parameters()
              if not p.requires_grad and p.ndim == 2 and "lora_" not in n]  # FFA-LoRA's frozen A is a factor
    assert frozen and all(d == torch.bfloat16 for d in frozen)
    for n, b in model.named_buffers():
        if "florg_L" in n or "florg_R" in n or "florg_w0_pretrained" in n:
            assert b.dtype == torch.bfloat16, n  # FLoRG's bases and the pretrained W0 copy stay in the base dtype

    state = method.initial_global(model)
    info = ClientInfo(partition_id=0, server_round=1)
    method.client_load(model, wire_state(state), info, {})
    before = trainables(model)
    opt = make_optimizer(model.parameters(), cfg.train, 1e-2)
    stats = train_steps(model, iter([cls_batch(1), cls_batch(2)]), opt, 2, dtype=torch.bfloat16)
    assert torch.isfinite(torch.tensor(stats["train_loss"]))
    after = trainables(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    assert all(v.dtype == torch.float32 for v in after.values())
    for s in opt.state.values():  # AdamW's moments in float32
        assert all(t.dtype == torch.float32 for t in s.values() if t.ndim)
    upload = method.client_upload(model, info, {})
    assert all(v.dtype == torch.float32 for v in upload.values())
    new, _ = method.aggregate([upload, upload], [3, 5], state)
    method.load_global(model, new)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(**cls_batch(3)).logits).all()


@pytest.mark.parametrize("name", ["fedex-lora", "flora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w0_correction_of_a_half_precision_base_is_kept_apart(name, dtype):
    """W0 stays the pretrained weight; the correction C lives in its own buffer (rounded relative to itself)
    and is added to the base layer's output; loading other corrections leaves no trace."""
    from florg.methods.lora_common import lora_layers, w0_key

    cfg, method, model = build(name, bert(dtype))
    layers = lora_layers(model)
    pretrained = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    g = torch.Generator().manual_seed(0)
    corrections = {n: 1e-3 * torch.randn(layer.out_features, layer.in_features, generator=g) for n, layer in layers.items()}
    state = {w0_key(n): c for n, c in corrections.items()}
    for _ in range(3):  # other corrections in between: nothing accumulates
        method.load_adapter_state(model, {k: 50 * v for k, v in state.items()})
        method.load_adapter_state(model, state)
    eps = torch.finfo(dtype).eps
    x = torch.randn(5, next(iter(layers.values())).in_features, generator=g).to(dtype)
    for n, layer in layers.items():
        base = layer.get_base_layer()
        assert torch.equal(base.weight, pretrained[n]), n  # W0 is never rewritten
        assert not hasattr(layer, "florg_w0_pretrained")  # no copy needed: same memory as before
        assert layer.florg_w0_delta.dtype == dtype
        assert "florg_w0_delta" not in "".join(model.state_dict())  # non-persistent
        delta = method.base_delta(layer)
        assert delta.dtype == torch.float32 and torch.equal(delta, corrections[n].to(dtype).float())
        rel = float(torch.linalg.matrix_norm(delta.double() - corrections[n].double())
                    / torch.linalg.matrix_norm(corrections[n].double()))
        assert rel < eps, (n, rel)  # rounded relative to C itself (merged into W0 it would lose most of it)
        with torch.no_grad():
            y = base(x)
            expected = torch.nn.functional.linear(x, base.weight, base.bias) + torch.nn.functional.linear(
                x, layer.florg_w0_delta)
        assert torch.equal(y, expected), n
    upload = method.upload(model)  # the correction never goes up
    assert not any(k.endswith(".w0_delta") for k in upload)


@pytest.mark.parametrize("name", ["fedex-lora", "flora"])
def test_w0_of_a_float32_base_is_rebuilt_from_the_pretrained_copy(name):
    """float32 (the default) keeps the merged W0 = W0_pretrained + C, rebuilt every round: no drift."""
    from florg.methods.lora_common import lora_layers, w0_key

    cfg, method, model = build(name, bert())
    layers = lora_layers(model)
    g = torch.Generator().manual_seed(0)
    state = {w0_key(n): 1e-3 * torch.randn(layer.out_features, layer.in_features, generator=g)
             for n, layer in layers.items()}
    method.load_adapter_state(model, state)
    first = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    for _ in range(3):
        method.load_adapter_state(model, {k: 50 * v for k, v in state.items()})
        method.load_adapter_state(model, state)
    for n, layer in layers.items():
        w = layer.get_base_layer().weight
        assert torch.equal(w, first[n]) and not hasattr(layer, "florg_w0_delta"), n
        assert torch.equal(w, (layer.florg_w0_pretrained.double() + state[w0_key(n)].double()).float()), n


def test_florg_factors_under_autocast_are_formed_in_float32():
    from florg.adapters import florg_layers

    _, _, model = build("florg", bert(torch.bfloat16))
    layer = next(iter(florg_layers(model).values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        b_eff, a_eff = layer.lora_factors("default")
    assert b_eff.dtype == a_eff.dtype == torch.float32
    ref_b, ref_a = layer.lora_factors("default")  # outside autocast
    assert torch.equal(b_eff, ref_b) and torch.equal(a_eff, ref_a)


# ----------------------------------------------------------------------------- accumulation and checkpointing
CALLS = {}  # what the last _one_step saw: rows per model call, calls of the first adapted layer


def _one_step(make_model, batch, *, grad_accum=1, checkpointing=False, name="florg", heads=("classifier",),
              targets=TARGETS):
    from peft.tuners.tuners_utils import BaseTunerLayer

    _, _, model = build(name, make_model(), targets, heads)
    set_gradient_checkpointing(model, checkpointing)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    rows, layer_calls = [], []
    model.register_forward_pre_hook(lambda m, a, kw: rows.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
    first = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
    first.register_forward_hook(lambda *args: layer_calls.append(1))
    torch.manual_seed(123)  # dropout
    stats = train_steps(model, iter([batch]), opt, 1, grad_accum=grad_accum)
    CALLS.update(rows=rows, layer_calls=len(layer_calls))
    return trainables(model), stats["train_loss"]


def _assert_same_update(a, b, tol):
    (pa, la), (pb, lb) = a, b
    assert la == pytest.approx(lb, rel=tol, abs=tol)
    for key in pa:
        assert torch.allclose(pa[key], pb[key], rtol=tol, atol=tol), key


@pytest.mark.parametrize("name", ["florg", "fedit"])
@pytest.mark.parametrize("parts", [2, 3, 8])
def test_accumulation_equals_one_big_batch_classification(name, parts):
    batch = cls_batch(7)
    one = _one_step(lambda: bert(dropout=0.0), batch, name=name)
    assert CALLS["rows"] == [8]
    acc = _one_step(lambda: bert(dropout=0.0), batch, grad_accum=parts, name=name)
    assert CALLS["rows"] == [len(c) for c in torch.arange(8).tensor_split(parts)]  # really in micro-batches
    _assert_same_update(one, acc, 1e-5)
    moved = {k: (one[0][k] - v).abs().max() for k, v in trainables(build(name, bert(dropout=0.0))[2]).items()}
    assert max(moved.values()) > 1e-3  # the step really moved the parameters


def test_accumulation_equals_one_big_batch_causal_lm_weighted_by_tokens():
    batch = lm_batch(3)
    targets, heads = ["q_proj", "v_proj"], ()
    one = _one_step(llama, batch, targets=targets, heads=heads)
    acc = _one_step(llama, batch, grad_accum=3, targets=targets, heads=heads)
    assert CALLS["rows"] == [3, 3, 2]
    _assert_same_update(one, acc, 1e-5)
    # weighting by rows instead of tokens would not match: the micro-batches hold different token counts
    counts = [loss_items(mb) for mb in split_batch(batch, 3)]
    assert len(set(counts)) > 1 and sum(counts) == loss_items(batch)


@pytest.mark.parametrize("make_model,targets,heads,batch", [
    (lambda: bert(dropout=0.1), TARGETS, ("classifier",), cls_batch(5)),  # dropout: the RNG is replayed
    (llama, ["q_proj", "v_proj"], (), lm_batch(5)),
])
def test_gradient_checkpointing_gives_the_same_update(make_model, targets, heads, batch):
    plain = _one_step(make_model, batch, targets=targets, heads=heads)
    assert CALLS["layer_calls"] == 1
    ckpt = _one_step(make_model, batch, checkpointing=True, targets=targets, heads=heads)
    assert CALLS["layer_calls"] == 2  # the layer's forward is recomputed in the backward pass
    _assert_same_update(plain, ckpt, 1e-6)
    both = _one_step(make_model, batch, checkpointing=True, grad_accum=2, targets=targets, heads=heads) \
        if make_model is llama else None
    if both is not None:
        _assert_same_update(plain, both, 1e-5)


def test_gradient_checkpointing_switches_on_and_off():
    _, _, model = build("florg", bert())
    base = model.get_base_model()
    set_gradient_checkpointing(model, True)
    assert base.is_activation_checkpointing
    set_gradient_checkpointing(model, False)
    assert not base.is_activation_checkpointing


def test_split_batch_and_loss_items():
    batch = cls_batch(9, rows=7, seq=10)
    parts = split_batch(batch, 3)
    assert [int(p["input_ids"].shape[0]) for p in parts] == [3, 2, 2]
    for p in parts:  # trailing padding no row needs is trimmed
        assert bool(p["attention_mask"][:, -1].any())
        assert p["input_ids"].shape == p["attention_mask"].shape
    assert torch.equal(torch.cat([p["labels"] for p in parts]), batch["labels"])
    assert loss_items(batch) == 7  # class labels: rows
    lm = lm_batch(1, rows=4, seq=9)
    assert loss_items(lm) == int((lm["labels"][:, 1:] != -100).sum())  # tokens after the causal shift
    assert len(split_batch(batch, 20)) == 7  # never an empty micro-batch


# ----------------------------------------------------------------------------- memory-lean bases
def test_per_shape_bases_are_held_once_per_shape_and_survive_moves_copies_and_reloads(tmp_path):
    import copy

    from peft import PeftModel, get_peft_model

    from florg.adapters import FLoRGConfig, florg_layers
    from florg.core import make_bases

    def base():
        return llama(torch.bfloat16)

    cfg = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_scale=0.3)
    model = get_peft_model(base(), FLoRGConfig(**cfg, bases="per-shape"))
    layers = florg_layers(model)
    pairs = {n: layer.basis_pair("default") for n, layer in layers.items()}
    assert len(layers) == 4 and len({id(p[0]) for p in pairs.values()}) == 2  # q_proj 32x32, v_proj 16x32
    ref_l, ref_r = make_bases(32, 32, seed=0, layer_name="shape/32x32", dtype=torch.bfloat16)
    q = pairs["model.layers.0.self_attn.q_proj"]
    assert torch.equal(q[0], ref_l) and torch.equal(q[1], ref_r)
    bases_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "florg_" in n)
    per_layer = get_peft_model(base(), FLoRGConfig(**cfg))
    assert bases_bytes * 2 == sum(b.numel() * b.element_size() for n, b in per_layer.named_buffers() if "florg_" in n)
    # A0 stays per layer
    a0 = [layer.florg_A["default"] for layer in layers.values()]
    assert not torch.equal(a0[0], a0[2])

    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids).logits
        clone = copy.deepcopy(model)
        assert len({id(layer.basis_pair("default")[0]) for layer in florg_layers(clone).values()}) == 2
        assert torch.equal(clone(input_ids=ids).logits, out)
        clone.to(torch.float32)  # a move converts each shared pair once
        assert len({layer.basis_pair("default")[0].data_ptr() for layer in florg_layers(clone).values()}) == 2
        assert next(iter(florg_layers(clone).values())).basis_pair("default")[0].dtype == torch.float32
        model.save_pretrained(tmp_path / "adapter")
        again = PeftModel.from_pretrained(base(), tmp_path / "adapter")
        assert torch.equal(again(input_ids=ids).logits, out)


def test_per_shape_bases_through_the_method_option_train_and_aggregate_exactly():
    from florg.adapters import florg_layers

    cfg, method, model = build("florg", bert(dropout=0.0), TARGETS, ("classifier",), "method.florg.bases=per-shape")
    layers = florg_layers(model)
    assert len({id(layer.basis_pair("default")[0]) for layer in layers.values()}) == 1  # query, value: 32 x 32
    state = method.initial_global(model)
    uploads = []
    for pid in range(3):
        method.client_load(model, wire_state(state), ClientInfo(pid, 1), {})
        opt = make_optimizer(model.parameters(), cfg.train, 1e-2)
        train_steps(model, iter([cls_batch(pid)]), opt, 1)
        uploads.append(method.client_upload(model, ClientInfo(pid, 1), {}))
    new, diag = method.aggregate(uploads, [1, 2, 3], state)
    assert diag["agg_rel_error_max"] < 1e-6  # the Gram aggregate is exact with shared bases as well

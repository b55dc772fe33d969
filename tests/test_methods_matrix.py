"""One test matrix for every federated method (no Flower runtime).

On a tiny random BERT (hidden 32, 2 layers; adapted: query, value, intermediate.dense 32->48 and
output.dense 48->32, so both d_out > d_in and d_out < d_in occur; a classification head, or for the
extractive-QA family the span head ``qa_outputs`` trained on start/end positions) and, for the instruction-tuning
family, a tiny random Llama causal LM without a head (adapted: q_proj 32->32, v_proj 32->16,
up_proj 32->64, down_proj 64->32; loss on response tokens only) every method is built, three
clients share ONE model object (as simulated clients share the per-process cached model) and train
a few steps on random tokens for two rounds through the client hooks, and the server aggregates.
Client and global updates are read off the model by a forward pass (``W_eff = (layer(I) - bias)^T``),
so nothing relies on a method's own bookkeeping or on a weight's storage orientation.

Checked per method: its exactness property against ``sum_n p_n dW_n``, the reported
``agg_rel_error``/``sent_rel_error`` diagnostics, the pitfalls of baselines.md (transposed residual,
FedIT's variable mix-up, FLoRA's stacking scale), and that the bytes of the real Flower
``ArrayRecord`` payloads equal the communication formula plus a fixed per-array overhead.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from florg.config import ConfigError, load_config
from florg.fl.records import to_record
from florg.methods import METHODS, compare_rows, get_method
from florg.methods.base import EVAL_PREFIX, HEAD_PREFIX, ClientInfo, split_eval, wire_state
from florg.methods.driver import run_round
from florg.methods.flora import stack_uploads
from florg.methods.lora_common import lora_layers, seeded_lora_A, w0_key
from florg.methods.lora_math import Factored, product_svd
from florg.tasks.classification import label_weighted_accuracy
from helpers import tiny_bert, tiny_bert_qa, tiny_llama  # module-level reference weights (PRETRAINED) need them at import time

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TARGETS = ["query", "value", "intermediate.dense", "output.dense"]
HEADS = ["classifier"]
EXAMPLES = [10, 20, 30]  # example counts of the three clients -> p = 1/6, 2/6, 3/6
P = [n / sum(EXAMPLES) for n in EXAMPLES]
ALPHA, RANK = 8.0, 4
ALL = ["florg", "fedit", "federa", "ffa-lora", "fedsa-lora", "fedex-lora", "flora"]
EXTRA = {"flora-hetero": ("flora", ["method.client_ranks=[1,2,4]"]),
         "flora-dense": ("flora", ["method.flora.downlink=dense"]),
         "flora-dense-hetero": ("flora", ["method.flora.downlink=dense", "method.client_ranks=[1,2,4]"]),
         "federa-svd": ("federa", ["method.federa.mode=product_svd"]),
         "florg-hetero": ("florg", ["method.client_ranks=[1,2,4]"]),
         "florg-noalign": ("florg", ["method.florg.procrustes=none"]),
         "florg-spread0": ("florg", ["method.florg.client_spread=0.0", "method.florg.consensus_diagnostics=true"])}
ROWS = ALL + list(EXTRA)  # every method and every relabelled server rule


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is fastest (and steady on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_registered_method_is_in_the_matrix():
    assert sorted(METHODS) == sorted(ALL)


# ----------------------------------------------------------------------------- harness


LM_VOCAB = 97


def plain_llama():
    return tiny_llama(LM_VOCAB, seed=0)


def classification_batch(gen):
    return {"input_ids": torch.randint(1, 97, (8, 10), generator=gen), "labels": torch.randint(0, 3, (8,), generator=gen)}


def qa_batch(gen):
    """Random tokens with an answer span inside the 10 positions (start <= end), as the QA family encodes."""
    start = torch.randint(0, 10, (8,), generator=gen)
    end = torch.minimum(start + torch.randint(0, 3, (8,), generator=gen), torch.tensor(9))
    return {"input_ids": torch.randint(1, 97, (8, 10), generator=gen), "start_positions": start, "end_positions": end}


def lm_batch(gen):
    """Random token sequences whose first 4 positions are a prompt (label -100), as the instruction family encodes."""
    ids = torch.randint(3, LM_VOCAB, (8, 10), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


#: task families of the matrix: (model factory, adapted modules, head modules, random batch)
FAMILY_MODELS = {
    "classification": (tiny_bert, TARGETS, HEADS, classification_batch),
    "extractive-qa": (tiny_bert_qa, TARGETS, ["qa_outputs"], qa_batch),
    "instruction": (plain_llama, ["q_proj", "v_proj", "up_proj", "down_proj"], [], lm_batch),
}


def setup(label, *overrides, family="classification"):
    name, extra = EXTRA.get(label, (label, []))
    cfg = load_config(None, [f"method.name={name}", f"method.rank={RANK}", f"method.alpha={ALPHA}", *extra,
                             *overrides])
    method = get_method(cfg)
    factory, targets, heads, _ = FAMILY_MODELS[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = method.build(factory(), targets, heads).eval()
    return cfg, method, model


def _target_modules(model):
    """``{clean name: adapted module}`` for the targeted layers (LoRA or FLoRG tuner layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from florg.adapters import clean_module_name

    return {clean_module_name(n): m for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)}


def _pretrained(family):
    factory, targets, _, _ = FAMILY_MODELS[family]
    return {n: m.weight.detach().double().clone() for n, m in factory().named_modules()
            if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)}


PRETRAINED_BY_FAMILY = {family: _pretrained(family) for family in FAMILY_MODELS}
PRETRAINED = PRETRAINED_BY_FAMILY["classification"]


@torch.no_grad()
def effective(module):
    """The layer's effective ``d_out x d_in`` weight, read off a forward pass on the identity."""
    base = module.get_base_layer()
    x = torch.eye(module.in_features)
    bias = base.bias if base.bias is not None else 0.0
    return (module(x) - bias).T.double()


def deltas(model, family="classification"):
    """``W_eff - W_pretrained`` of every adapted layer."""
    pre = PRETRAINED_BY_FAMILY[family]
    return {name: effective(mod) - pre[name] for name, mod in _target_modules(model).items()}


def local_train(model, seed, steps=3, lr=0.05, family="classification"):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = FAMILY_MODELS[family][3](gen)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def run_rounds(label, rounds=2, overrides=(), family="classification"):
    """Federated rounds (the library's Flower-free driver) on one shared model; returns the last round's data."""
    cfg, method, model = setup(label, *overrides, family=family)
    state = method.initial_global(model)
    method.load_global(model, state)
    global_delta = deltas(model, family)
    local = {pid: {} for pid in range(3)}
    for rnd in range(1, rounds + 1):
        client_deltas = []

        def train(model, info, client_deltas=client_deltas):
            local_train(model, seed=100 * info.server_round + info.partition_id, family=family)
            client_deltas.append(deltas(model, family))

        previous, previous_delta = state, global_delta
        res = run_round(method, model, state, train, server_round=rnd, clients=range(3), weights=EXAMPLES,
                        local=local)
        state, diag = res.state, res.diagnostics
        method.load_global(model, state)  # the server's view of the new global model
        global_delta = deltas(model, family)
    target = {n: sum(p * d[n] for p, d in zip(P, client_deltas)) for n in global_delta}
    return dict(cfg=cfg, method=method, model=model, state=state, previous=previous, uploads=res.uploads,
                diag=diag, target=target, global_delta=global_delta, previous_delta=previous_delta, local=local,
                received=res.received)


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def _measured_sent_error(r):
    return max(rel(r["global_delta"][n], r["target"][n]) for n in r["target"])


def _measured_round_errors(r):
    """Per layer ``||G - T|| / ||T - G_prev||``: the update sent against the exact mean update, dense."""
    return [rel(r["global_delta"][n], r["target"][n]) * float(torch.linalg.matrix_norm(r["target"][n]))
            / float(torch.linalg.matrix_norm(r["target"][n] - r["previous_delta"][n])) for n in r["target"]]


def _assert_diagnostics_match(r):
    """The reported sent_rel_error_max is what the model actually shows."""
    assert r["diag"]["sent_rel_error_max"] == pytest.approx(_measured_sent_error(r), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("label", ROWS)
def test_round_rel_error_of_every_method_against_a_dense_computation(label):
    """Every method (FLoRG included) reports round_rel_error (max and mean over layers): the error of the
    update actually sent relative to the round's exact mean update, here read off forward passes."""
    r = run_rounds(label)
    measured = _measured_round_errors(r)
    assert r["diag"]["round_rel_error_max"] == pytest.approx(max(measured), rel=1e-4, abs=1e-6)
    assert r["diag"]["round_rel_error_mean"] == pytest.approx(sum(measured) / len(measured), rel=1e-4, abs=1e-6)
    _assert_diagnostics_match(r)
    exact = label in ("ffa-lora", "fedex-lora", "flora", "flora-hetero", "flora-dense", "flora-dense-hetero")
    assert (r["diag"]["round_rel_error_max"] < 1e-5) == exact, r["diag"]["round_rel_error_max"]


# ----------------------------------------------------------------------------- exactness matrix


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
@pytest.mark.parametrize("label", ["ffa-lora", "fedex-lora", "flora", "flora-hetero", "flora-dense",
                                   "flora-dense-hetero"])
def test_exact_methods_global_update_is_the_weighted_mean(label, family):
    r = run_rounds(label, family=family)
    for name in r["target"]:
        assert rel(r["global_delta"][name], r["target"][name]) < 1e-6, name
    assert r["diag"]["agg_rel_error_max"] < 1e-6 and r["diag"]["sent_rel_error_max"] < 1e-6


@pytest.mark.parametrize("label", ["florg", "florg-hetero"])
def test_florg_gram_aggregate_is_exact_and_truncation_is_reported(label):
    """Q = sum p_n A_n^T A_n is exact, also with clients of ranks 1, 2 and 4 (r_n x k uploads)."""
    from florg.adapters import florg_layers

    r = run_rounds(label)
    layers = florg_layers(r["model"])
    for name, target in r["target"].items():
        layer = layers[name]
        a_n = [u["A/" + name].double() for u in r["uploads"]]
        q = sum(p * a.T @ a for p, a in zip(P, a_n))
        exact = layer.scaling["default"] * layer.florg_L["default"].double() @ q @ layer.florg_R["default"].double()
        assert rel(exact, target) < 1e-6, name
    assert r["diag"]["agg_rel_error_max"] < 1e-6  # before the rank-r truncation
    assert r["diag"]["sent_rel_error_max"] > 1e-3  # 3 clients x rank 4 > r: truncation is visible
    _assert_diagnostics_match(r)


def test_fedit_error_is_exactly_the_cross_term():
    r = run_rounds("fedit")
    s = ALPHA / RANK
    for name, target in r["target"].items():
        a = [u[name + ".lora_A.weight"].double() for u in r["uploads"]]
        b = [u[name + ".lora_B.weight"].double() for u in r["uploads"]]
        cross = sum(P[i] * P[j] * (b[i] - b[j]) @ (a[i] - a[j]) for i in range(3) for j in range(3))
        expected_gap = -0.5 * s * cross  # s B_bar A_bar - sum p s B A
        gap = r["global_delta"][name] - target
        assert rel(gap, expected_gap) < 1e-5, name
        assert float(torch.linalg.matrix_norm(gap)) > 1e-4  # the error is real, not rounding
    _assert_diagnostics_match(r)


def test_fedit_averages_every_client_not_only_the_first():
    """The FLoRA repository's FedIT branch returns p_1 * (first client); the global must be the full mean."""
    cfg, method, model = setup("fedit")
    current = method.initial_global(model)
    gen = torch.Generator().manual_seed(3)
    uploads = [{k: torch.randn(v.shape, generator=gen) for k, v in current.items()} for _ in range(3)]
    new, _ = method.aggregate(uploads, EXAMPLES, current)
    for key in current:
        mean = sum(p * u[key].double() for p, u in zip(P, uploads))
        assert torch.allclose(new[key].double(), mean, atol=1e-6), key
        assert not torch.allclose(new[key].double(), P[0] * uploads[0][key].double(), atol=1e-3)


@pytest.mark.parametrize("label", ["federa", "federa-svd"])
def test_federa(label):
    r = run_rounds(label)
    s = ALPHA / RANK
    for name, target in r["target"].items():
        a0 = r["state"]["server/" + name + ".init_A"].double()
        b0 = r["state"]["server/" + name + ".init_B"].double()
        principal = s * b0 @ a0
        if label == "federa-svd":  # global update + P0 = best rank-r approximation of (target + P0)
            u, sig, vh = torch.linalg.svd(target + principal)
            best = u[:, :RANK] @ torch.diag(sig[:RANK]) @ vh[:RANK]
            assert rel(r["global_delta"][name] + principal, best) < 1e-5, name
        else:  # the FeDeRA paper's own rule: FedAvg of the factors
            a = sum(p * u[name + ".lora_A.weight"].double() for p, u in zip(P, r["uploads"]))
            b = sum(p * u[name + ".lora_B.weight"].double() for p, u in zip(P, r["uploads"]))
            assert rel(r["global_delta"][name] + principal, s * b @ a) < 1e-5, name
    if label == "federa-svd":
        assert r["diag"]["agg_rel_error_max"] < 1e-6  # the product aggregate itself is exact
        assert r["diag"]["sent_rel_error_max"] > 1e-3  # the rank-r tail is dropped
    _assert_diagnostics_match(r)


def test_federa_init_keeps_the_pretrained_function_and_is_the_svd_of_w0():
    cfg, method, model = setup("federa")
    ids = torch.randint(1, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_bert()(input_ids=ids).logits
        out = model(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5)
    s = ALPHA / RANK
    for name, layer in lora_layers(model).items():
        w0 = PRETRAINED[name]
        u, sig, vh = torch.linalg.svd(w0)
        principal = u[:, :RANK] @ torch.diag(sig[:RANK]) @ vh[:RANK]
        ba = (layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()).detach()
        assert rel(s * ba, principal) < 1e-4, name  # PEFT takes the SVD in float32
        assert torch.allclose(layer.get_base_layer().weight.double(), w0 - s * ba, atol=1e-5)


def test_product_svd_thin_path_equals_dense_svd():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 6, generator=gen, dtype=torch.float64), torch.randn(6, 30, generator=gen, dtype=torch.float64)
    u, s, v = product_svd(x, y, 3)  # thin path: 6 < 30
    ud, sd, vhd = torch.linalg.svd(x @ y)
    assert torch.allclose(s, sd[:3])
    assert torch.allclose(u @ torch.diag(s) @ v.T, ud[:, :3] @ torch.diag(sd[:3]) @ vhd[:3], atol=1e-10)
    u2, s2, v2 = product_svd(x, y, 8)  # more than the rank: zero tail
    assert torch.allclose(u2 @ torch.diag(s2) @ v2.T, x @ y, atol=1e-10) and float(s2[6:].abs().max()) == 0.0


def test_factored_norm_never_needs_the_dense_matrix_and_agrees_with_it():
    gen = torch.Generator().manual_seed(2)
    terms = [(torch.randn(50, 3, generator=gen), torch.randn(3, 40, generator=gen)) for _ in range(4)]
    f = Factored((50, 40), terms) - Factored.product(terms[0][0], terms[0][1], 0.5)
    assert f.fro() == pytest.approx(float(torch.linalg.matrix_norm(f.dense())), rel=1e-10)


# ----------------------------------------------------------------------------- every method on the QA head


@pytest.mark.parametrize("label", ALL)
def test_every_method_trains_and_averages_the_qa_span_head(label):
    """One round on the tiny BERT QA model: the span head ``qa_outputs`` trains fully on every client, travels
    under ``head/`` keys and is averaged with the example weights (a method that keeps the head local sends
    none); the new global model answers (finite logits)."""
    r = run_rounds(label, rounds=1, family="extractive-qa")
    heads = [{k: v for k, v in u.items() if k.startswith(HEAD_PREFIX)} for u in r["uploads"]]
    if not r["method"].shares_head:
        assert heads == [{}] * len(heads) and not any(k.startswith(HEAD_PREFIX) for k in r["state"])
        return
    keys = sorted(heads[0])
    assert keys and all("qa_outputs" in k for k in keys) and len(keys) == 2  # weight and bias
    assert not any(torch.equal(heads[0][k], heads[1][k]) for k in keys)  # trained per client
    for k in keys:
        mean = sum(p * h[k].double() for p, h in zip(P, heads))
        assert torch.allclose(r["state"][k].double(), mean, atol=1e-6), k
    weight = next(k for k in keys if k.endswith("weight"))
    live = dict(r["model"].named_parameters())[weight[len(HEAD_PREFIX):]]
    assert torch.equal(live.detach(), r["state"][weight])  # load_global put the averaged head into the model
    with torch.no_grad():
        out = r["model"](input_ids=torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(5)))
    assert out.start_logits.shape == out.end_logits.shape == (2, 10)
    assert torch.isfinite(out.start_logits).all() and torch.isfinite(out.end_logits).all()
    _assert_diagnostics_match(r)


# ----------------------------------------------------------------------------- FedSA-LoRA


def _head_params(model):
    return {HEAD_PREFIX + n: p.detach().clone() for n, p in model.named_parameters() if "classifier" in n and p.requires_grad}


def test_fedsa_global_model_and_personal_B_and_head_stay_per_client():
    r = run_rounds("fedsa-lora")
    method, model, s = r["method"], r["model"], ALPHA / RANK
    for name in r["target"]:  # the constructed global model: W0 + s B_bar A_bar
        a = sum(p * u[name + ".lora_A.weight"].double() for p, u in zip(P, r["uploads"]))
        b = sum(p * u[EVAL_PREFIX + name + ".lora_B.weight"].double() for p, u in zip(P, r["uploads"]))
        assert rel(r["global_delta"][name], s * b @ a) < 1e-5
    _assert_diagnostics_match(r)
    # The protocol carries A only, both ways: no B, no head (the reference keeps lora_B and the classifier local).
    down = wire_state(r["state"])
    assert all(k.endswith(".lora_A.weight") for k in down)
    assert all(k.endswith(".lora_A.weight") or k.startswith(EVAL_PREFIX) for k in r["uploads"][0])
    assert not any(k.startswith(HEAD_PREFIX) for k in r["state"])  # the head is never aggregated by the protocol
    # The constructed global head (server-only) is the example-weighted mean of the evaluation-only heads.
    heads = {k[len("server/"):]: v for k, v in r["state"].items() if k.startswith("server/" + HEAD_PREFIX)}
    assert heads and heads.keys() == _head_params(model).keys()
    for key, value in heads.items():
        mean = sum(p * u[EVAL_PREFIX + key].double() for p, u in zip(P, r["uploads"]))
        assert torch.allclose(value.double(), mean, atol=1e-6)
        assert torch.equal(_head_params(model)[key], value)  # the server's global model uses it
    # Each client's next model is its OWN B and head with the global A, although all share one model object.
    for pid in (2, 0, 1):
        method.client_load(model, down, ClientInfo(pid, 3), r["local"][pid])
        for name, layer in lora_layers(model).items():
            assert torch.equal(layer.lora_B["default"].weight, r["local"][pid][name + ".lora_B.weight"])
            assert torch.equal(layer.lora_A["default"].weight, down[name + ".lora_A.weight"])
        for key, value in _head_params(model).items():
            assert torch.equal(value, r["local"][pid][key])
    assert not torch.equal(r["local"][0][name + ".lora_B.weight"], r["local"][1][name + ".lora_B.weight"])
    head_key = next(iter(heads))
    assert not torch.equal(r["local"][0][head_key], r["local"][1][head_key])  # personal heads differ
    fresh = {}
    method.client_load(model, down, ClientInfo(7, 3), fresh)  # a first round: B = 0 and the initial head
    assert all(float(layer.lora_B["default"].weight.detach().abs().max()) == 0.0 for layer in lora_layers(model).values())
    _, _, same_seed = setup("fedsa-lora")  # every process builds the same initial head from the seed
    assert all(torch.equal(v, _head_params(same_seed)[k]) for k, v in _head_params(model).items())
    assert method.headline == "personal" and not method.shares_head


def test_label_weighted_accuracy():
    res = {"accuracy": 0.5, "class_total": {0: 10, 1: 10, 2: 4}, "class_correct": {0: 10, 1: 0, 2: 2}}
    assert label_weighted_accuracy(res, [3, 1, 0]) == pytest.approx(0.75)  # 3/4 * 1.0 + 1/4 * 0.0
    assert label_weighted_accuracy(res, [0, 0, 5]) == pytest.approx(0.5)
    assert label_weighted_accuracy(res, [0, 0, 0, 9]) == 0.5  # no overlap: plain accuracy


# ----------------------------------------------------------------------------- FFA-LoRA


def test_ffa_A_is_frozen_seeded_identical_and_never_on_the_wire():
    _, m1, model1 = setup("ffa-lora")
    _, m2, model2 = setup("ffa-lora")
    for (n1, l1), (n2, l2) in zip(lora_layers(model1).items(), lora_layers(model2).items()):
        a = l1.lora_A["default"].weight
        assert n1 == n2 and torch.equal(a, l2.lora_A["default"].weight) and not a.requires_grad
        assert torch.equal(a, seeded_lora_A(RANK, a.shape[1], seed=0, tag=n1 + "#lora_A"))
    assert not any(".lora_A." in k for k in wire_state(m1.initial_global(model1)))
    assert not any(".lora_A." in k for k in m1.upload(model1))


# ----------------------------------------------------------------------------- FedEx-LoRA orientation


@torch.no_grad()
def _check_fedex_orientation(method, model, state):
    gen = torch.Generator().manual_seed(9)
    for key in [k for k in state if k.endswith(".w0_delta")]:
        state[key] = torch.randn(state[key].shape, generator=gen)  # non-symmetric, even for square layers
    for key in [k for k in state if ".lora_" in k]:
        state[key] = torch.randn(state[key].shape, generator=gen) * 0.1
    method.load_global(model, state)
    s = ALPHA / RANK
    for name, layer in lora_layers(model).items():
        w0 = layer.florg_w0_pretrained.double()
        w0 = w0.T if layer.fan_in_fan_out else w0  # to d_out x d_in
        expected = w0 + state[w0_key(name)].double() + s * (
            state[name + ".lora_B.weight"].double() @ state[name + ".lora_A.weight"].double())
        assert rel(effective(layer), expected) < 1e-5, name


def test_fedex_residual_is_not_transposed_on_linear_layers():
    _, method, model = setup("fedex-lora")
    _check_fedex_orientation(method, model, method.initial_global(model))


def test_fedex_residual_is_transposed_only_for_conv1d():
    cfg = load_config(None, ["method.name=fedex-lora", f"method.rank={RANK}", f"method.alpha={ALPHA}"])
    method = get_method(cfg)
    torch.manual_seed(0)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=97, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                                    num_labels=3, pad_token_id=0)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = method.build(gpt2, ["c_attn"], ["score"]).eval()  # Conv1D 32 -> 96, stored (d_in, d_out)
    layer = next(iter(lora_layers(model).values()))
    assert layer.fan_in_fan_out and tuple(layer.get_base_layer().weight.shape) == (32, 96)
    state = method.initial_global(model)
    assert tuple(state[next(k for k in state if k.endswith(".w0_delta"))].shape) == (96, 32)
    _check_fedex_orientation(method, model, state)


# ----------------------------------------------------------------------------- FLoRA stacking scale


def test_flora_stacking_scale_with_heterogeneous_ranks():
    gen = torch.Generator().manual_seed(4)
    ranks = [1, 2, 4]
    a_n = [torch.randn(r, 32, generator=gen) for r in ranks]
    b_n = [torch.randn(48, r, generator=gen) for r in ranks]
    a_stack, b_stack = stack_uploads(a_n, b_n, P, ALPHA)
    assert a_stack.shape == (7, 32) and b_stack.shape == (48, 7)
    expected = sum(p * (ALPHA / r) * b.double() @ a.double() for p, r, a, b in zip(P, ranks, a_n, b_n))
    assert torch.allclose(b_stack @ a_stack, expected, atol=1e-10)
    one_scale = sum(p * (ALPHA / 4) * b.double() @ a.double() for p, a, b in zip(P, a_n, b_n))
    assert not torch.allclose(b_stack @ a_stack, one_scale, atol=1e-3)  # a single shared scale is wrong


def test_flora_clients_train_a_fresh_lora_of_their_own_rank():
    cfg, method, model = setup("flora-hetero")
    state = wire_state(method.initial_global(model))
    for pid, r_k in [(0, 1), (1, 2), (2, 4), (3, 1)]:
        method.client_load(model, state, ClientInfo(pid, 1), {})
        local_train(model, seed=pid)
        up = method.upload(model)
        for name, layer in lora_layers(model).items():
            assert up[name + ".lora_A.weight"].shape[0] == r_k and up[name + ".lora_B.weight"].shape[1] == r_k
            assert layer.scaling["default"] == ALPHA / r_k
            assert float(layer.lora_A["default"].weight[r_k:].detach().abs().sum()) == 0.0  # the padding stays exactly 0
            assert float(layer.lora_B["default"].weight[:, r_k:].detach().abs().sum()) == 0.0


# ----------------------------------------------------------------------------- communication = formula


NPY_HEADER = 128  # np.save: magic + version + header length + the padded header dict (64-byte aligned)


def test_flower_array_overhead_is_the_npy_header():
    from flwr.app import Array

    for shape in [(4, 32), (48, 4), (3,), (384, 384)]:
        arr = np.zeros(shape, dtype=np.float32)
        assert len(Array.from_numpy_ndarray(arr).data) == arr.nbytes + NPY_HEADER
    rec = to_record({"ab": torch.zeros(4, 32), "head/c": torch.zeros(3)})
    assert rec.count_bytes() == 4 * (128 + 3) + 2 * NPY_HEADER + len("ab") + len("head/c")


def _layer_dims(model):
    return {name: (m.out_features, m.in_features) for name, m in _target_modules(model).items()}


def _formula(method, dims, r, rk=None, round_ranks=None):
    """Numbers per client per round (up, down): the method's own declared formula, summed over layers."""
    per = [method.wire_numel(m, n, r, rk, round_ranks) for m, n in dims.values()]
    extra_up, extra_down = method.wire_extra_numel()
    return sum(u for u, _ in per) + extra_up, sum(d for _, d in per) + extra_down


def test_declared_formulas_are_the_published_ones():
    """Each method's ``wire_numel`` against baselines.md section 3 / method.md 5.2, written out once here."""
    m, n, r = 48, 32, 4  # d_out, d_in
    k = min(m, n)
    published = {
        "florg": (r * k, r * k),
        "fedit": (r * (m + n), r * (m + n)),
        "federa": (r * (m + n), r * (m + n)),
        "ffa-lora": (r * m, r * m),
        "fedsa-lora": (r * n, r * n),
        "fedex-lora": (r * (m + n), r * (m + n) + m * n),
        "flora": (2 * (m + n), (m + n) * (2 + 4 + 8)),  # the stacked pair of ranks 2, 4, 8
    }
    methods = {name: get_method(load_config(None, [f"method.name={name}"])) for name in METHODS}
    assert {name: meth.wire_numel(m, n, r, 2 if name == "flora" else None, [2, 4, 8])
            for name, meth in methods.items()} == published
    dense = get_method(load_config(None, ["method.name=flora", "method.flora.downlink=dense"]))
    assert dense.wire_numel(m, n, r, 2, [2, 4, 8]) == (2 * (m + n), m * n)
    assert methods["flora"].wire_numel(m, n, r, 2, []) == (2 * (m + n), 0)  # round 1: nothing stacked yet
    florg_hetero = get_method(load_config(None, ["method.name=florg", "method.client_ranks=[2,4,8]"]))
    assert [florg_hetero.wire_numel(m, n, 8, rk) for rk in (2, 4, 8)] == [(rk * k, rk * k) for rk in (2, 4, 8)]
    assert {name: meth.wire_extra_numel() for name, meth in methods.items()} == {
        name: (0, 1 if name == "flora" else 0) for name in METHODS}  # FLoRA's stack/round counter


def _payload_bytes(state):
    """``(4 x elements, overhead)`` of a state as Flower counts it; overhead = header + key per array."""
    rec = to_record(state)
    elements = sum(v.numel() for v in state.values())
    overhead = sum(NPY_HEADER + len(k.encode()) for k in state)
    assert rec.count_bytes() == 4 * elements + overhead
    return rec.count_bytes(), overhead


def _rank_of(method, pid):
    return method.client_rank(pid) if hasattr(method, "client_rank") and method.cfg.method.client_ranks else None


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
@pytest.mark.parametrize("label", ROWS)
def test_communication_measured_equals_formula(label, family):
    """Bytes of the real Flower payloads, every client, rounds 1 and 2, against the declared formula."""
    cfg, method, model = setup(label, family=family)
    dims = _layer_dims(model)
    n_layers = len(dims)
    # head weight + bias (2 arrays: 3 classes, or the QA span head's start and end), both directions, for every
    # method that shares the head; the causal LM has no head
    has_head = bool(FAMILY_MODELS[family][2])
    outputs = {"classification": 3, "extractive-qa": 2}.get(family, 0)
    head_numel = outputs * 32 + outputs if has_head else 0
    head_elems, head_arrays = (head_numel, 2) if has_head and method.shares_head else (0, 0)
    extra_arrays = tuple(int(x > 0) for x in method.wire_extra_numel())
    state = method.initial_global(model)
    local = {pid: {} for pid in range(3)}
    round_ranks = []  # ranks of the uploads the downlink carries (FLoRA's stacked pair): none in round 1
    for rnd in (1, 2):
        res = run_round(method, model, state, lambda model, info: None, server_round=rnd, clients=range(3),
                        weights=EXAMPLES, local=local)
        for pid, (down, upload) in enumerate(zip(res.received, res.uploads)):
            rk = _rank_of(method, pid)
            up_protocol, up_eval = split_eval(upload)
            f_up, f_down = _formula(method, dims, RANK, rk, round_ranks)
            up_bytes, up_over = _payload_bytes(up_protocol)
            down_bytes, down_over = _payload_bytes(down)
            assert up_bytes == 4 * (f_up + head_elems) + up_over
            assert down_bytes == 4 * (f_down + head_elems) + down_over
            # arrays per layer as the method declares them (so the overhead is fixed too), plus the head's
            per_layer_up, per_layer_down = method.arrays_per_layer
            assert len(up_protocol) == per_layer_up * n_layers + head_arrays + extra_arrays[0]
            assert len(down) == per_layer_down * n_layers + head_arrays + extra_arrays[1]
            if cfg.method.name == "fedsa-lora":  # evaluation-only B and head, counted apart from the protocol
                assert sum(v.numel() for v in up_eval.values()) == sum(RANK * m for m, _ in dims.values()) + head_numel
            else:
                assert up_eval == {}
            assert any(k.startswith(HEAD_PREFIX) for k in down) == (has_head and method.shares_head)
        round_ranks = [_rank_of(method, pid) or RANK for pid in range(3)]
        state = res.state


@pytest.mark.parametrize("label", ALL + list(EXTRA))
def test_every_method_trains_a_headless_causal_lm(label):
    """Instruction tuning: no head on the wire, the global model changes, the diagnostics are what it shows,
    and the trained global model computes a different loss than the pretrained one."""
    r = run_rounds(label, family="instruction")
    model, state = r["model"], r["state"]
    assert not any(k.startswith(HEAD_PREFIX) for k in state)
    assert not any(k.startswith(HEAD_PREFIX) for u in r["uploads"] for k in u)
    assert all(float(torch.linalg.matrix_norm(d)) > 0 for d in r["global_delta"].values())
    assert all(torch.isfinite(d).all() for d in r["global_delta"].values())
    _assert_diagnostics_match(r)
    batch = lm_batch(torch.Generator().manual_seed(123))
    with torch.no_grad():
        before = plain_llama()(**batch).loss
        after = model(**batch).loss
    assert torch.isfinite(after) and float(after) != float(before)


# ----------------------------------------------------------------------------- settings a method cannot honour


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("flora", "florg")])
def test_heterogeneous_ranks_are_refused_except_by_flora_and_florg(name):
    with pytest.raises(ConfigError, match="method.client_ranks"):
        get_method(load_config(None, [f"method.name={name}", "method.client_ranks=[2,4]"]))
    get_method(load_config(None, ["method.name=flora", "method.client_ranks=[2,4]"]))
    get_method(load_config(None, ["method.name=florg", "method.client_ranks=[2,4]"]))


@pytest.mark.parametrize("name", ["federa", "fedex-lora", "flora"])
def test_methods_that_change_w0_accept_half_precision_bases(name):
    """W0 is rebuilt as W0_pretrained + C every round: one rounding, no drift (tests/test_precision.py)."""
    for dtype in ("bfloat16", "float16"):
        assert get_method(load_config(None, [f"method.name={name}", f"model.dtype={dtype}"])).name == name


def test_other_refusals():
    with pytest.raises(ConfigError, match="reset_optimizer"):
        get_method(load_config(None, ["method.name=flora", "train.reset_optimizer=false"]))
    with pytest.raises(ConfigError, match="valid methods: .*fedex-lora.*fedit.*flora"):
        get_method(load_config(None, ["method.name=fedavg"]))
    with pytest.raises(ConfigError, match="method.federa.mode"):
        load_config(None, ["method.federa.mode=svd"])
    with pytest.raises(ConfigError, match="'init_only_fedavg' was renamed 'fedavg'"):
        load_config(None, ["method.federa.mode=init_only_fedavg"])
    with pytest.raises(ValueError, match="rank 40 is larger"):
        setup("fedit", "method.rank=40")
    # FLoRA's stacked downlink needs every client every round, and a lossless wire
    with pytest.raises(ConfigError, match=r"federation.fraction_train.*downlink='dense'"):
        get_method(load_config(None, ["method.name=flora", "federation.fraction_train=0.5"]))
    with pytest.raises(ConfigError, match=r"federation.wire_dtype.*downlink='dense'"):
        get_method(load_config(None, ["method.name=flora", "federation.wire_dtype=bfloat16"]))
    get_method(load_config(None, ["method.name=flora", "method.flora.downlink=dense", "federation.fraction_train=0.5"]))
    with pytest.raises(ConfigError, match="method.client_ranks"):
        get_method(load_config(None, ["method.name=florg", "method.client_ranks=[2,4]", "privacy.mode=local"]))


def test_registry_rows_name_the_relabelled_baselines():
    rows = {row.label: row for row in compare_rows()}
    assert get_method(load_config(None, ["method.name=federa"])).options.mode == "fedavg"  # the published rule
    assert (rows["federa"].display_name, rows["federa"].options) == ("FeDeRA", {})
    assert (rows["federa-svd"].display_name, rows["federa-svd"].options) == ("FeDeRA init + FlexLoRA SVD",
                                                                             {"mode": "product_svd"})
    assert get_method(load_config(None, ["method.name=flora"])).options.downlink == "stacked"  # FLoRA's protocol
    assert (rows["flora-dense"].display_name, rows["flora-dense"].options) == ("FLoRA (dense downlink)",
                                                                               {"downlink": "dense"})
    assert rows["florg-hetero"].shared == rows["flora-hetero"].shared == {"client_ranks": [2, 4, 8]}
    assert get_method(load_config(None, ["method.name=fedsa-lora"])).headline == "personal"
    assert {get_method(load_config(None, [f"method.name={n}"])).headline for n in ALL if n != "fedsa-lora"} == {"global"}


# ----------------------------------------------------------------------------- FLoRA's stacked downlink


def test_flora_stacked_clients_rebuild_the_servers_correction():
    r = run_rounds("flora-hetero")
    prev, state = r["previous"], r["state"]
    assert int(state["stack/round"][0]) == 2 and int(prev["stack/round"][0]) == 1
    down = r["received"][0]  # round 2's downlink: round 1's stacked pair, ranks 1 + 2 + 4
    names = [k[: -len(".stack_A")] for k in down if k.endswith(".stack_A")]
    assert names and not any(k.endswith(".w0_delta") or k.startswith("server/") for k in down)
    for name in names:
        assert down[name + ".stack_A"].shape[0] == down[name + ".stack_B"].shape[1] == 7
        for pid in range(3):  # every client merged pair 1 into its own C: the server's C after round 1
            assert torch.equal(r["local"][pid][w0_key(name)], prev["server/" + w0_key(name)])
        c_new = state["server/" + w0_key(name)].double()
        merged = prev["server/" + w0_key(name)].double() + state[name + ".stack_B"].double() @ state[name + ".stack_A"].double()
        assert torch.allclose(c_new, merged, atol=1e-6)  # C <- C + B_stack A_stack, with the pair it sends
    assert all(int(r["local"][pid]["flora/merged"][0]) == 1 for pid in range(3))


def test_flora_stacked_run_refuses_to_resume(tmp_path):
    """``florg run --resume`` restores the server, not the clients' W0 corrections: refused, run marked failed."""
    from types import SimpleNamespace

    from florg.fl.server_app import _resume
    from florg.run.checkpoint import save_checkpoint
    from florg.run.rundir import RunDir

    for downlink, refused in (("stacked", True), ("dense", False)):
        cfg, method, model = setup("flora", f"method.flora.downlink={downlink}", f"out_dir={tmp_path}",
                                   f"name={downlink}")
        run_dir = RunDir.create(cfg)
        state = method.initial_global(model)
        save_checkpoint(run_dir.path, {"round": 1, "state": state, "cumulative": {"bytes_up": 0, "bytes_down": 0},
                                       "node_partition": {}, "config": cfg.to_dict(), "privacy": None})
        exp = SimpleNamespace(method=method, initial_state=state)
        if refused:
            with pytest.raises(ConfigError, match=r"--resume.*downlink='dense'"):
                _resume(run_dir, exp, True)
            assert json.loads((run_dir.path / "status.json").read_text())["status"] == "failed"
        else:
            assert _resume(run_dir, exp, True).done == 1


def test_flora_stacked_client_merges_each_pair_once_and_refuses_a_gap():
    r = run_rounds("flora")
    method, model = r["method"], r["model"]
    down = method.client_downlink(wire_state(r["state"]), 0)  # pair 2
    local = {k: v.clone() for k, v in r["local"][0].items()}  # has merged pair 1
    method.client_load(model, down, ClientInfo(0, 3), local)
    once = {k: v.clone() for k, v in local.items()}
    method.client_load(model, down, ClientInfo(0, 4), local)  # the same pair again (e.g. after a failed round)
    assert all(torch.equal(once[k], local[k]) for k in once) and int(local["flora/merged"][0]) == 2
    for name, layer in lora_layers(model).items():  # W0 = W0_pretrained + the server's C
        assert torch.allclose(method.base_delta(layer), r["state"]["server/" + w0_key(name)], atol=1e-6)
    with pytest.raises(ValueError, match="missed a round's downlink.*downlink='dense'"):
        method.client_load(model, down, ClientInfo(5, 3), {})  # a client that never saw pair 1


# ----------------------------------------------------------------------------- the head's own learning rate


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
@pytest.mark.parametrize("label", ROWS)
def test_head_trains_at_train_head_lr_and_the_adapter_at_train_lr(label, family):
    """``train.head_lr``: the optimizer the ClientApp builds has the adapter's trainable parameters at the
    adapter's lr and every other trainable one (head, ``modules_to_save``) at the head's; one SGD step
    moves each by its own lr times its gradient."""
    from florg.train import make_optimizer, param_groups, round_head_lr, round_lr

    cfg, method, model = setup(label, "train.lr=0.003", "train.head_lr=0.07", "train.optimizer=sgd", family=family)
    assert round_lr(cfg.train, 1) == 0.003 and round_head_lr(cfg.train, 1) == 0.07
    method.client_load(model, method.client_downlink(wire_state(method.initial_global(model)), 0), ClientInfo(0, 1), {})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapter = {n for n in trainable if method.is_adapter_param(n)}
    head = set(trainable) - adapter
    assert adapter, "every method trains an adapter"
    assert bool(head) == (family != "instruction"), head  # heads: classifier / qa_outputs; the causal LM has none
    groups = param_groups(model.named_parameters(), 0.003, 0.07, method.is_adapter_param)
    opt = make_optimizer(groups, cfg.train, 0.003)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert {lrs[id(trainable[n])] for n in adapter} == {0.003}
    assert {lrs[id(trainable[n])] for n in head} <= {0.07} and len(lrs) == len(trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    model.train()
    loss = model(**FAMILY_MODELS[family][3](torch.Generator().manual_seed(0))).loss
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainable.items() if p.grad is not None}
    opt.step()
    for n, p in trainable.items():
        if n in grads:
            lr = 0.07 if n in head else 0.003
            assert torch.allclose(before[n] - p.detach(), lr * grads[n], atol=1e-7), n


def test_head_lr_default_is_the_adapter_lr_and_follows_its_schedule():
    from florg.train import round_head_lr, round_lr

    cfg = load_config(None, ["train.lr=0.01", "train.lr_schedule=cosine", "train.rounds=4"])
    assert [round_head_lr(cfg.train, t) for t in (1, 3)] == [round_lr(cfg.train, t) for t in (1, 3)]
    cfg = load_config(None, ["train.lr=0.01", "train.head_lr=0.03", "train.lr_schedule=cosine", "train.rounds=4"])
    assert round_head_lr(cfg.train, 1) == pytest.approx(0.03)
    assert round_head_lr(cfg.train, 3) == pytest.approx(3 * round_lr(cfg.train, 3))


# ----------------------------------------------------------------------------- optimizer state across rounds


@pytest.mark.parametrize("label", ROWS)
def test_optimizer_state_carried_across_rounds_works_or_is_refused(label):
    """``train.reset_optimizer = false``: each client's AdamW state goes into its own state and comes back
    next round (as the ClientApp does); FLoRA, whose LoRA is fresh every round, refuses it."""
    from florg.fl.client_app import _load_optimizer, _save_optimizer
    from florg.fl.records import from_record
    from florg.train import make_optimizer, param_groups

    name, extra = EXTRA.get(label, (label, []))
    if name == "flora":
        with pytest.raises(ConfigError, match="train.reset_optimizer"):
            get_method(load_config(None, [f"method.name={name}", *extra, "train.reset_optimizer=false"]))
        return
    cfg, method, model = setup(label, "train.reset_optimizer=false")
    state = method.initial_global(model)
    local, saved = {pid: {} for pid in range(3)}, {}
    for rnd in (1, 2):
        uploads = []
        for pid in range(3):
            info = ClientInfo(pid, rnd)
            method.client_load(model, method.client_downlink(wire_state(state), pid), info, local[pid])
            opt = make_optimizer(param_groups(model.named_parameters(), 0.05, 0.2, method.is_adapter_param), cfg.train, 0.05)
            if pid in saved:
                _load_optimizer(opt, saved[pid], [0.04, 0.1])  # round 2's lrs (e.g. a schedule) replace the saved ones
                assert [g["lr"] for g in opt.param_groups] == [0.04, 0.1]
            gen = torch.Generator().manual_seed(10 * rnd + pid)
            model.train()
            for _ in range(3):
                batch = {"input_ids": torch.randint(1, 97, (8, 10), generator=gen),
                         "labels": torch.randint(0, 3, (8,), generator=gen)}
                opt.zero_grad()
                model(**batch).loss.backward()
                opt.step()
            model.eval()
            saved[pid] = _save_optimizer(opt)
            up = method.client_upload(model, info, local[pid])
            assert method.check_upload(up, state, 1e4) == []
            uploads.append(up)
        state, diag = method.aggregate(uploads, EXAMPLES, state)
        assert all(np.isfinite(v) for v in diag.values())
    for pid in range(3):  # the moments were carried: AdamW counted the steps of both rounds
        steps = {float(v) for k, v in from_record(saved[pid]).items() if k.endswith(".step")}
        assert steps == {6.0}, steps


def test_florg_align_initial_marker_is_server_only():
    _, method, model = setup("florg", "method.florg.align_initial=false")
    state = method.initial_global(model)
    assert "server/florg.initial" in state and "server/florg.initial" not in wire_state(state)
    method.load_global(model, state)  # the server's own evaluation model ignores it
    _, default, model2 = setup("florg")
    assert not any(k.startswith("server/") for k in default.initial_global(model2))  # unchanged by default


def test_the_round_driver_checks_uploads_as_the_server_does(monkeypatch):
    cfg, method, model = setup("florg")
    state = method.initial_global(model)
    real = method.client_upload

    def bad_upload(model, info, local):
        up = real(model, info, local)
        if info.partition_id == 1:
            key = sorted(up)[0]
            up[key] = up[key].clone().fill_(float("nan"))
        return up

    monkeypatch.setattr(method, "client_upload", bad_upload)
    with pytest.raises(ValueError, match=r"client 1's upload is invalid"):
        run_round(method, model, state, lambda model, info: None, server_round=1, clients=range(3), weights=EXAMPLES)
    with pytest.raises(ValueError, match=r"3 clients but 2 weights"):
        run_round(method, model, state, lambda model, info: None, server_round=1, clients=range(3), weights=[1, 2])

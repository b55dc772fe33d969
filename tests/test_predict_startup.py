"""``florg predict`` start-up habits: bad arguments fail before torch is imported; the bases come from the cache.

* :func:`florg.run.predict.check_request` reads only ``config.toml`` (no torch, no ``load_config``):
  a fresh ``florg predict`` process with a bad argument exits 2 without importing torch & co.
* :func:`florg.run.predict.load_run_model` takes FLoRG's bases from the experiment cache's bases
  file instead of drawing them (a QR per layer): the loaded bases are bit-identical to a fresh
  draw, and the model predicts exactly what the drawing path predicts.
"""

import contextlib
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import florg
import florg.run.predict as predict_mod
from florg.config import load_config
from florg.core import make_bases
from florg.run.experiment import get_experiment
from florg.run.outputs import describe_adapters
from florg.run.rundir import RunDir
from helpers import save_tiny_encoder

TEXTS = ["a domestic animal kept for companionship", "a plant with green leaves", "food made from flour"]
HEAVY = ("torch", "transformers", "peft", "datasets", "flwr", "numpy")


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random BERT encoder (with its pooler) and MiniLM's tokenizer (helpers.save_tiny_encoder)."""
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_encoder):
    """A finished FLoRG classification run directory (random adapter weights) with its own cache folder."""
    tmp = tmp_path_factory.mktemp("predict-startup")
    cfg = load_config(None, [f"model.name={tiny_encoder}", "data.num_clients=2", "data.max_train_examples=40",
                             "data.max_test_examples=16", "model.max_length=24", f"cache.dir={tmp / 'cache'}"])
    exp = get_experiment(cfg)  # builds with the bases store: writes the bases file, as a run does
    exp.method.load_global(exp.model, exp.initial_state)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in exp.model.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    run_dir = RunDir.create(cfg, tmp / "run")
    exp.method.save_artifacts(exp.model, run_dir.path)
    describe_adapters(exp, run_dir.path, {"metric": "accuracy", "accuracy_before": 1.0, "accuracy_after": 0.5})
    assert list((tmp / "cache").glob("bases-*.safetensors"))
    return run_dir.path, tmp / "cache"


# ------------------------------------------------------------------------------ fail fast
@pytest.mark.parametrize("task", ["squad", " SQuAD:/x.json", "wordnet-qa", "wordnet-define", "instruct:/d.jsonl",
                                  "instruct:hub:tatsu-lab/alpaca", "wordnet", "wordnet-nouns", "glue/rte",
                                  "local:/data.csv", "/some/folder", "squadron"])
def test_the_torch_free_family_lookup_agrees_with_the_task_families(task):
    from florg.tasks import family_class, task_forms

    assert predict_mod.family_name(task) == family_class(task).name
    for form in task_forms():
        assert predict_mod.family_name(form) == family_class(form).name, form


_PROBE = """
import atexit, sys
heavy = {heavy!r}
atexit.register(lambda: sys.stderr.write("\\nHEAVY=" + ",".join(m for m in heavy if m in sys.modules) + "\\n"))
sys.argv = ["florg", "predict", *{args!r}]
from florg.cli.main import main
main()
"""


def _florg_predict_in_a_fresh_process(args):
    code = _PROBE.format(heavy=HEAVY, args=[str(a) for a in args])
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = res.stderr.strip().splitlines()
    heavy = next(line for line in reversed(lines) if line.startswith("HEAVY="))
    return res.returncode, "\n".join(line for line in lines if line and not line.startswith("HEAVY=")), heavy


def test_a_bad_argument_fails_in_a_fresh_process_without_importing_torch(run, tmp_path):
    path, _ = run
    relabelled = {}
    for name, task in (("qa", "wordnet-qa"), ("instruct", "wordnet-define")):
        relabelled[name] = tmp_path / name  # only config.toml is read before the model loads
        shutil.copytree(path, relabelled[name])
        text = (relabelled[name] / "config.toml").read_text()
        (relabelled[name] / "config.toml").write_text(re.sub(r'(?m)^task = ".*"$', f'task = "{task}"', text, count=1))
    incomplete = tmp_path / "incomplete"
    shutil.copytree(path, incomplete)
    shutil.rmtree(incomplete / "adapter")
    cases = [
        ([path, "a", "--top-k", "0"], "--top-k"),
        ([path, "a", "b", "--pair", "x"], "--pair"),
        ([relabelled["qa"], "what is a dog?"], "--context"),
        ([relabelled["instruct"], "define dog", "--max-new-tokens", "0"], "--max-new-tokens"),
        ([incomplete, "a"], "has not completed"),
        ([tmp_path / "missing", "a"], "not a directory"),
    ]
    for args, needle in cases:
        rc, err, heavy = _florg_predict_in_a_fresh_process(args)
        assert rc == 2, (args, err)
        assert needle in err and len(err.splitlines()) == 1, (args, err)
        assert heavy == "HEAVY=", (args, heavy)  # nothing heavy was imported, so no model was loaded either


def test_check_request_imports_nothing_heavy(run):
    path, _ = run
    code = ("import sys; from florg.run.predict import check_request; "
            f"print(check_request({str(path)!r}, ['a'])); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == ["classification", ""]


# ------------------------------------------------------------------------------ stored bases
def _bases(model):
    return {name: layer.basis_pair("default") for name, layer in florg.florg_layers(model).items()}


def _slow_load(path, monkeypatch):
    """load_run_model as before the bases store: every layer draws its bases (make_bases)."""
    with monkeypatch.context() as m:
        m.setattr(predict_mod, "_stored_bases", lambda *args: contextlib.nullcontext())
        return florg.load_run_model(path)


def _no_draws(monkeypatch):
    import florg.adapters.florg.stored_bases as stored

    def forbidden(*args, **kwargs):
        raise AssertionError("a basis was drawn instead of read from the bases file")

    monkeypatch.setattr(stored, "make_bases", forbidden)


def test_stored_bases_are_bit_identical_and_the_model_predicts_the_same(run, monkeypatch):
    path, _ = run
    slow = _slow_load(path, monkeypatch)
    with monkeypatch.context() as m:
        _no_draws(m)
        fast = florg.load_run_model(path)  # every basis from the file the run's build wrote
    slow_bases, fast_bases = _bases(slow.model), _bases(fast.model)
    assert fast_bases.keys() == slow_bases.keys() and fast_bases
    cfg = slow.cfg
    for name, (left, right) in fast_bases.items():
        s_left, s_right = slow_bases[name]
        for got, want in ((left, s_left), (right, s_right)):
            assert got.dtype == want.dtype and got.stride() == want.stride()
            assert torch.equal(got, want), name
        drawn = make_bases(left.shape[0], right.shape[1], seed=cfg.seed, layer_name=name, dtype=left.dtype)
        assert torch.equal(left, drawn[0]) and torch.equal(right, drawn[1]), name
    enc = fast.tokenizer(TEXTS, truncation=True, max_length=cfg.model.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(fast.model(**enc).logits, slow.model(**enc).logits)
    assert florg.predict(fast, TEXTS, top_k=2) == florg.predict(slow, TEXTS, top_k=2)


def test_a_missing_bases_file_is_drawn_once_and_stored(run, monkeypatch):
    path, cache = run
    for f in cache.glob("bases-*.safetensors"):
        f.unlink()
    first = florg.load_run_model(path)  # a miss: drawn, then stored for the next load
    assert list(cache.glob("bases-*.safetensors"))
    with monkeypatch.context() as m:
        _no_draws(m)
        second = florg.load_run_model(path)
    for name, (left, right) in _bases(second.model).items():
        want = _bases(first.model)[name]
        assert torch.equal(left, want[0]) and torch.equal(right, want[1])
    assert florg.predict(second, TEXTS) == florg.predict(first, TEXTS)


def test_an_unwritable_cache_only_costs_the_draws(run, monkeypatch, caplog):
    path, cache = run
    import florg.adapters.florg.stored_bases as stored

    for f in cache.glob("bases-*.safetensors"):
        f.unlink()

    def cannot_write(*args, **kwargs):
        raise PermissionError("read-only cache")

    monkeypatch.setattr(stored.tempfile, "mkstemp", cannot_write)
    with caplog.at_level("WARNING", logger="florg.adapters.florg.stored_bases"):
        model = florg.load_run_model(path)
    assert any("could not store new bases" in r.getMessage() for r in caplog.records)
    assert not list(cache.glob("bases-*.safetensors"))
    assert [r["label"] for r in florg.predict(model, TEXTS)] == \
        [r["label"] for r in florg.predict(_slow_load(path, monkeypatch), TEXTS)]


def test_plain_peft_loading_draws_the_same_bases(run, tiny_encoder):
    """``PeftModel.from_pretrained(base, adapter_dir)`` after ``import florg`` (no store) is unchanged."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    path, _ = run
    labels = json.loads((path / "adapter" / "labels.json").read_text())["id2label"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=len(labels))
    plain = PeftModel.from_pretrained(base, str(path / "adapter"))
    fast = florg.load_run_model(path)
    plain_bases, fast_bases = _bases(plain), _bases(fast.model)
    assert plain_bases.keys() == fast_bases.keys() and plain_bases
    for name, (left, right) in plain_bases.items():
        assert torch.equal(left, fast_bases[name][0]) and torch.equal(right, fast_bases[name][1]), name


def test_the_bases_file_key_ignores_unrelated_code(tmp_path, monkeypatch):
    """A run's bases file is found after a change to florg's data/task/model code (not to the draw)."""
    import florg.run.cache as cache_mod

    cfg = load_config(None, [f"cache.dir={tmp_path}"])
    before = cache_mod.bases_path(cfg, ["query", "value"])
    monkeypatch.setattr(cache_mod, "_source_digest", lambda: "another data/task/model code")
    assert cache_mod.bases_path(cfg, ["query", "value"]) == before
    monkeypatch.setattr(cache_mod, "_bases_digest", lambda: "another make_bases or torch")
    assert cache_mod.bases_path(cfg, ["query", "value"]) != before

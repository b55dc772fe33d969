"""The on-disk experiment cache: a later process loads the tokenised data and FLoRG's bases instead of
recomputing them, and builds exactly the experiment an uncached build gives."""

import pytest
import torch

from florg.adapters import BasisStore, basis_store
from florg.config import load_config
from florg.core import make_bases
from florg.run import cache as cache_mod
from florg.run.experiment import build_experiment
from helpers import TINY_OVERRIDES

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TINY = [*TINY_OVERRIDES, "data.max_train_examples=150", "data.max_test_examples=30", "data.validation_fraction=0.2"]


def _cfg(tmp_path, *extra, enabled=True):
    return load_config(None, [*TINY, f"cache.dir={tmp_path / 'cache'}", f"cache.enabled={str(enabled).lower()}", *extra])


def _rows(ds):
    return ds[:] if ds is not None else None


def _same_experiment(a, b):
    assert [_rows(p) for p in a.partitions] == [_rows(p) for p in b.partitions]
    assert _rows(a.test) == _rows(b.test) and _rows(a.validation) == _rows(b.validation)
    assert a.partition_summary == b.partition_summary and a.label_names == b.label_names
    assert a.initial_state.keys() == b.initial_state.keys()
    for key in a.initial_state:
        assert torch.equal(a.initial_state[key], b.initial_state[key]), key
    sa, sb = dict(a.model.named_buffers()), dict(b.model.named_buffers())
    assert sa.keys() == sb.keys()
    for key in sa:  # FLoRG's bases among them, in the same memory layout (kernels round by layout)
        assert torch.equal(sa[key], sb[key]) and sa[key].stride() == sb[key].stride(), key
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na


def test_second_build_loads_data_and_bases_and_equals_an_uncached_build(tmp_path, monkeypatch):
    uncached = build_experiment(_cfg(tmp_path, enabled=False))
    assert not (tmp_path / "cache").exists()  # cache.enabled=false writes nothing

    cold = build_experiment(_cfg(tmp_path))
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 2 and entries[0].startswith("bases-") and entries[1].startswith("data-")
    _same_experiment(uncached, cold)

    # A warm build must not load, partition or tokenise the data, nor draw bases.
    from florg.tasks.classification import ClassificationFamily

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(ClassificationFamily, "load_data", forbidden)
    monkeypatch.setattr(ClassificationFamily, "encode", forbidden)
    monkeypatch.setattr("florg.adapters.florg.stored_bases.make_bases", forbidden)
    warm = build_experiment(_cfg(tmp_path))
    _same_experiment(uncached, warm)
    assert len(warm.partitions) == 3 and warm.validation is not None


def test_the_key_follows_what_the_data_depends_on(tmp_path):
    family = __import__("florg.tasks", fromlist=["get_family"]).get_family
    base = _cfg(tmp_path)

    def key(*extra):
        cfg = _cfg(tmp_path, *extra)
        return cache_mod.DataCache(cfg, family(cfg)).key

    k0 = cache_mod.DataCache(base, family(base)).key
    for changed in (["seed=1"], ["data.alpha=0.1"], ["model.max_length=20"], ["model.name=smollm2"],
                    ["data.num_clients=4"]):
        assert key(*changed) != k0, changed
    for same in (["train.lr=0.1"], ["method.name=fedit"], ["eval.batch_size=8"], ["model.dtype=bfloat16"],
                 ["train.device=cpu"]):
        assert key(*same) == k0, same
    paths = {cache_mod.bases_path(_cfg(tmp_path, *extra), ["query", "value"])
             for extra in ([], ["model.dtype=bfloat16"], ["seed=2"])}
    assert len(paths) == 3
    assert cache_mod.bases_path(base, ["value", "query"]) == cache_mod.bases_path(base, ["query", "value"])


def test_an_unreadable_entry_is_rebuilt(tmp_path, caplog):
    cfg = _cfg(tmp_path)
    first = build_experiment(cfg)
    entry = next((tmp_path / "cache").glob("data-*"))
    for f in (entry / "partition_1").iterdir():  # damage one split
        f.unlink()
    with caplog.at_level("WARNING", logger="florg.run.cache"):
        again = build_experiment(cfg)
    assert any("ignoring the unreadable entry" in r.getMessage() for r in caplog.records)
    _same_experiment(first, again)
    assert (entry / "meta.json").is_file() and any((entry / "partition_1").iterdir())  # stored anew


def test_a_concurrent_writer_that_finished_first_wins(tmp_path):
    from florg.tasks import get_family

    cfg = _cfg(tmp_path)
    build_experiment(cfg)
    store = cache_mod.DataCache(cfg, get_family(cfg))
    data = store.load()
    assert data is not None
    assert store.save(data)  # the entry exists: the second writer discards its copy without error
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no temporary left


def test_basis_store_is_bit_identical_to_make_bases(tmp_path):
    path = tmp_path / "bases.safetensors"
    shapes = {"a.q": (12, 8), "a.v": (8, 20)}
    with basis_store(path) as store:
        drawn = {n: store.get(*s, seed=3, layer_name=n, dtype=torch.bfloat16) for n, s in shapes.items()}
    assert store.hits == 0 and path.is_file()
    reopened = BasisStore(path)
    for name, (d_out, d_in) in shapes.items():
        left, right = reopened.get(d_out, d_in, seed=3, layer_name=name, dtype=torch.bfloat16)
        ref_l, ref_r = make_bases(d_out, d_in, seed=3, layer_name=name, dtype=torch.bfloat16)
        assert torch.equal(left, ref_l) and torch.equal(right, ref_r)
        assert left.stride() == ref_l.stride() and right.stride() == ref_r.stride()  # L is column-major, as drawn
        assert left.data_ptr() % 64 == 0 and right.data_ptr() % 64 == 0  # not a view into the file
        assert torch.equal(left, drawn[name][0])
    assert reopened.hits == 2
    other = reopened.get(12, 8, seed=3, layer_name="a.q", dtype=torch.float32)  # another dtype: drawn, not mixed up
    assert other[0].dtype == torch.float32 and reopened.hits == 2
    reopened.save()
    assert len(BasisStore(path)._names) == 6  # both files' bases kept


def test_instruction_family_is_cached_and_a_changed_data_file_is_a_new_entry(tmp_path, monkeypatch):
    import json

    from florg.tasks import get_family
    from florg.tasks.instruction import InstructionFamily
    from helpers import save_tiny_llama

    llama = save_tiny_llama(tmp_path / "llama")
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Name the number {i}", "input": "", "output": f"number {i}"} for i in range(24)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = [f"data.task=instruct:{data}", f"model.name={llama}", "data.num_clients=3", "model.max_length=32"]
    uncached = build_experiment(_cfg(tmp_path, *extra, enabled=False))
    build_experiment(_cfg(tmp_path, *extra))

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    with monkeypatch.context() as m:
        m.setattr(InstructionFamily, "load_data", forbidden)
        m.setattr(InstructionFamily, "encode", forbidden)
        warm = build_experiment(_cfg(tmp_path, *extra))
    _same_experiment(uncached, warm)
    assert "reference" in warm.test.column_names  # the held-out split keeps the text generation needs

    cfg = _cfg(tmp_path, *extra)
    before = cache_mod.DataCache(cfg, get_family(cfg)).key
    data.write_text(data.read_text() + json.dumps({"instruction": "one more", "input": "", "output": "x"}) + "\n")
    assert cache_mod.DataCache(cfg, get_family(cfg)).key != before  # an edited data file is not served stale

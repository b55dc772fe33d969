"""Per-round overhead of a deployment's ClientApp: a fresh process per round, before and after the cache.

Flower 1.42's SuperNode starts one ``flwr-clientapp`` process per message, so every client pays
for Python, the imports and building the model and data in every round. This benchmark runs what
that process does for one training round, in fresh processes of its own:

1. start Python and import florg's ClientApp (torch, transformers, PEFT, Flower);
2. build the experiment (:func:`florg.run.experiment.get_experiment`): data, partitions,
   tokenisation, the model and its adapter (FLoRG's bases);
3. florg's ``train`` on a real training message of round 1 (partition 0): local training and the
   upload.

The overhead of a round is everything but step 3's training (steps 1 and 2, plus the interpreter's
start). Variants: the code at a given git revision (``--before REV``, e.g. the commit before the
cache), and this checkout with ``cache.enabled=false`` and with the cache (one cold process fills
it, then warm ones). CPU time (all threads, from ``getrusage``) is the main figure: it is what a
client pays and it is steady on a busy machine; wall time is shown too. Flower's own per-task cost
(the SuperNode starting the process, the FAB check, gRPC) comes on top, unchanged by florg.

``--bases`` additionally times FLoRG's bases for a Llama-3.2-1B shape (16 layers, q_proj and
v_proj) drawn afresh against loaded from the bases file.

Results: a table on stdout, ``benchmarks/results_round_overhead.json`` and the marked section
``round-overhead`` of ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import HERE, loadavg, log, machine_info, print_table, update_section

ROOT = HERE.parent

# The child: one ClientApp round in a fresh process. It runs against either code version (no new config keys
# unless asked), so it only uses what both have: load_config, get_experiment and the ClientApp's train.
CHILD = r"""
import json, os, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0, c0 = time.perf_counter(), cpu()
import torch
torch.set_num_threads(1)
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from florg.config import load_config
from florg.fl import client_app
from florg.fl.records import CONFIG_KEY, to_record
from florg.run.experiment import get_experiment
t1, c1 = time.perf_counter(), cpu()
cfg = load_config(None, json.loads(sys.argv[1]))
exp = get_experiment(cfg)
t2, c2 = time.perf_counter(), cpu()
for name in ("_task_id", "_run_id", "_node_id"):
    setattr(TaskIdentity, name, 1)
content = RecordDict({"arrays": to_record(exp.initial_state),
                      "config": ConfigRecord({"server-round": 1, "lr": 5e-3, CONFIG_KEY: cfg.to_json()})})
msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": cfg.data.num_clients},
              state=RecordDict(), run_config={})
reply = client_app.train(msg, ctx)
assert not reply.has_error(), reply.error.reason
t3, c3 = time.perf_counter(), cpu()
print("FLORG-CHILD " + json.dumps({"imports_wall": t1 - t0, "imports_cpu": c1 - c0, "build_wall": t2 - t1,
      "build_cpu": c2 - c1, "train_wall": t3 - t2, "train_cpu": c3 - c2,
      "loss": float(reply.content["metrics"]["train_loss"])}))
"""


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(src: Path, overrides: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One ClientApp round in a fresh process; its phases plus the whole process's wall and CPU time."""
    env = {**env, "PYTHONPATH": str(src)}
    c0, t0 = _children_cpu(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(overrides)], cwd=src, env=env,
                          capture_output=True, text=True, timeout=1800)
    wall, total_cpu = time.perf_counter() - t0, _children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({src}):\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FLORG-CHILD "))
    out = json.loads(line[len("FLORG-CHILD "):])
    out.update(process_wall=wall, process_cpu=total_cpu, overhead_wall=wall - out["train_wall"],
               overhead_cpu=total_cpu - out["train_cpu"])
    return out


def import_floor(env: dict[str, str], reps: int) -> dict[str, float]:
    """CPU and wall time of a process that only imports florg's ClientApp (Python, torch, transformers, PEFT,
    Flower) and exits: what any fresh ClientApp process pays before florg does anything."""
    cpu, wall = [], []
    for _ in range(reps):
        c0, t0 = _children_cpu(), time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1); import florg.fl.client_app"],
                       cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT / "src")}, check=True, capture_output=True)
        cpu.append(_children_cpu() - c0)
        wall.append(time.perf_counter() - t0)
    return {"cpu": statistics.median(cpu), "wall": statistics.median(wall)}


def checkout(rev: str, into: Path) -> Path:
    """The ``src`` folder of ``rev`` (git archive), for the 'before' variant."""
    into.mkdir(parents=True, exist_ok=True)
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def median_of(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def time_bases(cache_dir: Path) -> dict[str, Any]:
    """FLoRG bases of a Llama-3.2-1B shape (q_proj 2048 x 2048, v_proj 512 x 2048, 16 layers): drawn vs loaded."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from florg.adapters import BasisStore
    from florg.core import make_bases

    torch.set_num_threads(1)
    shapes = [(f"model.layers.{i}.self_attn.{p}", d_out, 2048) for i in range(16)
              for p, d_out in (("q_proj", 2048), ("v_proj", 512))]
    path = cache_dir / "bases-llama1b.safetensors"
    c0, t0 = time.process_time(), time.perf_counter()
    store = BasisStore(path)
    for name, d_out, d_in in shapes:
        store.get(d_out, d_in, seed=0, layer_name=name, dtype=torch.bfloat16)
    drawn = (time.perf_counter() - t0, time.process_time() - c0)
    store.save()
    c0, t0 = time.process_time(), time.perf_counter()
    warm = BasisStore(path)
    for name, d_out, d_in in shapes:
        warm.get(d_out, d_in, seed=0, layer_name=name, dtype=torch.bfloat16)
    loaded = (time.perf_counter() - t0, time.process_time() - c0)
    ref = make_bases(2048, 2048, seed=0, layer_name=shapes[0][0], dtype=torch.bfloat16)
    same = torch.equal(ref[0], warm.get(2048, 2048, seed=0, layer_name=shapes[0][0], dtype=torch.bfloat16)[0])
    return {"layers": len(shapes), "drawn_wall": drawn[0], "drawn_cpu": drawn[1], "loaded_wall": loaded[0],
            "loaded_cpu": loaded[1], "file_bytes": path.stat().st_size, "bit_identical": same}


def markdown(res: dict[str, Any], rows: list[list[str]]) -> str:
    m = res["machine"]
    lines = [
        "## Per-round overhead of a deployment client (`benchmarks/bench_round_overhead.py`)", "",
        f"Measured on {m['cpu_model']} ({m['logical_cpus']} logical CPUs), {res['date']}; load average "
        f"{' / '.join(f'{x:.2f}' for x in res['loadavg_start'])} at start, "
        f"{' / '.join(f'{x:.2f}' for x in res['loadavg_end'])} at end (a shared machine: wall times are inflated, "
        "CPU times are the guide). One fresh process per round, as Flower 1.42's SuperNode starts for every "
        f"message: the demo config (MiniLM, WordNet, {res['clients']} clients, {res['steps']} local steps of "
        f"batch {res['batch']}), partition 0, one torch thread; median of {res['reps']} processes. *Overhead* = the "
        "whole process minus its training and upload.", "",
        "| variant | overhead CPU s | overhead wall s | imports CPU s | build CPU s | training CPU s | whole process CPU s |",
        "|---|---|---|---|---|---|---|",
        *["| " + " | ".join(r) + " |" for r in rows], "",
    ]
    b, a = res["variants"].get("before"), res["variants"].get("cache-warm")
    if b and a:
        lines += [f"Per-round overhead: **{b['overhead_cpu']:.1f} s of CPU before, {a['overhead_cpu']:.1f} s after** "
                  f"({1 - a['overhead_cpu'] / b['overhead_cpu']:.0%} less); building the experiment went from "
                  f"{b['build_cpu']:.1f} s to {a['build_cpu']:.2f} s"
                  + (f"; a process that only imports the ClientApp (Python, torch, transformers, PEFT, Flower) and "
                     f"exits costs {res['import_floor']['cpu']:.1f} s of CPU here, so florg's own share of a round's "
                     f"overhead went from {b['overhead_cpu'] - res['import_floor']['cpu']:.1f} s to "
                     f"{a['overhead_cpu'] - res['import_floor']['cpu']:.1f} s" if "import_floor" in res else "")
                  + ". The rest is what a fresh process cannot avoid: Flower 1.42 keeps no ClientApp process alive "
                  "between messages (its subprocess executor starts `flwr-clientapp` per task; the warm-executor pools "
                  "exist only for the Kubernetes executor).", ""]
    if "bases" in res:
        x = res["bases"]
        lines += [f"FLoRG's bases for a Llama-3.2-1B shape ({x['layers']} layers, bfloat16, one thread): drawn "
                  f"{x['drawn_cpu']:.1f} s CPU ({x['drawn_wall']:.1f} s wall), loaded from the bases file "
                  f"{x['loaded_cpu']:.2f} s CPU ({x['loaded_wall']:.2f} s wall); file {x['file_bytes'] / 2**20:.0f} MiB; "
                  f"bit-identical: {'yes' if x['bit_identical'] else 'NO'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="git revision for the 'before' variant (e.g. main before the cache)")
    ap.add_argument("--reps", type=int, default=3, help="processes per variant (median)")
    ap.add_argument("--bases", action="store_true", help="also time FLoRG's bases for a Llama-3.2-1B shape")
    ap.add_argument("--set", action="append", default=[], help="extra config override (key=value)")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--json", default=str(HERE / "results_round_overhead.json"))
    ap.add_argument("--report-only", action="store_true", help="run nothing; rewrite the section from --json")
    args = ap.parse_args(argv)
    if args.report_only:
        res = json.loads(Path(args.json).read_text())
        report(res, args.results)
        return res

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               FLWR_DISABLE_UPDATE_CHECK="1")
    work = Path(tempfile.mkdtemp(prefix="florg-overhead-"))
    base = list(args.set)
    res: dict[str, Any] = {"machine": machine_info(), "loadavg_start": loadavg(), "reps": args.reps,
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "variants": {}}
    from florg.config import load_config

    cfg = load_config(None, base)
    res.update(clients=cfg.data.num_clients, steps=cfg.train.local_steps, batch=cfg.train.batch_size)
    try:
        plans: list[tuple[str, Path, list[str], int]] = []
        if args.before:
            plans.append(("before", checkout(args.before, work / "before"), base, args.reps))
        src = ROOT / "src"
        plans.append(("no-cache", src, [*base, "cache.enabled=false"], args.reps))
        cache = [*base, f"cache.dir={work / 'cache'}"]
        plans.append(("cache-cold", src, cache, 1))
        plans.append(("cache-warm", src, cache, args.reps))
        for name, where, overrides, reps in plans:
            runs = []
            for i in range(reps):
                log(f"{name}: process {i + 1}/{reps} ...")
                runs.append(run_child(where, overrides, env))
            res["variants"][name] = {**median_of(runs), "runs": runs}
        log("import floor ...")
        res["import_floor"] = import_floor(env, args.reps)
        if args.bases:
            log("bases for a Llama-3.2-1B shape: drawn vs loaded ...")
            res["bases"] = time_bases(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["loadavg_end"] = loadavg()
    res["before_rev"] = args.before
    Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    report(res, args.results)
    log(f"wrote {args.json} and the round-overhead section of {args.results}")
    return res


def report(res: dict[str, Any], results: str) -> None:
    labels = {"before": f"before ({res.get('before_rev')})", "no-cache": "this version, cache.enabled=false",
              "cache-cold": "this version, cache filled by this process", "cache-warm": "this version, cache warm"}
    rows = [[labels[n], f"{v['overhead_cpu']:.2f}", f"{v['overhead_wall']:.1f}", f"{v['imports_cpu']:.2f}",
             f"{v['build_cpu']:.2f}", f"{v['train_cpu']:.2f}", f"{v['process_cpu']:.2f}"]
            for n, v in res["variants"].items()]
    print_table(["variant", "overhead CPU s", "overhead wall s", "imports CPU s", "build CPU s", "training CPU s",
                 "process CPU s"], rows, title="per-round overhead of a fresh ClientApp process")
    update_section(results, "round-overhead", markdown(res, rows))


if __name__ == "__main__":
    main()

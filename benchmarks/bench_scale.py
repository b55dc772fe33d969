"""A thousand clients on one machine: FLoRG and FedIT in Flower's simulation engine.

Each run goes the way ``florg run`` goes (:func:`florg.run.experiment.get_experiment`, then
:func:`florg.fl.simulation.run_simulation_engine`: Ray, one simulated SuperNode per client) in a
fresh child process; this process samples the memory of the child's whole process tree (the
driver with the ServerApp and Flower's in-memory SuperLink, Ray's GCS and raylet, the client
workers) every ``--sample-s`` seconds with psutil.

Settings (the defaults; ``--quick`` shrinks them for a smoke test):

* ``data.task = wordnet-nouns``, ``data.num_clients = 1000``, Dirichlet ``alpha = 0.5``.
* ``data.max_train_examples = 20000`` (of 27,000): with the default 6,000, 1,000 clients would
  hold 6 examples each on average and the Dirichlet split leaves many with 1-2; 20,000 gives 20
  on average (the partitioner's minimum is 2 after it backs off from 10 and 5; see
  ``florg.data.partition``), about what a client sees in one round here.
* ``federation.fraction_train = 0.1`` (100 clients per round), 3 rounds.
* ``train.local_steps = 2``, ``train.batch_size = 8``: each sampled client runs 2 AdamW steps
  of 8 examples, so that 300 client updates per run fit in a few minutes on 2 cores.
* ``federation.client_cpus = 1``, ``federation.backend_cpus = 2`` (explicit Ray resources: two
  client workers at a time on a 2-core machine).
* ``cache.enabled = true`` with a fresh cache folder for the benchmark: the first run builds the
  data cold (the partition time reported), the Ray workers and the later runs load it.

Runs: FLoRG and FedIT with 100 participants per round (N * r = 400 >= k = 384 for MiniLM, so
FLoRG's server takes the Gram path), then FLoRG with ``fraction_train`` 0.005 and 0.02 of the
same 1000 clients (N = 5 and 20, thin path) for the aggregation diagnostics ``tail_energy`` and
``round_rel_error`` against N.

Per run: peak RSS of the whole process tree (the sum over processes, so pages shared between
processes count once per process: an upper bound), the driver's own peak, the driver's RSS at the
end of each round (growth across rounds = per-client state kept), the cold data build and its
partitioning step, the partition-id query of round 1 (the server asks every node once, 64 at a
time, to sample reproducibly), wall time per round, the server's aggregation time and the path it
took (recorded from ``florg.core.validation``), bytes per round. The accuracy barely moves with 2
local steps and 3 rounds; this measures the machinery, not learning.

Results: a table on stdout, ``benchmarks/results/scale.json`` and the marked section ``scale`` of
``benchmarks/RESULTS.md`` (``run_all.py`` keeps marked sections when it rewrites the file)::

    .venv/bin/python -m benchmarks.bench_scale              # about 25-30 minutes on a busy 2-core machine
    .venv/bin/python -m benchmarks.bench_scale --quick      # 60 clients, smoke test, nothing committed
    .venv/bin/python -m benchmarks.bench_scale --report-only   # rewrite the section from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import HERE, fmt_bytes, loadavg, log, machine_info, print_table, update_section, write_json

ROOT = HERE.parent
SECTION = "scale"
JSON_PATH = HERE / "results" / "scale.json"
CHILD_TAG = "FLORG-SCALE "
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "TOKENIZERS_PARALLELISM": "false"}


# --------------------------------------------------------------------------- the child: one run


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One run the way ``florg run`` does it; measurements the driver process can take itself."""
    import psutil

    import florg.run.experiment as experiment
    from florg.config import load_config
    from florg.fl.simulation import run_simulation_engine
    from florg.fl.strategy import AdapterStrategy
    from florg.run.rundir import RunDir

    out: dict[str, Any] = {"partition_s": None}
    # Time the partitioning step of the data build (loading WordNet + the Dirichlet split).
    load_and_partition = experiment._load_and_partition

    def timed_partition(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return load_and_partition(*args, **kwargs)
        finally:
            out["partition_s"] = time.perf_counter() - t0

    experiment._load_and_partition = timed_partition
    # Record which path the server's aggregation took (thin or Gram), layer by layer.
    paths: list[dict[str, Any]] = []
    try:
        import importlib

        checks = importlib.import_module("florg.core.validation")  # where each layer's path is chosen
        choose = checks._choose_path

        def recorded(path: Any, total_rank: int, k: int, layer: str) -> str:
            chosen = choose(path, total_rank, k, layer)
            paths.append({"path": chosen, "sum_r": int(total_rank), "k": int(k)})
            return chosen

        checks._choose_path = recorded
    except (ImportError, AttributeError):  # a refactored module: the path is then inferred (sum r_n < k)
        pass
    # Time the partition-id query (the server asks every node it has not seen once).
    query = AdapterStrategy._partition_ids
    queries: list[dict[str, Any]] = []

    def timed_query(self: AdapterStrategy, grid: Any, nodes: list[int]) -> dict[int, int]:
        unknown = sum(n not in self._node_partition for n in nodes)
        t0 = time.perf_counter()
        res = query(self, grid, nodes)
        if unknown:
            queries.append({"asked": unknown, "seconds": time.perf_counter() - t0,
                            "known_after": len(self._node_partition)})
        return res

    AdapterStrategy._partition_ids = timed_query  # type: ignore[method-assign]

    me = psutil.Process()

    def tree_rss() -> int:
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    cfg = load_config(None, spec["sets"])
    t0 = time.perf_counter()
    exp = experiment.get_experiment(cfg)
    out["build_s"] = time.perf_counter() - t0
    sizes = [len(p) for p in exp.partitions]
    out["partition_sizes"] = {"min": min(sizes), "max": max(sizes), "mean": sum(sizes) / len(sizes),
                              "empty": sum(s == 0 for s in sizes), "total": sum(sizes)}
    out["driver_rss_after_build"] = me.memory_info().rss
    run_dir = RunDir.create(cfg, spec["run_dir"])
    marks: list[dict[str, Any]] = []

    def reporter(row: dict[str, Any]) -> None:
        marks.append({"round": row["round"], "driver_rss": me.memory_info().rss, "tree_rss": tree_rss(),
                      "paths": sorted({p["path"] for p in paths}), "sum_r": sorted({p["sum_r"] for p in paths})})
        paths.clear()
        log(f"  round {row['round']}: accuracy {row.get('test_accuracy', float('nan')):.4f}, "
            f"participants {row.get('participants', 0)}, wall {row['timing']['wall_seconds']:.1f} s")

    t0 = time.perf_counter()
    summary = run_simulation_engine(cfg, run_dir, reporter=reporter)
    out["run_s"] = time.perf_counter() - t0
    out["summary"] = summary
    out["queries"] = queries
    out["marks"] = marks
    out["rows"] = run_dir.read_metrics()
    out["driver_peak_rss"] = _vm_hwm()
    return out


def query_child(batch: int, timeout: float, clients: int) -> dict[str, Any]:
    """Only the partition-id query of ``clients`` simulated nodes, ``batch`` queries at a time: wall and driver CPU."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from florg.config import load_config
    from florg.fl import strategy
    from florg.fl.client_app import app as client_app
    from florg.fl.simulation import backend_config, wait_for_nodes
    from florg.methods import FLoRGMethod

    strategy.QUERY_BATCH = batch
    cfg = load_config(None, [f"data.num_clients={clients}", "federation.client_cpus=1", "federation.backend_cpus=2"])
    server = ServerApp()
    res: dict[str, Any] = {"batch": batch, "timeout": timeout}

    @server.main()
    def main(grid: Any, context: Any) -> None:
        s = strategy.AdapterStrategy.from_config(FLoRGMethod(cfg), cfg)
        s.round_timeout = timeout  # the per-batch wait is max(60 s, round_timeout)
        wait_for_nodes(grid, clients, 600.0)  # as run_simulation_engine does: all nodes registered
        nodes = sorted(grid.get_node_ids())
        t0, c0 = time.perf_counter(), time.process_time()
        s._partition_ids(grid, nodes)
        res.update(nodes=len(nodes), seconds=time.perf_counter() - t0, driver_cpu_s=time.process_time() - c0,
                   known=len(s._node_partition))

    run_simulation(server_app=server, client_app=client_app, num_supernodes=clients, backend_config=backend_config(cfg))
    return res


def query_variants(clients: int) -> list[dict[str, Any]]:
    """The query as before the fix (all at once, 60 s) and after (64 at a time), each in a fresh process."""
    out = []
    for batch, timeout in ((1 << 30, 60.0), (64, 3600.0)):
        log(f"partition-id query of {clients} nodes, {'all at once' if batch > clients else batch} at a time")
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--query-child",
                               json.dumps([batch, timeout, clients])], cwd=ROOT, env={**os.environ, **OFFLINE},
                              stdout=subprocess.PIPE, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith(CHILD_TAG))
        res = json.loads(line[len(CHILD_TAG):])
        res["batch"] = "all" if batch > clients else batch
        out.append(res)
    return out


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------- the parent: runs and sampling


class TreeSampler(threading.Thread):
    """Sample the RSS of a process and all its descendants every ``interval`` seconds; keep the peak."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = self.peak_procs = 0
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            if total > self.peak:
                self.peak, self.peak_procs = total, len(procs)
            self.samples += 1
            self.done.wait(self.interval)


def run_one(name: str, sets: list[str], workdir: Path, interval: float, timeout: float) -> dict[str, Any]:
    spec = {"sets": sets, "run_dir": str(workdir / "runs" / name)}
    env = {**os.environ, **OFFLINE}
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--child", json.dumps(spec)]
    log(f"run {name}: {' '.join(sets)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid, interval)
    sampler.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        sampler.done.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed (exit code {proc.returncode}); see its output above")
    line = next(x for x in stdout.splitlines() if x.startswith(CHILD_TAG))
    res = json.loads(line[len(CHILD_TAG):])
    res.update(name=name, sets=[x.replace(str(workdir), "$TMP") for x in sets], process_wall_s=wall,
               tree_peak_rss=sampler.peak,
               tree_peak_processes=sampler.peak_procs, memory_samples=sampler.samples)
    return res


def figures(res: dict[str, Any]) -> dict[str, Any]:
    """The per-run figures of the report, from a run's raw result."""
    rows = [r for r in res["rows"] if r["round"] > 0]
    walls = {r["round"]: r["timing"]["wall_seconds"] for r in res["rows"]}
    per_round = []
    for r in rows:
        mark = next((m for m in res["marks"] if m["round"] == r["round"]), {})
        per_round.append({
            "round": r["round"],
            "wall_s": walls[r["round"]] - walls.get(r["round"] - 1, 0.0),
            "eval_s": r["timing"].get("eval_seconds"),
            "agg_s": r["timing"].get("agg_seconds"),
            "participants": r.get("participants"),
            "failures": r.get("failures"),
            "bytes_up": r.get("bytes_up"),
            "bytes_down": r.get("bytes_down"),
            "test_accuracy": r.get("test_accuracy"),
            "tail_energy_mean": r.get("tail_energy_mean"),
            "round_rel_error_mean": r.get("round_rel_error_mean"),
            "round_rel_error_max": r.get("round_rel_error_max"),
            "rank_q_mean": r.get("rank_q_mean"),
            "path": mark.get("paths"),
            "sum_r": mark.get("sum_r"),
            "driver_rss": mark.get("driver_rss"),
            "tree_rss": mark.get("tree_rss"),
        })
    first = res["rows"][0]
    return {
        "name": res["name"], "sets": res["sets"], "per_round": per_round,
        "accuracy_before": first.get("test_accuracy"), "accuracy_after": rows[-1].get("test_accuracy") if rows else None,
        "tree_peak_rss": res["tree_peak_rss"], "tree_peak_processes": res["tree_peak_processes"],
        "driver_peak_rss": res["driver_peak_rss"], "driver_rss_after_build": res["driver_rss_after_build"],
        "build_s": res["build_s"], "partition_s": res["partition_s"], "partition_sizes": res["partition_sizes"],
        "queries": res["queries"], "run_s": res["run_s"], "process_wall_s": res["process_wall_s"],
        "memory_samples": res["memory_samples"],
    }


# --------------------------------------------------------------------------- report


def _f(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _path(pr: dict[str, Any]) -> str:
    paths = pr.get("path")
    sum_r = pr.get("sum_r") or []
    if not paths:
        return "—"
    return "/".join(paths) + (f" (sum r_n = {'/'.join(map(str, sum_r))})" if sum_r else "")


def markdown(data: dict[str, Any]) -> str:
    m, s = data["machine"], data["settings"]
    runs = data["runs"]
    gpu = (m.get("gpu") or {}).get("name")
    lines = [
        "## A thousand clients on one machine (`benchmarks/bench_scale.py`)", "",
        f"Machine: {m['cpu_model']}, {m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB RAM, {m['os']}"
        + (f", GPU {gpu}" if gpu else ", no GPU") + f"; torch {m['versions'].get('torch')}; measured {m['date']} "
        f"(load average {', '.join(map(str, data.get('loadavg_start', [])))} at the start, "
        f"{', '.join(map(str, data.get('loadavg_end', [])))} at the end; the machine was shared). "
        f"Benchmark wall time {data['wall_s'] / 60:.1f} min.", "",
        f"Flower's simulation engine (Ray), the path of `florg run`: `data.task = {s['task']}`, "
        f"`data.num_clients = {s['clients']}`, Dirichlet alpha = 0.5 over `data.max_train_examples = "
        f"{s['max_train']}` (the default 6,000 would leave 6 examples per client on average), {s['rounds']} rounds, "
        f"`train.local_steps = {s['local_steps']}`, `train.batch_size = {s['batch_size']}`, r = 4, MiniLM "
        f"(query/value, k = 384), `federation.client_cpus = 1`, `federation.backend_cpus = {s['backend_cpus']}`, "
        "server-side evaluation on the 600-example test split every round. Each run is a fresh process; "
        "the data cache is cold for the first run only.", "",
    ]
    main = [r for r in runs if r["name"] in ("florg", "fedit")]
    rows = []
    for r in main:
        pr = r["per_round"]
        q = r["queries"][0] if r["queries"] else None
        rows.append([
            r["name"], f"{len(r['per_round'])} x {pr[0]['participants'] if pr else '—'}",
            fmt_bytes(r["tree_peak_rss"]) + f" ({r['tree_peak_processes']} processes)",
            fmt_bytes(r["driver_peak_rss"]),
            " / ".join(fmt_bytes(x["driver_rss"]) for x in pr),
            _f(r["partition_s"], ".1f") + " s" if r["partition_s"] is not None else "cached",
            _f(r["build_s"], ".1f") + " s",
            f"{q['asked']} nodes, {q['seconds']:.1f} s" if q else "—",
            " / ".join(f"{x['wall_s']:.1f}" for x in pr) + " s",
            " / ".join(f"{1e3 * x['agg_s']:.0f}" for x in pr if x["agg_s"] is not None) + " ms",
            _path(pr[-1]) if r["name"] == "florg" else "— (FedIT averages A and B)",
            fmt_bytes(pr[-1]["bytes_up"]) + " / " + fmt_bytes(pr[-1]["bytes_down"]),
            f"{r['accuracy_before']:.3f} → {r['accuracy_after']:.3f}",
        ])
    lines += _table(["method", "rounds x clients", "peak RSS, whole process tree (sum)", "driver peak RSS",
                     "driver RSS after round 1/2/3", "partitioning (cold)", "data + model build",
                     "partition-id query (round 1)", "wall per round 1/2/3", "aggregation per round",
                     "aggregation path", "bytes up / down per round", "test accuracy"], rows)
    fedit = next((r for r in main if r["name"] == "fedit"), None)
    if fedit is not None:
        agg = [x["agg_s"] for x in fedit["per_round"] if x["agg_s"] is not None]
        if agg:
            lines += ["", f"FedIT's server step (its averaging and its diagnostics) took {min(agg):.0f}-{max(agg):.0f} s "
                      "per round at N = 100, against under a second for FLoRG's Gram path; not investigated here."]
    sizes = main[0]["partition_sizes"] if main else None
    if sizes:
        lines += ["", f"Client sizes: {sizes['min']} to {sizes['max']} examples (mean {sizes['mean']:.0f}, "
                  f"{sizes['empty']} empty clients). The tree peak sums the RSS of the driver (ServerApp, Flower's "
                  "in-memory SuperLink, the Contexts of all nodes), Ray's GCS and raylet and the client workers; "
                  "shared pages count once per process, so it is an upper bound. *Wall per round* includes the "
                  "server's evaluation and, in round 1, the partition-id query; *partitioning* is loading WordNet "
                  f"plus the Dirichlet split, *data + model build* adds tokenising the {s['clients']} partitions and building "
                  "the model (the CLI does this once before the run; the Ray workers then load the cache)."]
    diag = sorted([r for r in runs if r["name"].startswith("florg")], key=lambda r: r["per_round"][0]["participants"])
    if diag:
        lines += ["", f"FLoRG's aggregation diagnostics against the participants per round N (the same {s['clients']} "
                  f"clients, `federation.fraction_train` = N / {s['clients']}; per round, means over the 12 adapted "
                  "layers; `tail_energy` = share of trace(Q) outside the top r, `round_rel_error` = share of the "
                  "round's exact mean update lost by sending the rank-r factor; docs/methods.md):", ""]
        drows = []
        for r in diag:
            pr = r["per_round"]
            drows.append([pr[0]["participants"], _path(pr[-1]),
                          " / ".join(_f(x["rank_q_mean"], ".0f") for x in pr),
                          " / ".join(_f(x["tail_energy_mean"], ".3f") for x in pr),
                          " / ".join(_f(x["round_rel_error_mean"], ".3f") for x in pr),
                          " / ".join(_f(x["round_rel_error_max"], ".3f") for x in pr),
                          " / ".join(f"{1e3 * x['agg_s']:.0f}" for x in pr if x["agg_s"] is not None) + " ms",
                          f"{r['accuracy_after']:.3f}"])
        lines += _table(["N", "path", "rank of Q (r')", "tail_energy", "round_rel_error (mean)",
                         "round_rel_error (max)", "aggregation", f"accuracy after {s['rounds']} rounds"], drows)
    if data.get("query"):
        q = data["query"]
        lines += ["", f"The partition-id query alone ({q['runs'][0]['nodes']} simulated nodes, florg's ClientApp, "
                  "nothing else running in the simulation; a fresh process each; load average "
                  f"{', '.join(map(str, q.get('loadavg_start', [])))} at the start):", ""]
        lines += _table(["queries in flight", "wait per call", "wall", "driver CPU (all its threads)",
                         "nodes with a known partition id"],
                        [[x["batch"], f"{x['timeout']:.0f} s", f"{x['seconds']:.1f} s", f"{x['driver_cpu_s']:.1f} s",
                          x["known"]] for x in q["runs"]])
    lines += ["", *FIXES]
    return "\n".join(lines) + "\n"


#: what broke on the way to these numbers, and what changed (text; the figures in it were measured on the same
#: machine while developing the fixes)
FIXES = [
    "What broke at 1000 clients, and the fixes:", "",
    "* **The partition-id query.** To sample reproducibly the server asks every node once for its partition id. "
    "It sent all 1000 queries at once and waited a fixed 60 s. In the first run above the query took 70 s (cold "
    "client workers, the machine at a load average of about 9), so the old code would have stopped waiting before "
    "every node had answered: the rest get no known partition id, are sampled in an order that follows Flower's "
    "random node ids (not reproducible), are asked again the next round, and their late replies stay in Flower's "
    "in-memory state. Each call now waits up to `federation.round_timeout` (at least 60 s), and the queries go out "
    "64 at a time (`florg.fl.strategy.QUERY_BATCH`): Flower's simulation engine scans every undelivered message for "
    "every node every 0.1 s (`vce_api.add_messages_to_queue` over `InMemoryLinkState.get_message_ins`), so 1000 "
    "queries in flight cost about a million checks per scan; in batches the query takes less of the driver's CPU "
    "and less wall time (table above; on its own, all 1000 at once came within 5 s of the old 60 s limit).",
    "* **Nodes still registering.** Flower registers the simulated SuperNodes in a thread of its own while the "
    "ServerApp starts. A ServerApp that queried at once saw 928 of the 1000 nodes, so the first round would have "
    "sampled from (and queried) whichever nodes happened to be registered. `run_simulation_engine` now waits "
    "until all `data.num_clients` nodes are registered (at most `federation.round_timeout`) before the server "
    "starts. In `florg run` the data build and the round-0 evaluation usually hide the race (the four runs above "
    "saw all 1000 nodes).",
    "* **Per-client state in the driver.** Flower's simulation keeps every node's Context in the driver process. "
    "With `train.reset_optimizer = false` each client ever sampled left its AdamW moments there (2 x 23k float32 "
    "values, 0.18 MB, for FLoRG on MiniLM; 0.33 MB for FedIT), 180-330 MB once all 1000 clients have been "
    "sampled, and a method's own per-client factors (FedSA-LoRA's `B`) likewise. The embedded simulation now "
    "points the clients at a temporary folder of the run (`FLORG_CLIENT_STATE_DIR`, `florg.fl.client_state`): "
    "such state goes to one safetensors file per client, bit-identical on reload, removed at the end of the run. "
    "With the default `train.reset_optimizer = true` (the runs above) nothing is kept per client; the driver's RSS "
    "moved by -6 to +38 MB from round to round, not in step with the 100 new clients each round brings (within "
    "10 MB at N = 5 and 20; FedIT +23 MB then 0). The 0.33 MB for FedIT is computed from its parameter count.",
    "* **Empty clients.** None arise here (the Dirichlet split backs off its minimum client size from 10 to 2 and, "
    "as a last resort, moves one example to each empty client; the pathological split refuses up front), but a "
    "client with no examples used to raise inside its ClientApp (a traceback, counted as a failure). It now replies "
    "with a clear reason, sits the round out and is counted in the round's `empty_clients`.",
]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="60 clients, 2 rounds; writes to the temp folder only")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-train", type=int, default=20000)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--participants", default="100,5,20", help="FLoRG runs: participants per round (the first "
                                                                 "also runs FedIT)")
    ap.add_argument("--sample-s", type=float, default=0.5, help="memory sampling interval")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per run")
    ap.add_argument("--json", default=None, help=f"default {JSON_PATH.relative_to(ROOT)}")
    ap.add_argument("--results", default=None, help="Markdown file whose scale section is replaced "
                                                    "(default benchmarks/RESULTS.md)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; rewrite the section from --json")
    ap.add_argument("--query-child", help=argparse.SUPPRESS)
    ap.add_argument("--query-only", action="store_true",
                    help="only the partition-id query comparison (about 2 minutes); merged into --json")
    args = ap.parse_args(argv)

    if args.child:
        print(CHILD_TAG + json.dumps(child(json.loads(args.child)), default=str), flush=True)
        return
    if args.query_child:
        print(CHILD_TAG + json.dumps(query_child(*json.loads(args.query_child))), flush=True)
        return
    tmp = Path(tempfile.mkdtemp(prefix="florg-scale-"))
    if args.quick:
        args.clients, args.rounds, args.max_train, args.participants = 60, 2, 1200, "10,3"
    json_path = Path(args.json) if args.json else (tmp / "scale.json" if args.quick else JSON_PATH)
    results = Path(args.results) if args.results else (tmp / "RESULTS.md" if args.quick else HERE / "RESULTS.md")
    if args.report_only or args.query_only:
        data = json.loads(json_path.read_text())
        if args.query_only:
            data["query"] = {"machine": machine_info(), "loadavg_start": loadavg(), "runs": query_variants(args.clients)}
            data["query"]["loadavg_end"] = loadavg()
            write_json(json_path, data)
        update_section(results, SECTION, markdown(data))
        log(f"wrote the {SECTION} section of {results}")
        return

    settings = {"task": "wordnet-nouns", "clients": args.clients, "rounds": args.rounds, "max_train": args.max_train,
                "local_steps": args.local_steps, "batch_size": args.batch_size, "backend_cpus": 2}
    base = [f"data.task={settings['task']}", f"data.num_clients={args.clients}",
            f"data.max_train_examples={args.max_train}", f"train.rounds={args.rounds}",
            f"train.local_steps={args.local_steps}", f"train.batch_size={args.batch_size}",
            "federation.client_cpus=1", f"federation.backend_cpus={settings['backend_cpus']}",
            f"cache.dir={json.dumps(str(tmp / 'cache'))}", "train.device=cpu"]
    counts = [int(x) for x in args.participants.split(",")]
    plan = []
    for i, n in enumerate(counts):
        frac = n / args.clients
        extra = [f"federation.fraction_train={frac!r}", f"federation.min_train_nodes={min(n, 2)}"]
        plan.append(("florg" if i == 0 else f"florg-n{n}", [*base, "method.name=florg", *extra]))
        if i == 0:
            plan.append(("fedit", [*base, "method.name=fedit", *extra]))
    machine = machine_info()
    data: dict[str, Any] = {"machine": machine, "settings": settings, "loadavg_start": loadavg(), "runs": []}
    t0 = time.perf_counter()
    for name, sets in plan:
        res = run_one(name, sets, tmp, args.sample_s, args.timeout_s)
        data["runs"].append(figures(res))
    data["wall_s"] = time.perf_counter() - t0
    data["loadavg_end"] = loadavg()
    data["query"] = {"loadavg_start": loadavg(), "runs": query_variants(args.clients)}
    data["query"]["loadavg_end"] = loadavg()
    write_json(json_path, data)
    text = markdown(data)
    print(text)
    print_table(["run", "peak RSS (tree)", "driver peak", "wall per round (s)", "agg (ms)", "path", "bytes up/round"],
                [[r["name"], fmt_bytes(r["tree_peak_rss"]), fmt_bytes(r["driver_peak_rss"]),
                  " / ".join(f"{x['wall_s']:.1f}" for x in r["per_round"]),
                  " / ".join(f"{1e3 * (x['agg_s'] or 0):.0f}" for x in r["per_round"]),
                  _path(r["per_round"][-1]), fmt_bytes(r["per_round"][-1]["bytes_up"])] for r in data["runs"]])
    update_section(results, SECTION, text)
    log(f"wrote {json_path} and the {SECTION} section of {results}")


if __name__ == "__main__":
    main()

"""One-command device check: florg on a GPU against PEFT LoRA, printed as a table and written to RESULTS.md.

Run it as ``bash benchmarks/gpu_check.sh`` (about 4 minutes on one H100; stops itself before 8).
It needs only torch (with CUDA), transformers, peft, accelerate, safetensors and numpy: models
are built from their configs with random weights (no downloads), and it imports only florg's
Flower-free parts (``florg.core``, ``florg.adapters``, ``florg.methods``, ``florg.train``), so
no Flower, Ray or ``datasets`` is needed. Sections:

(a) client training step, FLoRG vs PEFT LoRA side by side in one process (r = 4, alpha 16,
    targets q_proj/v_proj, AdamW, autocast), Llama-3.2-1B shape then Llama-3.2-3B shape, bfloat16
    base, batch 8 x 512: tokens/s (CUDA events) and peak memory (weights + optimizer state + the
    step's ``max_memory_allocated`` above the memory before it). Targets: FLoRG >= 1.0x LoRA's
    tokens/s, <= 1.05x its peak memory. FLoRG runs twice: with its per-layer bases and with the
    memory-lean per-shape bases (``method.florg.bases = "per-shape"``).
(b) server aggregation of one Llama-3.2-3B round on the GPU: ``florg.core.aggregate_model`` over
    56 layers (q_proj k = 3072, v_proj k = 1024), N = 20 clients, r = 4, float32 uploads already on
    the GPU. Target: median <= 10 ms. Also checked against the same aggregation on the CPU.
(c) parity: a tiny Llama with FLoRG trained 8 steps from one seed with florg's training loop on the
    GPU and on the CPU. Tolerance: the losses agree within 1e-4 (relative) in float32; the bfloat16
    run is shown for information (tolerance 3e-2).
(d) federated rounds in process with florg's own client and server logic (the library's Flower-free
    round, :func:`florg.methods.driver.run_round`: downlink, client_load, ``train_steps``,
    client_upload and its check, the server rule on the GPU, the global state through the CPU as on
    the wire; a client's time is its training), 4 clients x 2 rounds x 5 steps, Llama-3.2-1B shape, bfloat16,
    batch 8 x 512; against a bare PEFT LoRA loop doing the same steps (fresh AdamW per client,
    autocast). Target: florg's time per client <= 1.10x the bare loop's. The same client logic
    with method ``fedit`` (plain LoRA) isolates florg's own machinery from the adapter.

``--dry-run`` runs every section with tiny shapes on the CPU (what CI does); its numbers say
nothing about GPUs and go to a temporary report unless ``--results`` is given.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

from benchmarks.common import fmt_bytes, log, print_table, update_section  # noqa: E402

SECTION = "gpu-check"
TARGET_THROUGHPUT, TARGET_MEMORY, TARGET_AGG_S, TARGET_OVERHEAD = 1.0, 1.05, 0.010, 0.10
TOL_F32, TOL_BF16 = 1e-4, 3e-2
BUDGET_S = 7.5 * 60  # stop before 8 minutes


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- (a) client step
def section_a(device: torch.device, dry: bool, budget: Budget) -> list[dict[str, Any]]:
    from benchmarks.bench_client import Runner, llama_base, run_shape, wrap

    shapes = ["tiny"] if dry else ["1b", "3b"]
    batch, seq = (2, 32) if dry else (8, 512)
    warmup, steps, mem_reps = (1, 2, 1) if dry else (3, 10, 3)
    out = []
    for shape in shapes:
        if budget.left() < 120 and not dry:
            out.append({"shape": shape, "skipped": "time budget"})
            continue
        log(f"(a) client step, Llama {shape}, bf16, {batch} x {seq} ...")
        base, info = llama_base(shape, 128256, device, torch.bfloat16)
        names = ("florg", "florg-shape", "lora")  # FLoRG with per-layer bases, with per-shape bases, PEFT LoRA
        bases = {"florg": base, "florg-shape": copy.deepcopy(base), "lora": copy.deepcopy(base)}
        runners = {name: Runner(name, wrap(bases[name], name, info, 4, 16.0), device) for name in names}
        res = run_shape(runners, info, batch, seq, device, warmup, steps, mem_reps)
        f, fs, lo = res["florg"], res["florg-shape"], res["lora"]
        for d in (f, fs, lo):
            d["peak_total_bytes"] = d["model_all"] + d["optimizer_state"] + d["step_transient_bytes"]
        out.append({
            "shape": shape, "batch": batch, "seq": seq,
            "florg_tokens_s": f["tokens_per_s"], "lora_tokens_s": lo["tokens_per_s"],
            "florg_step_ms": 1e3 * f["median_s"], "lora_step_ms": 1e3 * lo["median_s"],
            "throughput_ratio": f["tokens_per_s"] / lo["tokens_per_s"],
            "florg_peak_bytes": f["peak_total_bytes"], "lora_peak_bytes": lo["peak_total_bytes"],
            "memory_ratio": f["peak_total_bytes"] / lo["peak_total_bytes"],
            "florg_bases_bytes": f["adapter_buffers"],
            "shape_tokens_s": fs["tokens_per_s"], "shape_throughput_ratio": fs["tokens_per_s"] / lo["tokens_per_s"],
            "shape_peak_bytes": fs["peak_total_bytes"], "shape_memory_ratio": fs["peak_total_bytes"] / lo["peak_total_bytes"],
            "shape_bases_bytes": fs["adapter_buffers"],
        })
        del runners, bases, base
        free(device)
    return out


# ----------------------------------------------------------------------------- (b) aggregation
def section_b(device: torch.device, dry: bool) -> dict[str, Any]:
    from benchmarks.bench_server import llama_uploads
    from florg.core import aggregate_model

    layers, shapes = (2, {"q_proj": 96, "v_proj": 48}) if dry else (28, {"q_proj": 3072, "v_proj": 1024})
    n, r, reps = 20, 4, (3 if dry else 30)
    log(f"(b) aggregation, {2 * layers} layers, N={n}, r={r}, on {device} ...")
    cpu_up, cpu_prev = llama_uploads(layers, n, r, shapes)
    up = {k: [a.to(device) for a in v] for k, v in cpu_up.items()}
    prev = {k: v.to(device) for k, v in cpu_prev.items()}

    def timed(diagnostics: bool) -> list[float]:
        for _ in range(3):
            aggregate_model(up, previous=prev, rank=r, diagnostics=diagnostics)
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            aggregate_model(up, previous=prev, rank=r, diagnostics=diagnostics)
            sync(device)
            times.append(time.perf_counter() - t0)
        return times

    plain, diag = timed(False), timed(True)
    on_device = aggregate_model(up, previous=prev, rank=r, diagnostics=False)
    on_cpu = aggregate_model(cpu_up, previous=cpu_prev, rank=r, diagnostics=False)
    rel = max(float(torch.linalg.matrix_norm(on_device[k].factor.cpu().double() - on_cpu[k].factor.double())
                    / torch.linalg.matrix_norm(on_cpu[k].factor.double())) for k in on_cpu)
    return {"layers": 2 * layers, "shapes": shapes, "n": n, "r": r, "reps": reps,
            "median_s": statistics.median(plain), "min_s": min(plain),
            "diag_median_s": statistics.median(diag), "diag_min_s": min(diag),
            "max_rel_diff_vs_cpu": rel, "device_type": device.type}


# ----------------------------------------------------------------------------- (c) parity
def _tiny_florg(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from florg.config import load_config
    from florg.methods import get_method
    from florg.run.experiment import float32_trainables

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128), dtype=dtype)
    cfg = load_config(None, ["method.name=florg", "method.rank=4", "method.alpha=16", "method.train_head=false"])
    method = get_method(cfg)
    model = method.build(base, ["q_proj", "v_proj"], [])
    float32_trainables(model)
    return cfg, method, model


def _lm_batches(count: int, rows: int, seq: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (rows, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def section_c(device: torch.device, dry: bool) -> dict[str, Any]:
    from florg.train import make_optimizer, train_steps

    log(f"(c) parity, tiny Llama with FLoRG, {device} vs cpu ...")
    batches = _lm_batches(8, 4, 32, 257, seed=1)

    def run(dev: torch.device, dtype: torch.dtype) -> list[float]:
        cfg, _, model = _tiny_florg(dtype)
        model.to(dev)
        torch.manual_seed(0)
        opt = make_optimizer(model.parameters(), cfg.train, 1e-3)
        it = iter(batches)
        return [train_steps(model, it, opt, 1, device=dev, dtype=dtype)["train_loss"] for _ in batches]

    out: dict[str, Any] = {"steps": len(batches), "device_type": device.type}
    for name, dtype, tol in (("float32", torch.float32, TOL_F32), ("bfloat16", torch.bfloat16, TOL_BF16)):
        ref, dev = run(torch.device("cpu"), dtype), run(device, dtype)
        rel = max(abs(a - b) / abs(b) for a, b in zip(dev, ref))
        out[name] = {"cpu_losses": ref, "device_losses": dev, "max_rel_diff": rel, "tolerance": tol}
    return out


# ----------------------------------------------------------------------------- (d) rounds in process
def section_d(device: torch.device, dry: bool) -> dict[str, Any]:
    from benchmarks.bench_client import llama_base, wrap
    from florg.config import load_config
    from florg.device import autocast
    from florg.methods import get_method
    from florg.methods.base import ClientInfo
    from florg.methods.driver import run_round
    from florg.run.experiment import float32_trainables
    from florg.train import make_optimizer, train_steps

    shape, (batch, seq) = ("tiny", (2, 32)) if dry else ("1b", (8, 512))
    clients, rounds, steps = (2, 2, 2) if dry else (4, 2, 5)
    dtype = torch.bfloat16
    log(f"(d) {clients} clients x {rounds} rounds x {steps} steps, Llama {shape}, {batch} x {seq}, on {device} ...")
    base, info = llama_base(shape, 128256, device, dtype)
    data = {pid: [{k: v for k, v in b.items()} for b in _lm_batches(steps, batch, seq, info["vocab"], seed=10 + pid)]
            for pid in range(clients)}

    def florg_rounds(method_name: str, model_base: torch.nn.Module) -> dict[str, Any]:
        cfg = load_config(None, [f"method.name={method_name}", "method.rank=4", "method.alpha=16",
                                 "method.train_head=false", "model.dtype=bfloat16", f"train.local_steps={steps}"])
        method = get_method(cfg)
        model = method.build(model_base, ["q_proj", "v_proj"], [])
        float32_trainables(model)
        state = {k: v.detach().cpu() for k, v in method.initial_global(model).items()}
        per_client, per_server = [], []

        def train(model: torch.nn.Module, info_: ClientInfo) -> None:
            sync(device)
            t0 = time.perf_counter()
            torch.manual_seed(info_.server_round * 100 + info_.partition_id)
            opt = make_optimizer(model.parameters(), cfg.train, 1e-4)
            train_steps(model, iter(data[info_.partition_id]), opt, steps, device=device, dtype=dtype)
            sync(device)
            per_client.append(time.perf_counter() - t0)

        for rnd in range(1, rounds + 1):  # the library's Flower-free round: downlink, load, train, upload, rule
            res = run_round(method, model, state, train, server_round=rnd, clients=range(clients),
                            weights=[1] * clients, server_device=device)
            state = res.state
            per_server.append(res.server_seconds)
        return {"per_client_s": per_client, "per_server_s": per_server}

    def bare_rounds(model_base: torch.nn.Module) -> dict[str, Any]:
        model = wrap(model_base, "lora", info, 4, 16.0)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        per_client = []
        for _ in range(rounds):
            for pid in range(clients):
                sync(device)
                t0 = time.perf_counter()
                opt = torch.optim.AdamW(params, lr=1e-4)
                for b in data[pid]:
                    b = {k: v.to(device) for k, v in b.items()}
                    with autocast(device, dtype):
                        loss = model(**b).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                sync(device)
                per_client.append(time.perf_counter() - t0)
        return {"per_client_s": per_client}

    out: dict[str, Any] = {"shape": shape, "batch": batch, "seq": seq, "clients": clients, "rounds": rounds,
                           "steps": steps}
    # first round of each is a warm-up (allocator, kernels): per-client medians over the last round
    out["bare_lora"] = bare_rounds(copy.deepcopy(base))
    free(device)
    out["florg"] = florg_rounds("florg", copy.deepcopy(base))
    free(device)
    out["fedit"] = florg_rounds("fedit", base)
    del base
    free(device)
    last = slice(clients * (rounds - 1), None)
    bare = statistics.median(out["bare_lora"]["per_client_s"][last])
    for name in ("florg", "fedit"):
        med = statistics.median(out[name]["per_client_s"][last])
        out[name]["median_client_s"] = med
        out[name]["overhead"] = med / bare - 1.0
        out[name]["median_server_s"] = statistics.median(out[name]["per_server_s"])
    out["bare_lora"]["median_client_s"] = bare
    return out


# ----------------------------------------------------------------------------- report
def _yes(ok: bool | None, dry: bool) -> str:
    if dry:
        return "dry run"
    return "—" if ok is None else ("**yes**" if ok else "**no**")


def summary_rows(res: dict[str, Any]) -> list[list[str]]:
    dry = res["dry_run"]
    rows = []
    for a in res.get("a", []):
        if "skipped" in a:
            rows.append([f"(a) client step, Llama {a['shape']}", "—", f"skipped ({a['skipped']})", "—"])
            continue
        label = f"(a) client step, Llama {a['shape']}, bf16, {a['batch']} x {a['seq']}"
        rows.append([f"{label}: tokens/s FLoRG / LoRA", f">= {TARGET_THROUGHPUT:.2f}",
                     f"{a['throughput_ratio']:.3f} ({a['florg_tokens_s']:,.0f} vs {a['lora_tokens_s']:,.0f})",
                     _yes(a["throughput_ratio"] >= TARGET_THROUGHPUT, dry)])
        rows.append([f"{label}: peak memory FLoRG / LoRA", f"<= {TARGET_MEMORY:.2f}",
                     f"{a['memory_ratio']:.3f} ({fmt_bytes(a['florg_peak_bytes'])} vs {fmt_bytes(a['lora_peak_bytes'])}; "
                     f"bases {fmt_bytes(a['florg_bases_bytes'])})",
                     _yes(a["memory_ratio"] <= TARGET_MEMORY, dry)])
        rows.append([f"{label}: tokens/s FLoRG with per-shape bases / LoRA", f">= {TARGET_THROUGHPUT:.2f}",
                     f"{a['shape_throughput_ratio']:.3f} ({a['shape_tokens_s']:,.0f} vs {a['lora_tokens_s']:,.0f})",
                     _yes(a["shape_throughput_ratio"] >= TARGET_THROUGHPUT, dry)])
        rows.append([f"{label}: peak memory FLoRG with per-shape bases / LoRA", f"<= {TARGET_MEMORY:.2f}",
                     f"{a['shape_memory_ratio']:.3f} ({fmt_bytes(a['shape_peak_bytes'])}; bases "
                     f"{fmt_bytes(a['shape_bases_bytes'])})", _yes(a["shape_memory_ratio"] <= TARGET_MEMORY, dry)])
    if "b" in res:
        b = res["b"]
        rows.append([f"(b) aggregation, {b['layers']} layers, N = {b['n']}, r = {b['r']}: median (min)",
                     f"<= {1e3 * TARGET_AGG_S:.0f} ms",
                     f"{1e3 * b['median_s']:.2f} ms ({1e3 * b['min_s']:.2f}); with diagnostics "
                     f"{1e3 * b['diag_median_s']:.2f} ms; vs CPU {b['max_rel_diff_vs_cpu']:.1e}",
                     _yes(b["median_s"] <= TARGET_AGG_S, dry)])
    if "c" in res:
        for name in ("float32", "bfloat16"):
            c = res["c"][name]
            rows.append([f"(c) parity {name}, {res['c']['steps']} steps: max relative loss difference GPU vs CPU",
                         f"<= {c['tolerance']:.0e}", f"{c['max_rel_diff']:.2e}",
                         _yes(c["max_rel_diff"] <= c["tolerance"], dry) if name == "float32" else
                         ("info" if not dry else "dry run")])
    if "d" in res:
        d = res["d"]
        for name in ("florg", "fedit"):
            rows.append([f"(d) {d['clients']} clients x {d['rounds']} rounds, Llama {d['shape']}: time per client, "
                         f"florg logic ({name}) vs bare PEFT LoRA loop", f"overhead <= {TARGET_OVERHEAD:.0%}",
                         f"{d[name]['overhead']:+.1%} ({1e3 * d[name]['median_client_s']:,.0f} vs "
                         f"{1e3 * d['bare_lora']['median_client_s']:,.0f} ms; server {1e3 * d[name]['median_server_s']:.1f} ms)",
                         _yes(d[name]["overhead"] <= TARGET_OVERHEAD, dry) if name == "florg" else
                         ("info" if not dry else "dry run")])
    return rows


def markdown(res: dict[str, Any]) -> str:
    env = res["env"]
    head = (f"Card: **{env['device_name']}**; {env['date']}; torch {env['torch']} (CUDA {env['cuda']}), transformers "
            f"{env['transformers']}, peft {env['peft']}; {env['wall_s']:.0f} s in all. Written by "
            "`bash benchmarks/gpu_check.sh` (do not edit by hand; see benchmarks/gpu_check.py for the method).")
    if res["dry_run"]:
        head = ("**Dry run on the CPU with tiny shapes** (`bash benchmarks/gpu_check.sh --dry-run`): it checks that "
                "every section runs; its numbers say nothing about GPUs. " + head)
    rows = summary_rows(res)
    table = ["| check | target | measured | met |", "|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(["## Device check (`benchmarks/gpu_check.sh`)", "", head, "", *table, ""])


def environment(device: torch.device, wall_s: float) -> dict[str, Any]:
    import peft
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return {"device_name": name, "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "cuda": torch.version.cuda or "none", "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "wall_s": wall_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI); no GPU needed")
    ap.add_argument("--results", default=None,
                    help="Markdown file whose device-check section is replaced (default: benchmarks/RESULTS.md; "
                         "with --dry-run a file in the temp folder)")
    ap.add_argument("--json", default=None, help="JSON output (default next to --results)")
    ap.add_argument("--sections", default="abcd", help="which sections to run (default abcd)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); "
                             "run it on a GPU machine, or with --dry-run for the CPU smoke test")
        device = torch.device("cuda", 0)
    results = Path(args.results) if args.results else (
        Path(tempfile.gettempdir()) / "florg-gpu-check" / "RESULTS.md" if args.dry_run else ROOT / "benchmarks" / "RESULTS.md")
    budget = Budget(BUDGET_S)
    res: dict[str, Any] = {"dry_run": args.dry_run}
    if "a" in args.sections:
        res["a"] = section_a(device, args.dry_run, budget)
    if "b" in args.sections:
        res["b"] = section_b(device, args.dry_run)
    if "c" in args.sections:
        res["c"] = section_c(device, args.dry_run)
    if "d" in args.sections:
        if budget.left() > 90 or args.dry_run:
            res["d"] = section_d(device, args.dry_run)
        else:
            log("(d) skipped: time budget")
    res["env"] = environment(device, time.perf_counter() - budget.t0)
    print_table(["check", "target", "measured", "met"], summary_rows(res),
                title=f"florg device check on {res['env']['device_name']}")
    results.parent.mkdir(parents=True, exist_ok=True)
    update_section(results, SECTION, markdown(res))
    default_json = "results_gpu_check" + ("_dry" if args.dry_run else "") + ".json"
    json_path = Path(args.json) if args.json else results.with_name(default_json)
    json_path.write_text(json.dumps(res, indent=1, default=str))
    log(f"updated {results} (section '{SECTION}') and wrote {json_path}")
    return res


if __name__ == "__main__":
    main()

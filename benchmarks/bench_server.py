"""Server-side FLoRG aggregation benchmark.

Three parts, one run:

(a) thin path (:func:`florg.core.aggregate`, float64 internally) against the naive path (form the
    ``k x k`` Gram matrix ``sum_n p_n A_n^T A_n``, full ``torch.linalg.eigh``, keep the non-zero
    eigenpairs, Procrustes) for k in {1024, 2048, 4096}, N = 20, r = 4: median times, speed-up, and
    the Gram relative error ``||A~^T A~ - Q_ref||_F / ||Q_ref||_F`` against a float64 dense reference.
(b) one whole-model round for Llama-3.2-3B shapes (28 layers; q_proj k = 3072, v_proj k = 1024),
    N = 20, r = 4, through :func:`florg.core.aggregate_model` in one call: median time with and
    without diagnostics, peak RSS, Gram relative error, memory per layer.
(c) scaling: time against N (thin and Gram path, k = 1024) and against k (N = 20), saved as PNG
    under ``benchmarks/plots/``.

Uploads are float32 ``r x k`` factors as a client would send them: a shared previous global factor
plus a client-specific perturbation (``A_n = A_prev + 0.2 * 0.01 * noise``), so ``Q`` has a few
dominant and many small eigenvalues. Usage::

    python benchmarks/bench_server.py                 # full run (several minutes)
    python benchmarks/bench_server.py --quick         # small sizes, seconds
    python benchmarks/bench_server.py --json out.json --threads 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import (
    HERE,
    PLOTS,
    PeakRSS,
    fmt_bytes,
    fmt_ms,
    loadavg,
    log,
    machine_info,
    print_table,
    time_fn,
    write_json,
)
from florg.core import aggregate, aggregate_model, gram_eigen
from florg.core.whole_model import _aggregate_model_reference

F64 = torch.float64
EIG_RTOL = 1e-12


# --------------------------------------------------------------------------- inputs


def make_uploads(k: int, n: int, r: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``n`` float32 client factors (``r x k``) around a shared previous global factor."""
    g = torch.Generator().manual_seed(seed)
    prev = 0.01 * torch.randn(r, k, generator=g)
    ups = [prev + 0.002 * torch.randn(r, k, generator=g) for _ in range(n)]
    return ups, prev


def reference_gram(factors: list[torch.Tensor]) -> torch.Tensor:
    """Dense float64 ``Q_ref = (1/N) sum_n A_n^T A_n``, accumulated client by client."""
    k = factors[0].shape[1]
    q = torch.zeros(k, k, dtype=F64)
    for a in factors:
        a64 = a.to(F64)
        q.addmm_(a64.T, a64, alpha=1.0 / len(factors))
    return q


def gram_rel_error(factor: torch.Tensor, q_ref: torch.Tensor) -> float:
    f = factor.to(F64)
    return float(torch.linalg.matrix_norm(f.T @ f - q_ref) / torch.linalg.matrix_norm(q_ref))


def naive_aggregate(
    factors: list[torch.Tensor], previous: torch.Tensor, eig_rtol: float = EIG_RTOL
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook server: dense ``k x k`` Gram matrix, full ``eigh``, Procrustes (paper variant).

    Returns the factor to send down (uploads' dtype) and the canonical float64 factor ``A~``.
    Uniform weights ``p_n = 1/N``. The Gram matrix is formed with one GEMM on the stacked uploads
    (the cheapest way to form it; a per-client loop costs the same flops).
    """
    m = torch.cat(factors).to(F64)
    q = (m.T @ m) / len(factors)  # k x k
    lam, v = torch.linalg.eigh(q)
    lam, v = lam.flip(0), v.flip(1)
    keep = lam > eig_rtol * lam[0]
    a_tilde = lam[keep].sqrt()[:, None] * v[:, keep].T  # r' x k
    u, _, vh = torch.linalg.svd(previous.to(F64) @ a_tilde.T, full_matrices=False)
    return ((u @ vh) @ a_tilde).to(factors[0].dtype), a_tilde


# --------------------------------------------------------------------------- (a)


def part_a(ks: list[int], n: int, r: int, reps: int, naive_reps: int, naive_budget_s: float) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        factors, prev = make_uploads(k, n, r, seed=k)
        log(f"[a] k={k}: thin path ...")
        thin = time_fn(partial(aggregate, factors, previous=prev, rank=r, diagnostics=False), reps=reps, warmup=2)
        thin_diag = time_fn(partial(aggregate, factors, previous=prev, rank=r, diagnostics=True), reps=reps, warmup=1)
        log(f"[a] k={k}: naive path (dense Gram + full eigh) ...")
        naive = time_fn(
            partial(naive_aggregate, factors, prev), reps=naive_reps, warmup=1 if k <= 2048 else 0,
            max_seconds=naive_budget_s, min_reps=min(3, naive_reps),
        )
        q_ref = reference_gram(factors)
        a_thin = gram_eigen(factors).dense()
        new_naive, a_naive = naive_aggregate(factors, prev)
        res = aggregate(factors, previous=prev, rank=r, diagnostics=True)
        full = aggregate(factors, rank=n * r)  # the whole r' x k factor, in the uploads' dtype (float32)
        rows.append({
            "k": k, "n": n, "r": r,
            "thin": thin, "thin_diag": thin_diag, "naive": naive,
            "speedup": naive["median_s"] / thin["median_s"],
            "speedup_diag": naive["median_s"] / thin_diag["median_s"],
            "err_thin": gram_rel_error(a_thin, q_ref),
            "err_naive": gram_rel_error(a_naive, q_ref),
            "err_thin_float32_out": gram_rel_error(full.factor, q_ref),
            "agg_rel_error_diag": res.diagnostics["agg_rel_error"],
            "factor_thin_vs_naive": float(
                torch.linalg.matrix_norm(res.factor.to(F64) - new_naive.to(F64)) / torch.linalg.matrix_norm(new_naive.to(F64))
            ),
            "rank_q": res.rank_q,
            "loadavg": loadavg(),
        })
        del q_ref
    return rows


def table_a(rows: list[dict[str, Any]]) -> str:
    return print_table(
        ["k", "thin ms (min)", "thin+diag ms", "naive ms (min)", "naive reps", "speed-up", "speed-up w/ diag",
         "Gram err thin", "Gram err naive", "err f32 out", "thin vs naive A"],
        [[
            x["k"], f"{fmt_ms(x['thin']['median_s'])} ({fmt_ms(x['thin']['min_s'])})",
            fmt_ms(x["thin_diag"]["median_s"]),
            f"{fmt_ms(x['naive']['median_s'])} ({fmt_ms(x['naive']['min_s'])})", x["naive"]["reps"],
            f"{x['speedup']:,.0f}x", f"{x['speedup_diag']:,.0f}x",
            f"{x['err_thin']:.1e}", f"{x['err_naive']:.1e}", f"{x['err_thin_float32_out']:.1e}",
            f"{x['factor_thin_vs_naive']:.1e}",
        ] for x in rows],
        title=f"(a) thin vs naive, N={rows[0]['n']}, r={rows[0]['r']} (medians; min in brackets)",
    )


# --------------------------------------------------------------------------- (b)


def llama_uploads(layers: int, n: int, r: int, shapes: dict[str, int], seed: int = 0):
    uploads: dict[str, list[torch.Tensor]] = {}
    previous: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for proj, k in shapes.items():
            name = f"model.layers.{i}.self_attn.{proj}"
            ups, prev = make_uploads(k, n, r, seed=seed + 1000 * i + k)
            uploads[name] = ups
            previous[name] = prev
    return uploads, previous


def part_b(layers: int, n: int, r: int, reps: int, shapes: dict[str, int]) -> dict[str, Any]:
    uploads, previous = llama_uploads(layers, n, r, shapes)
    upload_bytes = sum(a.numel() * a.element_size() for fs in uploads.values() for a in fs)
    log(f"[b] {layers} layers x {list(shapes)} (k = {list(shapes.values())}), N={n}, r={r}: timing ...")
    nodiag = time_fn(lambda: aggregate_model(uploads, previous=previous, rank=r, diagnostics=False), reps=reps, warmup=2)
    diag = time_fn(lambda: aggregate_model(uploads, previous=previous, rank=r, diagnostics=True), reps=reps, warmup=1)
    log("[b] old path (two passes, batched full eigh) vs new path (one pass; paper variant: eigenvalues only), "
        "interleaved ...")
    old_new = compare_paths(uploads, previous, r, reps)

    with PeakRSS() as mem_nodiag:
        aggregate_model(uploads, previous=previous, rank=r, diagnostics=False)
    with PeakRSS() as mem_diag:
        out = aggregate_model(uploads, previous=previous, rank=r, diagnostics=True)
    agg_err_max = max(res.diagnostics["agg_rel_error"] for res in out.values())
    sent_err_max = max(res.diagnostics["sent_rel_error"] for res in out.values())
    tail_mean = sum(res.diagnostics["tail_energy"] for res in out.values()) / len(out)
    rank_q = sorted({res.rank_q for res in out.values()})
    paths = sorted({res.path for res in out.values()})
    del out

    log("[b] Gram error of the full-rank factor against a float64 dense reference ...")
    full = aggregate_model(uploads, rank=n * r, diagnostics=False)  # r' x k factors, float32
    err_f32 = {}
    for name, fs in uploads.items():
        q_ref = reference_gram(fs)
        a64 = gram_eigen(fs).dense()
        err_f32[name] = (gram_rel_error(full[name].factor, q_ref), gram_rel_error(a64, q_ref))
        del q_ref
    per_layer = []
    m = n * r
    for proj, k in shapes.items():
        thin_bytes = 8 * (min(m, k) * k)  # the float64 stack M (m x k); plus O(m^2) for G and its eigenvectors
        per_layer.append({
            "proj": proj, "k": k, "m": m,
            "thin_M_bytes": thin_bytes, "thin_small_bytes": 8 * 3 * m * m,
            "gram_Q_bytes": 8 * k * k, "upload_bytes_per_client": 4 * r * k,
        })
    return {
        "layers": layers, "shapes": shapes, "n": n, "r": r, "adapted_layers": len(uploads),
        "upload_bytes_total": upload_bytes,
        "nodiag": nodiag, "diag": diag,
        "peak_rss_delta_nodiag": mem_nodiag.delta, "peak_rss_delta_diag": mem_diag.delta,
        "rss_before": mem_diag.base, "peak_rss_abs": mem_diag.peak, "peak_rss_exact": mem_diag.exact,
        "agg_rel_error_max": agg_err_max, "sent_rel_error_max": sent_err_max, "tail_energy_mean": tail_mean,
        "gram_err_float32_out_max": max(v[0] for v in err_f32.values()),
        "gram_err_float64_max": max(v[1] for v in err_f32.values()),
        "rank_q": rank_q, "paths": paths, "per_layer": per_layer, "old_new": old_new, "loadavg": loadavg(),
    }


def compare_paths(uploads, previous, r: int, reps: int) -> dict[str, Any]:
    """The round through ``_aggregate_model_reference`` (the old path) and ``aggregate_model`` (the new one).

    Calls alternate (old, new, old, new, ...) so that both see the same machine load; for each
    setting of the diagnostics: medians, minima, CPU time and the ratio new / old, plus how far
    the results are apart (factors relative, eigenvalues relative to the largest, diagnostics).
    """
    import time

    out: dict[str, Any] = {}
    for diagnostics in (False, True):
        funcs = {"old": _aggregate_model_reference, "new": aggregate_model}
        wall: dict[str, list[float]] = {"old": [], "new": []}
        cpu: dict[str, list[float]] = {"old": [], "new": []}
        for fn in funcs.values():  # warm-up
            fn(uploads, previous=previous, rank=r, diagnostics=diagnostics)
        for _ in range(max(reps, 9)):
            for name, fn in funcs.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn(uploads, previous=previous, rank=r, diagnostics=diagnostics)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        res = {name: {"median_s": sorted(v)[len(v) // 2], "min_s": min(v), "cpu_median_s": sorted(cpu[name])[len(v) // 2],
                      "reps": len(v)} for name, v in wall.items()}
        res["ratio_median"] = res["new"]["median_s"] / res["old"]["median_s"]
        res["ratio_min"] = res["new"]["min_s"] / res["old"]["min_s"]
        old = _aggregate_model_reference(uploads, previous=previous, rank=r, diagnostics=diagnostics)
        new = aggregate_model(uploads, previous=previous, rank=r, diagnostics=diagnostics)
        res["factor_rel_diff_max"] = max(
            float(torch.linalg.matrix_norm(new[n].factor.to(F64) - old[n].factor.to(F64))
                  / torch.linalg.matrix_norm(old[n].factor.to(F64))) for n in old)
        res["factor_bit_identical"] = all(torch.equal(new[n].factor, old[n].factor) for n in old)
        res["eig_rel_diff_max"] = max(
            float((new[n].eigenvalues - old[n].eigenvalues).abs().max() / old[n].eigenvalues[0]) for n in old)
        res["diag_abs_diff_max"] = max(
            [abs(new[n].diagnostics[k] - v) for n in old for k, v in old[n].diagnostics.items()] or [0.0])
        out["diag" if diagnostics else "nodiag"] = res
    out["loadavg"] = loadavg()
    return out


def table_b(b: dict[str, Any]) -> str:
    text = print_table(
        ["quantity", "value"],
        [
            ["adapted layers",
             f"{b['adapted_layers']} ({b['layers']} x {', '.join(f'{p} k={k}' for p, k in b['shapes'].items())})"],
            ["clients N, rank r", f"{b['n']}, {b['r']}"],
            ["uploads held by the server", fmt_bytes(b["upload_bytes_total"])],
            ["round, no diagnostics: median (min) ms", f"{fmt_ms(b['nodiag']['median_s'])} ({fmt_ms(b['nodiag']['min_s'])})"],
            ["round, diagnostics: median (min) ms", f"{fmt_ms(b['diag']['median_s'])} ({fmt_ms(b['diag']['min_s'])})"],
            ["peak RSS above start, no diagnostics", fmt_bytes(b["peak_rss_delta_nodiag"])],
            ["peak RSS above start, diagnostics", fmt_bytes(b["peak_rss_delta_diag"])],
            ["process RSS before / peak", f"{fmt_bytes(b['rss_before'])} / {fmt_bytes(b['peak_rss_abs'])}"],
            ["Gram rel. error, float32 factor (max over layers)", f"{b['gram_err_float32_out_max']:.1e}"],
            ["Gram rel. error, float64 factor (max over layers)", f"{b['gram_err_float64_max']:.1e}"],
            ["agg_rel_error diagnostic (max)", f"{b['agg_rel_error_max']:.1e}"],
            ["rank of Q (r'), path", f"{b['rank_q']}, {b['paths']}"],
        ],
        title="(b) whole-model round, Llama-3.2-3B shapes",
    )
    text += "\n" + table_old_new(b["old_new"])
    text += "\n" + print_table(
        ["layer", "k", "m = sum r_n", "thin: M (m x k f64)", "thin: G, U, W (m x m)", "Gram path: Q (k x k f64)",
         "upload/client"],
        [[x["proj"], x["k"], x["m"], fmt_bytes(x["thin_M_bytes"]), fmt_bytes(x["thin_small_bytes"]),
          fmt_bytes(x["gram_Q_bytes"]), fmt_bytes(x["upload_bytes_per_client"])] for x in b["per_layer"]],
        title="memory per layer (thin path: O(min(sum r_n, k) * k); only one layer's M is alive at a time)",
    )
    return text


def table_old_new(x: dict[str, Any]) -> str:
    rows = []
    for key, label in (("nodiag", "no diagnostics"), ("diag", "diagnostics")):
        d = x[key]
        rows.append([label, f"{fmt_ms(d['old']['median_s'])} ({fmt_ms(d['old']['min_s'])})",
                     f"{fmt_ms(d['new']['median_s'])} ({fmt_ms(d['new']['min_s'])})",
                     f"{d['ratio_median']:.2f} ({d['ratio_min']:.2f})",
                     f"{fmt_ms(d['old']['cpu_median_s'])} / {fmt_ms(d['new']['cpu_median_s'])}",
                     "bit-identical" if d["factor_bit_identical"] else f"{d['factor_rel_diff_max']:.1e}",
                     f"{d['eig_rel_diff_max']:.1e}", f"{d['diag_abs_diff_max']:.1e}"])
    return print_table(
        ["round", "old ms median (min)", "new ms median (min)", "new / old median (min)", "CPU ms old / new",
         "factor diff (rel.)", "eigenvalue diff (rel.)", "diagnostics diff (abs.)"],
        rows, title="(b) Llama-3.2-3B round, old path vs new path (interleaved calls)",
    )


# --------------------------------------------------------------------------- (c)


def part_c(
    n_list: list[int], k_n: int, k_list: list[int], n_k: int, r: int, reps: int, budget_s: float,
    thin_max_ratio: float, naive_max_k: int, naive_from_a: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    vs_n = []
    for n in n_list:
        factors, prev = make_uploads(k_n, n, r, seed=7 + n)
        total = n * r
        row: dict[str, Any] = {"n": n, "sum_r": total, "auto_path": "thin" if total < k_n else "gram"}
        if total <= thin_max_ratio * k_n:
            log(f"[c] N={n} (sum r = {total}, k = {k_n}): thin path ...")
            row["thin"] = time_fn(
                partial(aggregate, factors, previous=prev, rank=r, path="thin", diagnostics=False),
                reps=reps, warmup=1, max_seconds=budget_s, min_reps=2,
            )
        log(f"[c] N={n}: Gram path ...")
        row["gram"] = time_fn(
            partial(aggregate, factors, previous=prev, rank=r, path="gram", diagnostics=False),
            reps=reps, warmup=1, max_seconds=budget_s, min_reps=2,
        )
        vs_n.append(row)
    vs_k = []
    for k in k_list:
        factors, prev = make_uploads(k, n_k, r, seed=k)
        log(f"[c] k={k} (N = {n_k}): thin path ...")
        row = {"k": k}
        row["thin"] = time_fn(partial(aggregate, factors, previous=prev, rank=r, diagnostics=False), reps=reps, warmup=1)
        row["thin_diag"] = time_fn(partial(aggregate, factors, previous=prev, rank=r, diagnostics=True), reps=reps, warmup=1)
        if k in naive_from_a:
            row["naive"] = naive_from_a[k]
        elif k <= naive_max_k:
            log(f"[c] k={k}: naive path ...")
            row["naive"] = time_fn(partial(naive_aggregate, factors, prev), reps=max(2, reps // 2), warmup=1,
                                   max_seconds=budget_s, min_reps=2)
        vs_k.append(row)
    return {"k_for_n": k_n, "n_for_k": n_k, "r": r, "vs_n": vs_n, "vs_k": vs_k, "loadavg": loadavg()}


def table_c(c: dict[str, Any]) -> str:
    def med(d: dict[str, Any] | None) -> str:
        return fmt_ms(d["median_s"]) if d else "—"

    text = print_table(
        ["N", "sum r_n", "auto path", "thin ms", "Gram path ms"],
        [[x["n"], x["sum_r"], x["auto_path"], med(x.get("thin")), med(x.get("gram"))] for x in c["vs_n"]],
        title=f"(c) time vs N (k = {c['k_for_n']}, r = {c['r']}, no diagnostics; medians)",
    )
    text += "\n" + print_table(
        ["k", "thin ms", "thin + diag ms", "naive ms", "speed-up"],
        [[x["k"], med(x["thin"]), med(x["thin_diag"]), med(x.get("naive")),
          f"{x['naive']['median_s'] / x['thin']['median_s']:,.0f}x" if x.get("naive") else "—"] for x in c["vs_k"]],
        title=f"(c) time vs k (N = {c['n_for_k']}, r = {c['r']}; medians)",
    )
    return text


def plot_c(c: dict[str, Any], outdir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    files = []

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = c["vs_n"]
    thin = [(x["n"], x["thin"]["median_s"] * 1e3) for x in rows if "thin" in x]
    gram = [(x["n"], x["gram"]["median_s"] * 1e3) for x in rows]
    auto = [(x["n"], (x["thin"] if x["auto_path"] == "thin" else x["gram"])["median_s"] * 1e3)
            for x in rows if x["auto_path"] == "gram" or "thin" in x]
    ax.plot(*zip(*thin), "o-", label="thin path (stacked M, m x m eigh)")
    ax.plot(*zip(*gram), "s-", label="Gram path (k x k accumulate + eigh)")
    ax.plot(*zip(*auto), "k:", lw=2.5, alpha=0.5, label="path='auto' (what aggregate picks)")
    switch = c["k_for_n"] / c["r"]
    ax.axvline(switch, color="grey", ls="--", lw=1)
    ax.text(switch * 1.05, ax.get_ylim()[0] * 1.5 if ax.get_ylim()[0] > 0 else 1, "sum r_n = k", color="grey", rotation=90)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients N")
    ax.set_ylabel("aggregation time per layer [ms]")
    ax.set_title(f"FLoRG server aggregation vs N (k = {c['k_for_n']}, r = {c['r']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = outdir / "server_time_vs_N.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(str(path))

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = c["vs_k"]
    ax.plot([x["k"] for x in rows], [x["thin"]["median_s"] * 1e3 for x in rows], "o-", label="thin path")
    ax.plot([x["k"] for x in rows], [x["thin_diag"]["median_s"] * 1e3 for x in rows], "^-", label="thin path + diagnostics")
    naive = [(x["k"], x["naive"]["median_s"] * 1e3) for x in rows if x.get("naive")]
    if naive:
        ax.plot(*zip(*naive), "s-", label="naive (dense k x k Gram + full eigh)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("k = min(d_in, d_out)")
    ax.set_ylabel("aggregation time per layer [ms]")
    ax.set_title(f"FLoRG server aggregation vs k (N = {c['n_for_k']}, r = {c['r']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = outdir / "server_time_vs_k.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    files.append(str(path))
    return files


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="small sizes and few repetitions (smoke test)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions of fast calls (default 7; quick 3)")
    ap.add_argument("--naive-reps", type=int, default=None, help="repetitions of the naive path (default 5; quick 2)")
    ap.add_argument("--naive-budget", type=float, default=120.0, help="seconds per naive size before stopping early (>= 3 reps)")
    ap.add_argument("--parts", default="abc", help="which parts to run (subset of 'abc')")
    ap.add_argument("--json", default=None, help="where to write the measured numbers (default benchmarks/results_server.json; "
                    "with --quick a file in the temp folder)")
    ap.add_argument("--plots", default=None,
                    help="folder for the PNG plots (default benchmarks/plots; with --quick the temp folder)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    quick = args.quick
    scratch = Path(tempfile.gettempdir()) / "florg-bench"
    if args.json is None:
        args.json = str(scratch / "results_server.json" if quick else HERE / "results_server.json")
    if args.plots is None:
        args.plots = str(scratch / "plots" if quick else PLOTS)
    reps = args.reps or (3 if quick else 7)
    naive_reps = args.naive_reps or (2 if quick else 5)
    n, r = 20, 4
    out: dict[str, Any] = {"machine": machine_info(), "quick": quick, "threads": args.threads}
    tables: list[str] = []

    ks_a = [256, 512] if quick else [1024, 2048, 4096]
    if "a" in args.parts:
        out["a"] = part_a(ks_a, n, r, reps, naive_reps, args.naive_budget)
        tables.append(table_a(out["a"]))
    if "b" in args.parts:
        shapes = {"q_proj": 3072, "v_proj": 1024}
        out["b"] = part_b(4 if quick else 28, n, r, reps, shapes)
        tables.append(table_b(out["b"]))
    if "c" in args.parts:
        naive_from_a = {x["k"]: x["naive"] for x in out.get("a", [])}
        if quick:
            c = part_c([1, 5, 20, 100], 128, [128, 256, 512], n, r, 2, 5.0, 2.0, 512, naive_from_a)
        else:
            c = part_c(
                [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], 1024, [256, 512, 1024, 2048, 4096, 8192], n, r,
                5, 20.0, 2.0, 4096, naive_from_a,
            )
        out["c"] = c
        tables.append(table_c(c))
        out["plots"] = plot_c(c, Path(args.plots))
        log(f"plots: {', '.join(out['plots'])}")
    out["machine"]["loadavg_end"] = loadavg()
    out["tables"] = tables
    write_json(args.json, out)
    log(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()

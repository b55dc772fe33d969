"""What half-precision base weights cost in accuracy: FLoRG's bases, and the W0 of methods that change it.

(1) FLoRG's bases in the base dtype. ``L`` (d_out x k) and ``R`` (k x d_in) are drawn in float64
    and rounded once to bfloat16/float16. Reported per Llama-3.2 layer shape: the orthonormality
    error ``||L~^T L~ - I||_2`` (largest deviation of a singular value from 1), the relative
    change of the adapter update ``||L~ Q R~ - L Q R||_F / ||L Q R||_F`` and of its norm for a
    random Gram matrix ``Q = A^T A`` (r = 4). The aggregation itself is unaffected: every party
    rounds the same way, and ``sum_n p_n L~ A_n^T A_n R~ = L~ (sum_n p_n A_n^T A_n) R~`` holds for
    any matrices, so the Gram aggregate is still exact (checked numerically).
(2) The W0 correction of FedEx-LoRA and FLoRA. The server keeps the cumulative correction ``C`` in
    float32. With a half-precision base florg keeps ``C`` apart from W0, in the base dtype, and
    adds ``C x`` to the base layer's output; the weight error is then the rounding of ``C`` itself,
    ``||round(C) - C||_F / ||C||_F``. Shown against merging it into the weight once per round,
    ``W0 = round(W0_pretrained + C)`` (``||round(W0 + C) - W0 - C|| / ||C||``; what florg does in
    float32, where it is exact to float32), and against an in-place accumulation
    ``W <- round(W + dC_t)`` (a naive implementation), after 10 rounds, for corrections of several
    sizes relative to ``||W0||_F``.

Results: a table on stdout, ``benchmarks/results_precision.json`` and the marked section
``precision`` of ``benchmarks/RESULTS.md``. CPU only, about a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import HERE, log, print_table, update_section

F64 = torch.float64
SHAPES = {  # (d_out, d_in) of the adapted projections
    "Llama-3.2-1B q_proj": (2048, 2048),
    "Llama-3.2-1B v_proj": (512, 2048),
    "Llama-3.2-3B q_proj": (3072, 3072),
    "Llama-3.2-3B v_proj": (1024, 3072),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _sym_norm(m: torch.Tensor, iters: int = 50) -> float:
    """Spectral norm of a symmetric matrix by power iteration (cheaper than a full decomposition)."""
    v = torch.ones(m.shape[0], dtype=m.dtype) / m.shape[0] ** 0.5
    lam = 0.0
    for _ in range(iters):
        w = m @ v
        lam = float(torch.linalg.vector_norm(w))
        if lam == 0.0:
            return 0.0
        v = w / lam
    return lam


def bases_rows(rank: int = 4, clients: int = 20) -> list[dict[str, Any]]:
    sys.path.insert(0, str(HERE.parent / "src"))
    from florg.core import make_bases

    out = []
    for label, (d_out, d_in) in SHAPES.items():
        log(f"  {label}")
        k = min(d_out, d_in)
        left64, right64 = make_bases(d_out, d_in, seed=0, layer_name=label, dtype=F64)
        g = torch.Generator().manual_seed(1)
        factors = [torch.randn(rank, k, generator=g, dtype=F64) for _ in range(clients)]
        stack = torch.cat(factors) / clients ** 0.5  # Q = stack^T stack = mean of A_n^T A_n
        exact = (left64 @ stack.T) @ (stack @ right64)
        eye = torch.eye(k, dtype=F64)
        for name, dtype in DTYPES.items():
            left, right = left64.to(dtype).to(F64), right64.to(dtype).to(F64)
            dev = max(_sym_norm(left.T @ left - eye), _sym_norm(right @ right.T - eye))  # ~ 2 max|sigma - 1|
            approx = (left @ stack.T) @ (stack @ right)  # the aggregate with the rounded bases
            mean = sum((left @ a.T) @ (a @ right) for a in factors) / clients  # the clients' own updates, averaged
            out.append({
                "shape": label, "k": k, "dtype": name,
                "orthonormality_error": dev,
                "update_rel_error": float(torch.linalg.matrix_norm(approx - exact) / torch.linalg.matrix_norm(exact)),
                "norm_rel_change": float(torch.linalg.matrix_norm(approx) / torch.linalg.matrix_norm(exact) - 1),
                "aggregate_vs_mean": float(torch.linalg.matrix_norm(approx - mean) / torch.linalg.matrix_norm(mean)),
            })
    return out


def w0_rows(rounds: int = 10, d: int = 2048) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    w0 = (0.02 * torch.randn(d, d, generator=g)).to(torch.bfloat16)  # pretrained weights as loaded (bf16)
    w0_64 = w0.to(F64)
    out = []
    for name, dtype in DTYPES.items():
        w0d = w0.to(dtype)
        w0d64 = w0d.to(F64)
        for scale in (1e-3, 1e-2, 1e-1):
            # a cumulative correction built from rank-8 steps, of Frobenius norm scale * ||W0||_F in the end
            steps = []
            for _ in range(rounds):
                u, v = torch.randn(d, 8, generator=g, dtype=F64), torch.randn(8, d, generator=g, dtype=F64)
                steps.append(u @ v)
            total = sum(steps)
            factor = scale * float(torch.linalg.matrix_norm(w0_64)) / float(torch.linalg.matrix_norm(total))
            steps = [s * factor for s in steps]
            c = torch.zeros(d, d, dtype=F64)
            naive = w0d.clone()
            for s in steps:
                c += s.float().to(F64)  # the server keeps C in float32
                naive = (naive.to(F64) + s).to(dtype)  # in-place accumulation in the base dtype
            rebuilt = (w0d64 + c).to(dtype)  # W0_pretrained + C, merged with one rounding
            apart = c.to(dtype).to(F64)  # florg with a half-precision base: C in its own buffer
            cn = float(torch.linalg.matrix_norm(c))
            out.append({
                "dtype": name, "correction_rel_norm": scale,
                "apart_rel_error": float(torch.linalg.matrix_norm(apart - c)) / cn,
                "rebuild_rel_error": float(torch.linalg.matrix_norm(rebuilt.to(F64) - w0d64 - c)) / cn,
                "naive_rel_error": float(torch.linalg.matrix_norm(naive.to(F64) - w0d64 - c)) / cn,
            })
    return out


def markdown(res: dict[str, Any]) -> str:
    b = res["bases"]
    lines = [
        "## Half-precision bases and base weights (`benchmarks/bench_precision.py`)", "",
        "FLoRG's bases are drawn in float64 and rounded once to the base dtype (they stay in it: a copy in float32 "
        "would cost twice the memory). r = 4, 20 random client factors; *update error* = "
        "`||L~ Q R~ - L Q R|| / ||L Q R||` of the aggregated update, *aggregate vs mean* = the Gram aggregate against "
        "the mean of the clients' own updates with the same rounded bases (exact up to float64 round-off: rounding "
        "the bases does not break the exact aggregation).", "",
        "| layer | k | dtype | orthonormality error `||L~^T L~ - I||_2` (max with R~) | update error | norm change "
        "| aggregate vs mean |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['shape']} | {r['k']} | {r['dtype']} | {r['orthonormality_error']:.1e} | {r['update_rel_error']:.1e} | "
          f"{r['norm_rel_change']:+.1e} | {r['aggregate_vs_mean']:.1e} |" for r in b], "",
        "Effect: the adapter's update is `s L~ A^T A R~` instead of `s L A^T A R`, a fixed perturbation of the bases "
        "of about the dtype's rounding (bfloat16: ~2e-3 of the update, float16: ~3e-4), the same for every client and "
        "round. Training "
        "adapts `A` to the bases it has, so this is a slightly different (still full-rank, nearly orthonormal) "
        "basis, not an error that grows. Norms are preserved to the same order, which matters for the DP clipping "
        "bound (the singular values of `L~`, `R~` are within about half the orthonormality error of 1, so the "
        "sensitivity grows by at most that factor squared).", "",
        f"The W0 correction of FedEx-LoRA and FLoRA, a {res['w0_dim']} x {res['w0_dim']} weight (N(0, 0.02^2), stored "
        f"in the dtype), a correction `C` grown over {res['rounds']} rounds: relative error of the correction the "
        "model applies.", "",
        "| dtype | norm of C relative to W0 | florg: C kept apart in the dtype | merged: round(W0 + C) once per round | "
        "in-place accumulation in the dtype |",
        "|---|---|---|---|---|",
        *[f"| {r['dtype']} | {r['correction_rel_norm']:.0e} | {r['apart_rel_error']:.2e} | {r['rebuild_rel_error']:.2e} | "
          f"{r['naive_rel_error']:.2e} |" for r in res["w0"]], "",
        "Rounding `W0 + C` has an absolute error of half an ulp of W0's entries, so it is large *relative to a small "
        "C*: merged into a bfloat16 W0, most of a correction of 1e-3 of W0's norm is lost, in every round (rebuilt "
        "from the pretrained weight, it does not compound; accumulated in place it does). Kept apart, `C` is rounded "
        "relative to itself (~2e-3 in bfloat16), at the memory the pretrained copy would take and one extra matrix "
        "product per adapted layer. The activations `W0 x + C x` are still rounded to the dtype like every other "
        "activation (as LoRA's own update is); FeDeRA changes W0 only once, at its initialisation (PiSSA, as PEFT "
        "does in any dtype).", "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--json", default=str(HERE / "results_precision.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse-bases", action="store_true", help="take the bases rows from the previous JSON output")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.reuse_bases:
        bases = json.loads(Path(args.json).read_text())["bases"]
    else:
        log("bases ...")
        bases = bases_rows()
    log("W0 ...")
    res = {"bases": bases, "w0": w0_rows(), "w0_dim": 2048, "rounds": 10}
    print_table(["layer", "dtype", "sv dev", "update err", "norm change", "agg vs mean"],
                [[r["shape"], r["dtype"], f"{r['orthonormality_error']:.1e}", f"{r['update_rel_error']:.1e}",
                  f"{r['norm_rel_change']:+.1e}", f"{r['aggregate_vs_mean']:.1e}"] for r in bases], title="bases")
    print_table(["dtype", "|C| / |W0|", "apart", "merged", "in place"],
                [[r["dtype"], f"{r['correction_rel_norm']:.0e}", f"{r['apart_rel_error']:.2e}",
                  f"{r['rebuild_rel_error']:.2e}", f"{r['naive_rel_error']:.2e}"] for r in res["w0"]], title="W0")
    Path(args.json).write_text(json.dumps(res, indent=1))
    update_section(args.results, "precision", markdown(res))
    log(f"wrote {args.json} and the precision section of {args.results}")
    return res


if __name__ == "__main__":
    main()

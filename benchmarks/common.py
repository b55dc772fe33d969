"""Shared helpers for the benchmarks: timing, memory probes, machine description, JSON output."""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PLOTS = HERE / "plots"

# Offline by default: the benchmarks never need the network.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)


# --------------------------------------------------------------------------- timing


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (``os.getloadavg``), rounded."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [float("nan")] * 3


def summarise(times: list[float]) -> dict[str, Any]:
    """Median, min, max and count of a list of durations in seconds."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "reps": len(times),
        "times_s": list(times),
    }


def time_fn(
    fn: Callable[[], Any],
    *,
    reps: int,
    warmup: int = 1,
    max_seconds: float | None = None,
    min_reps: int = 1,
) -> dict[str, Any]:
    """Time ``fn()`` ``reps`` times after ``warmup`` untimed calls (wall clock, ``perf_counter``).

    Also records the process CPU time per call (``cpu_median_s``; all threads together), which is
    less sensitive to other load on the machine than the wall clock.

    With ``max_seconds`` the loop stops early once at least ``min_reps`` repetitions ran and the
    budget is spent (used for the slow naive eigendecompositions).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if max_seconds is not None and len(times) >= min_reps and time.perf_counter() - start > max_seconds:
            break
    out = summarise(times)
    out["cpu_median_s"] = statistics.median(cpu)  # process CPU time (all threads) per call
    out["loadavg_after"] = loadavg()
    return out


# --------------------------------------------------------------------------- memory (CPU)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        return _status_bytes("VmRSS")
    except (OSError, KeyError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last :func:`reset_peak_rss`."""
    try:
        return _status_bytes("VmHWM")
    except (OSError, KeyError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def release_free_memory() -> None:
    """Collect garbage and hand free heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager: peak RSS above the RSS at entry, for the code inside.

    Frees cached heap memory first (``malloc_trim``) so that the block's allocations show up as
    new resident pages, then resets the kernel's high-water mark and reads it at exit.
    """

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self.exact = reset_peak_rss()
        self.base = rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = peak_rss_bytes()
        self.delta = max(0, self.peak - self.base)


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and package versions, GPU (if any), date."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "numpy", "matplotlib", "psutil", "florg"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = "not installed"
    if versions.get("florg") == "?":
        from importlib.metadata import PackageNotFoundError, version

        try:
            versions["florg"] = version("florg")
        except PackageNotFoundError:
            pass
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    blas = "MKL" if torch.backends.mkl.is_available() else "other"
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": round(total_ram_bytes() / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "blas": blas,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gpu": gpu,
        "versions": versions,
        "loadavg_start": loadavg(),
    }


# --------------------------------------------------------------------------- output


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
        fh.write("\n")


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{ms:,.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def print_table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    """Print (and return) a plain-text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    lines.append("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    text = "\n".join(lines)
    print(text, flush=True)
    print(flush=True)
    return text


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- marked sections of RESULTS.md

_SECTION_BEGIN = "<!-- section:{} -->"
_SECTION_END = "<!-- /section:{} -->"


def marked_sections(text: str) -> dict[str, str]:
    """``{name: block}`` of every marked section in ``text`` (markers included), in order."""
    import re

    out: dict[str, str] = {}
    for m in re.finditer(r"<!-- section:([\w.-]+) -->.*?<!-- /section:\1 -->\n?", text, flags=re.S):
        out[m.group(1)] = m.group(0).rstrip("\n") + "\n"
    return out


def update_section(path: str | os.PathLike[str], name: str, body: str) -> None:
    """Replace the marked section ``name`` of the Markdown file ``path`` by ``body`` (appended if absent).

    Benchmarks that run on their own (the device check, the round-overhead and precision
    measurements) keep their results in such sections; ``run_all.py`` carries them over when it
    rewrites the rest of the file.
    """
    path = Path(path)
    block = f"{_SECTION_BEGIN.format(name)}\n{body.rstrip()}\n{_SECTION_END.format(name)}\n"
    old = path.read_text() if path.is_file() else ""
    current = marked_sections(old).get(name)
    if current is not None:
        new = old.replace(current, block)
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)

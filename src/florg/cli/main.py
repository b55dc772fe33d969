"""``florg`` command line: ``florg run``, ``florg compare``, ``florg study``, ``florg config``, ``florg predict``.

Bad input (config keys and values, missing data or model, impossible partitions) ends with one
line naming the field and the fix, exit code 2, and no run directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import tomli_w
import typer
from rich.table import Table

from florg import __version__
from florg.config import RUNTIME_KEYS, ConfigError, RunConfig, config_keys, load_config, method_names, recommended_settings
from florg.data import format_partition_stats
from florg.run.rundir import RunDir, _toml_safe

from .common import console, err_console, fail, fmt_bytes
from .study import study_app

if TYPE_CHECKING:
    from florg.study.compare import RunSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated fine-tuning with FLoRG on Flower.")
app.add_typer(study_app, name="study")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (see configs/).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config key: --set train.rounds=5 (repeatable).")
]


def _version(value: bool) -> None:
    if value:
        console.print(f"florg {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print florg's version and exit.")] = False,
) -> None:
    """Federated fine-tuning with FLoRG on Flower."""


def _load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable


_SHORT = {"accuracy": "acc", "perplexity": "ppl", "exact_match": "em"}


def _reporter(total_rounds: int) -> Callable[[dict[str, Any]], None]:
    def report(row: dict[str, Any]) -> None:
        r = row["round"]
        bar = "#" * r + "." * (total_rounds - r)
        agg = row.get("timing", {}).get("agg_seconds")
        agg_txt = f"  agg {agg * 1000:6.1f} ms" if agg is not None else ""
        tests = [(k[5:], v) for k, v in row.items() if k.startswith("test_")]
        metrics = "  ".join((f"{_SHORT.get(n, n)} [bold]{v:.4f}[/]" if i == 0 else f"{_SHORT.get(n, n)} {v:.4f}")
                            for i, (n, v) in enumerate(tests))
        console.print(
            f"round {r:>3}/{total_rounds} \\[{bar}]  {metrics}  "
            f"up {fmt_bytes(row.get('bytes_up', 0))} (cum {fmt_bytes(row.get('bytes_up_cum', 0))})  "
            f"down {fmt_bytes(row.get('bytes_down', 0))} (cum {fmt_bytes(row.get('bytes_down_cum', 0))})  "
            f"clients {row.get('participants', 0)}{agg_txt}"
        )

    return report


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's and Ray's own INFO logs.")] = False,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Live progress bars (rounds; clients replied in the round, "
                     "elapsed, time left). Default: on when the output is a terminal."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue an interrupted (or failed) run from its last checkpoint; --set may "
                     "change only keys that do not change the results (e.g. train.device, train.grad_accum, "
                     "train.gradient_checkpointing)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Local data folder (same as --set data.data_dir=...).")
    ] = None,
) -> None:
    """Run a federated fine-tuning job on the embedded simulation engine and write a run directory."""
    # lazy: keeps florg --help under 1 s (torch)
    from florg.run.experiment import get_experiment, set_offline_env

    set_offline_env()
    if resume is not None:
        if config is not None:
            fail("--resume takes its config from RUN_DIR/config.toml; drop --config")
        changed = [item.split("=", 1)[0].strip() for item in set_ or []]
        if bad := [k for k in changed if k not in RUNTIME_KEYS]:
            fail(f"--resume takes its config from RUN_DIR/config.toml; --set may change only keys that do not change "
                  f"what the run computes ({', '.join(RUNTIME_KEYS)}), not {bad[0]}")
        if not (resume / "config.toml").is_file():
            fail(f"--resume: '{resume}' is not a florg run directory (no config.toml)")
        if RunDir(resume).status().get("status") == "complete":
            fail(f"--resume: the run in '{resume}' is already complete")
        # lazy: keeps florg --help under 1 s (torch)
        from florg.run.checkpoint import CheckpointError, load_checkpoint

        try:
            load_checkpoint(resume)  # JSON + safetensors only; refuses pickles and damaged pairs
        except CheckpointError as exc:
            fail(f"--resume: {_one_line(exc)}")
        config = resume / "config.toml"
    if data_dir is not None:
        set_ = [*(set_ or []), f"data.data_dir={str(data_dir)!r}"]
    cfg = _load(config, set_)
    if resume is not None and set_:
        RunDir(resume).write_config(cfg)  # the run continues with (and records) the changed runtime keys
    t0 = time.perf_counter()
    console.print(f"[bold]florg run[/]: {cfg.method.name} on {cfg.data.task} with {cfg.model.name}, "
                  f"{cfg.data.num_clients} clients, {cfg.train.rounds} rounds, r={cfg.method.rank}")
    from florg.device import resolve_device  # lazy: keeps florg --help under 1 s (torch)
    from florg.fl.simulation import check_gpu_settings  # lazy: keeps florg --help under 1 s (flwr)

    try:
        exp = get_experiment(cfg)  # validates data, model and targets before anything is written
        exp.use_device(resolve_device(cfg.train.device))  # the device exists and can compute in model.dtype
        check_gpu_settings(cfg, warn=False)  # run_simulation_engine checks again and warns
    except (ConfigError, ValueError, FileNotFoundError, OSError, KeyError) as exc:
        fail(_one_line(exc))
        return
    console.print(format_partition_stats(exp.partition_summary, exp.label_names), markup=False)
    console.print(f"test split {len(exp.test)} examples; adapted modules: {', '.join(exp.target_modules)}; "
                  f"device {exp.device}")

    if resume is not None:
        run_dir = RunDir(resume)
    else:
        try:
            run_dir = RunDir.create(cfg)
        except FileExistsError as exc:
            fail(str(exc))
            return
    console.print(f"run directory: {run_dir.path}" + (" (resuming)" if resume is not None else ""))
    summary = _run_engine(cfg, run_dir, verbose=verbose, resume=resume is not None,
                          progress=console.is_terminal if progress is None else progress)
    table = Table(title=f"florg run summary ({run_dir.path})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    metric = summary["metric"]
    table.add_row(f"{metric} before", f"{summary[metric + '_before']:.4f}")
    table.add_row(f"{metric} after", f"{summary[metric + '_after']:.4f}")
    for key, value in summary.items():  # the task family's extras, e.g. rouge_l_before / rouge_l_after
        if key.endswith(("_before", "_after")) and not key.startswith(metric + "_") and isinstance(value, float):
            table.add_row(key.replace("_before", " before").replace("_after", " after"), f"{value:.4f}")
    if summary.get("generations"):
        table.add_row("generations", str(run_dir.path / summary["generations"]))
    table.add_row("bytes up (total)", fmt_bytes(summary["bytes_up_total"]))
    table.add_row("bytes down (total)", fmt_bytes(summary["bytes_down_total"]))
    table.add_row("wall time", f"{time.perf_counter() - t0:.1f} s")
    console.print(table)
    console.print(f"adapter and model card: {run_dir.path / 'adapter'}; predictions: florg predict {run_dir.path} "
                  "TEXT... (florg predict --help)", markup=False)


def _run_engine(cfg: RunConfig, run_dir: Any, *, verbose: bool, resume: bool, progress: bool) -> dict[str, Any]:
    """The simulation with the per-round lines, the live progress display and Ctrl-C/SIGTERM handling."""
    # lazy: keeps florg --help under 1 s (flwr)
    from florg.fl.simulation import RunFailed, RunInterrupted, run_simulation_engine

    report = _reporter(cfg.train.rounds)
    live = None
    if progress:
        # lazy: keeps florg --help under 1 s (flwr)
        from florg.cli.live import LiveProgress

        done = max((int(r["round"]) for r in run_dir.read_metrics()), default=0) if resume else 0
        live = LiveProgress(console, cfg.train.rounds, done)

        def report_row(row: dict[str, Any]) -> None:
            report(row)
            live.on_row(row)
    else:
        report_row = report
    try:
        with live if live is not None else contextlib.nullcontext():
            return run_simulation_engine(cfg, run_dir, reporter=report_row, verbose=verbose, resume=resume,
                                         on_progress=live.on_reply if live is not None else None,
                                         handle_signals=True)
    except (RunInterrupted, KeyboardInterrupt) as exc:  # (KeyboardInterrupt: Ctrl-C before the simulation started)
        if run_dir.status().get("status") in (None, "running"):
            run_dir.set_status("interrupted")
        err_console.print(f"[bold yellow]interrupted:[/] status.json says 'interrupted'; continue with:\n"
                          f"  florg run --resume {run_dir.path}")
        sig = signal.SIGTERM if "SIGTERM" in str(exc) else signal.SIGINT
        # The run is recorded and its processes are gone; Flower's simulation threads may still be unwinding
        # (a normal interpreter exit waits for them for seconds), so exit now with the usual signal exit code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + int(sig))
    except RunFailed as exc:
        fail(f"{_one_line(exc)}; once the cause is fixed, continue with: florg run --resume {run_dir.path}")
        raise  # unreachable


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]
    return " ".join(text.split())


@app.command("config")
def show_config(config: ConfigOpt = None, set_: SetOpt = None,
                keys: Annotated[bool, typer.Option("--keys", help="List every key with its default and help.")] = False) -> None:
    """Print the resolved config as TOML (or every key with its help text)."""
    cfg = _load(config, set_)
    if keys:
        table = Table()
        table.add_column("key")
        table.add_column("default")
        table.add_column("help")
        for key, (default, help_text) in config_keys().items():
            table.add_row(key, repr(default), help_text)
        console.print(table)
        rec = Table(title="Each method's recommended settings: they apply wherever a config file or --set leaves the key")
        rec.add_column("method")
        rec.add_column("settings")
        for name in method_names():
            settings = recommended_settings(name)
            rec.add_row(name, ", ".join(f"{k} = {v!r}" for k, v in settings.items()) or "(the defaults above)")
        console.print(rec)
        return
    sys.stdout.write(tomli_w.dumps(_toml_safe(cfg.to_dict())))


@app.command()
def compare(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config shared by every run "
                                                   "(default: the built-in compare config, configs/compare.toml).")] = None,
    set_: SetOpt = None,
    seeds: Annotated[int, typer.Option("--seeds", help="Seeds per method (seed, seed+1, ...).")] = 1,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated subset, e.g. florg,fedit,florg-noalign "
                                         "(default: all).")] = "",
    directory: Annotated[Path | None, typer.Option("--dir", help="Compare directory (default: <out_dir>/<name "
                                                      "or 'compare'>); re-running resumes it.")] = None,
    target_fraction: Annotated[float, typer.Option("--target-fraction", help="Bytes-to-target uses this fraction "
                                                   "of the best final accuracy.")] = 0.95,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Flower's own INFO logs.")] = False,
) -> None:
    """Run every method (and the FLoRG alignment ablation) on one configuration and tabulate them."""
    from florg.fl.progress import RunInterrupted  # lazy: keeps florg --help under 1 s (flwr)
    from florg.run.experiment import set_offline_env  # lazy: keeps florg --help under 1 s (torch)
    from florg.study.compare import DISPLAY, compare_config, parse_methods, run_compare  # lazy: keeps --help under 1 s (torch)

    set_offline_env()
    try:
        cfg = load_config(config, set_ or []) if config is not None else compare_config(set_ or [])
        labels = parse_methods(methods)
    except ConfigError as exc:
        fail(str(exc))
        return
    out = directory or Path(cfg.out_dir) / (cfg.name or "compare")
    console.print(f"[bold]florg compare[/]: {', '.join(DISPLAY[m] for m in labels)}; {seeds} seed(s); "
                  f"{cfg.model.name} on {cfg.data.task}, {cfg.data.num_clients} clients, {cfg.train.rounds} rounds, "
                  f"r={cfg.method.rank}")

    def reporter(spec: RunSpec) -> Callable[[dict[str, Any]], None]:
        inner = _reporter(spec.cfg.train.rounds)

        def report(row: dict[str, Any]) -> None:
            console.print(f"  {spec.name:<22}", end="")
            inner(row)
            for key in [k for k in row if k.startswith("personal_") and not k.endswith(("_min", "_max", "_clients"))]:
                name = key[len("personal_"):]
                console.print(f"  {'':<22}personalised {_SHORT.get(name, name)} {row[key]:.4f}")

        return report

    try:
        result = run_compare(cfg, out, labels, seeds, target_fraction, log=lambda m: console.print(m, markup=False),
                             reporter=reporter, verbose=verbose)
    except ConfigError as exc:
        fail(str(exc))
        return
    except (KeyboardInterrupt, RunInterrupted):
        err_console.print(f"[bold yellow]interrupted:[/] re-run the same command to continue the comparison in {out}")
        raise typer.Exit(code=130) from None
    console.print((out / "results.md").read_text(), markup=False)
    console.print(f"compare directory: {out}")
    if result.get("failed"):
        err_console.print(f"[bold red]failed runs:[/] {', '.join(result['failed'])} (re-run the same command to retry)")
        raise typer.Exit(code=1)


@app.command("predict")
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A completed run directory (with adapter/).")],
    texts: Annotated[list[str], typer.Argument(help="Texts to classify, questions (extractive QA) or prompts "
                                               "(instruction tuning).")],
    context: Annotated[str | None, typer.Option("--context", help="Extractive QA: the passage the questions are "
                                                "answered from.")] = None,
    pair: Annotated[list[str] | None, typer.Option("--pair", help="Classification of text pairs (e.g. glue/rte): "
                                                   "the second text, once per TEXT, in order.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classification: how many classes to show per text.")] = 3,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Instruction tuning: the longest greedy "
                                                "generation, in tokens.")] = 64,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1, ... (default: cpu).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per text instead of a table.")] = False,
) -> None:
    """Load a run's base model and final adapter and print its predictions (python: florg.predict(run_dir, texts))."""
    # lazy: looked up per call: tests/test_outputs.py patches florg.run.predict.load_run_model
    from florg.run.predict import check_request, load_run_model, predict

    try:
        # Every argument is checked against the run's config.toml before torch or the model is loaded
        # (check_request imports neither: a bad argument fails in well under a second).
        check_request(run_dir, texts, context=context, pairs=pair, top_k=top_k, max_new_tokens=max_new_tokens)
        run_model = load_run_model(run_dir, device=device)
        rows = predict(run_model, texts, context=context, pairs=pair, top_k=top_k, max_new_tokens=max_new_tokens)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as exc:
        fail(_one_line(exc))
        return
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    table = Table(title=f"{run_model.family.name} predictions ({run_dir})")
    if run_model.family.name == "classification":
        table.add_column("text")
        table.add_column("label")
        table.add_column("probability", justify="right")
        table.add_column("top classes")
        for row in rows:
            text = row["text"] + (f" | {row['pair']}" if "pair" in row else "")
            table.add_row(text, row["label"], f"{row['probability']:.3f}",
                          ", ".join(f"{n} {p:.3f}" for n, p in row["top"]))
    elif run_model.family.name == "extractive-qa":
        table.add_column("question")
        table.add_column("answer")
        for row in rows:
            table.add_row(row["question"], row["answer"])
    else:
        table.add_column("prompt")
        table.add_column("generation")
        for row in rows:
            table.add_row(row["prompt"], row["generation"])
    console.print(table, markup=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

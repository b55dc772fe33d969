"""The florg ServerApp: run the strategy, evaluate the global model centrally, write the run directory.

``run_server(grid, cfg, run_dir)`` is the whole server side; the embedded simulation
(``florg.fl.simulation``) wraps it in a ServerApp bound to a resolved config. The module-level
``app`` is the ServerApp for deployments started with ``flwr run``: it reads its config from
the Flower run config (:func:`app_config`): ``config-file`` (a florg TOML file, optional),
``overrides`` (``key=value`` pairs separated by spaces), the main settings as keys of their own
(:data:`APP_CONFIG_KEYS`, e.g. ``num-server-rounds``) and ``run-dir``.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from florg.config import ConfigError, RunConfig, config_keys, field_aliases, given_keys, load_config, read_toml
from florg.device import autocast, resolve_device
from florg.run.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from florg.run.experiment import Experiment, get_experiment
from florg.run.outputs import describe_adapters
from florg.run.plots import plot_runs
from florg.run.rundir import RunDir

from .progress import ProgressFn, ProgressGrid, RunInterrupted, log_progress
from .records import from_record, quantize, to_record
from .strategy import AdapterStrategy, RoundLog

__all__ = ["APP_CONFIG_KEYS", "app", "app_config", "evaluated_splits", "run_server"]

Reporter = Callable[[dict[str, Any]], None]


def _print_reporter(row: dict[str, Any]) -> None:
    metrics = "  ".join(f"{k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("test_"))
    print(
        f"[florg] round {row['round']:>3}  {metrics}  "
        f"up {row.get('bytes_up', 0):>10,d} B  down {row.get('bytes_down', 0):>10,d} B  "
        f"clients {row.get('participants', 0)}",
        flush=True,
    )


def run_server(
    grid: Grid,
    cfg: RunConfig,
    run_dir: RunDir,
    reporter: Reporter | None = None,
    experiment: Experiment | None = None,
    resume: bool = False,
    on_progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run all rounds on ``grid``; returns the run summary (also written to ``summary.json``).

    With ``resume=True`` the run continues after the last round checkpointed in ``run_dir``.
    ``on_progress`` receives the replies of each round as they arrive
    (:class:`florg.fl.progress.ReplyProgress`); once ``stop`` is set the run ends at the next
    poll with :class:`florg.fl.progress.RunInterrupted`, ``status.json`` saying ``interrupted``
    (continue it with ``florg run --resume RUN_DIR``).
    """
    t_start = time.perf_counter()
    if on_progress is not None or stop is not None:
        grid = ProgressGrid(grid, on_progress, stop)
    exp = _prepare(cfg, run_dir, experiment)
    progress = _resume(run_dir, exp, resume)
    strategy = AdapterStrategy.from_config(exp.method, cfg, round_log=RoundLog(), round_offset=progress.done)
    _restore_strategy(strategy, progress.checkpoint)
    evaluate_fn = _evaluation(cfg, exp, run_dir, strategy, progress, reporter or _print_reporter, t_start)
    try:
        final = _train(grid, cfg, strategy, progress, evaluate_fn)
        return _finish(cfg, exp, run_dir, final, progress, t_start)
    except RunInterrupted:
        run_dir.set_status("interrupted", rounds_done=progress.rows[-1]["round"] if progress.rows else 0)
        raise
    except BaseException as exc:
        run_dir.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise


@dataclass
class _Progress:
    """Where the run stands: rounds done, the global state to continue from, rows and byte counters so far."""

    done: int
    initial: dict[str, torch.Tensor]
    rows: list[dict[str, Any]]
    cumulative: dict[str, int]
    checkpoint: dict[str, Any] | None = None


def _prepare(cfg: RunConfig, run_dir: RunDir, experiment: Experiment | None) -> Experiment:
    """Build (or take) the experiment, move it to ``train.device`` and write ``partitions.json``."""
    try:  # a failure while building the model/data must not leave status.json at "running"
        exp = experiment or get_experiment(cfg)
        exp.use_device(resolve_device(cfg.train.device))  # central evaluation runs there
        run_dir.write_json("partitions.json", exp.partition_summary)
        return exp
    except BaseException as exc:
        run_dir.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise


# ------------------------------------------------------------------------------------ resume
def _resume(run_dir: RunDir, exp: Experiment, resume: bool) -> _Progress:
    """A fresh start, or (``resume``) the state after the last checkpointed round.

    Restores the RNG states and drops the metrics rows of a round that was cut short; a run
    interrupted before its first checkpoint starts over.
    """
    initial = {k: v.clone() for k, v in exp.initial_state.items()}
    ckpt = load_checkpoint(run_dir.path) if resume else None
    if not ckpt:
        if resume:  # interrupted before the first checkpoint: start over
            run_dir.rewrite_metrics([])
            run_dir.set_status("running")
        return _Progress(0, initial, [], {"bytes_up": 0, "bytes_down": 0})
    if (problem := exp.method.resume_problem) is not None:
        error = ConfigError(f"--resume: method '{exp.method.name}' cannot continue this run: {problem}")
        run_dir.set_status("failed", error=str(error))
        raise error
    done = int(ckpt["round"])
    restore_rng(ckpt)
    rows = [r for r in run_dir.read_metrics() if r["round"] <= done]
    run_dir.rewrite_metrics(rows)
    run_dir.set_status("running", resumed_from_round=done)
    return _Progress(done, ckpt["state"], rows, dict(ckpt["cumulative"]), ckpt)


def _restore_strategy(strategy: AdapterStrategy, ckpt: dict[str, Any] | None) -> None:
    """The strategy's own state from the checkpoint: node -> partition map, privacy accountant."""
    if not ckpt:
        return
    strategy._node_partition = dict(ckpt.get("node_partition", {}))
    if strategy.privacy is not None and ckpt.get("privacy"):
        strategy.privacy.load_state_dict(ckpt["privacy"])  # epsilon keeps counting across the resume


# -------------------------------------------------------------------------------- evaluation
def _evaluation(
    cfg: RunConfig,
    exp: Experiment,
    run_dir: RunDir,
    strategy: AdapterStrategy,
    progress: _Progress,
    reporter: Reporter,
    t_start: float,
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """The per-round ``evaluate_fn``: central evaluation, the metrics row, then the checkpoint."""
    done, cumulative = progress.done, progress.cumulative

    def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + done
        if flower_round == 0 and progress.checkpoint is not None:
            return None  # the resumed starting point was evaluated before the interruption (also round 0)
        t0 = time.perf_counter()
        state = from_record(arrays)
        exp.method.load_global(exp.model, state)
        test_now, val_now = evaluated_splits(cfg, server_round)
        res = exp.evaluate() if test_now else None
        val = exp.evaluate(exp.validation) if val_now and exp.validation is not None else None
        info = strategy.round_log.get(server_round)
        timing = {"eval_seconds": time.perf_counter() - t0, "wall_seconds": time.perf_counter() - t_start}
        if "agg_seconds" in info:
            timing["agg_seconds"] = info.pop("agg_seconds")
        up, down = int(info.get("bytes_up", 0)), int(info.get("bytes_down", 0))
        cumulative["bytes_up"] += up
        cumulative["bytes_down"] += down
        row = {
            "round": server_round,
            **({f"test_{name}": res[name] for name in exp.family.metrics} if res is not None else {}),
            **({f"val_{name}": val[name] for name in exp.family.metrics} if val is not None else {}),
            **info,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_up_cum": cumulative["bytes_up"],
            "bytes_down_cum": cumulative["bytes_down"],
            "bytes_total_cum": cumulative["bytes_up"] + cumulative["bytes_down"],
            "timing": timing,
        }
        progress.rows.append(row)
        run_dir.append_metrics(row)  # the row first, then the checkpoint: see florg.run.checkpoint
        _checkpoint(cfg, run_dir, strategy, server_round, state, cumulative)
        reporter(row)
        return MetricRecord({name: float(res[name]) for name in exp.family.metrics}) if res is not None else None

    return evaluate_fn


def evaluated_splits(cfg: RunConfig, server_round: int) -> tuple[bool, bool]:
    """Whether round ``server_round`` evaluates the test split and the validation split
    (``eval.test_rounds``, ``eval.validation_rounds``; round 0 is the untrained model)."""
    last = cfg.train.rounds
    test = cfg.eval.test_rounds == "all" or server_round in (0, last)
    val = {"all": True, "last3": server_round > last - 3 and server_round > 0, "none": False}[cfg.eval.validation_rounds]
    return test, val


def _checkpoint(cfg: RunConfig, run_dir: RunDir, strategy: AdapterStrategy, server_round: int,
                state: dict[str, torch.Tensor], cumulative: dict[str, int]) -> None:
    save_checkpoint(run_dir.path, {
        "round": server_round,
        "state": state,
        "cumulative": dict(cumulative),
        "node_partition": dict(strategy._node_partition),
        "config": cfg.to_dict(),
        "privacy": strategy.privacy.state_dict() if strategy.privacy is not None else None,
    })


# ------------------------------------------------------------------------------------ rounds
def _train(grid: Grid, cfg: RunConfig, strategy: AdapterStrategy, progress: _Progress,
           evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]) -> dict[str, torch.Tensor]:
    """Run the remaining rounds; the final global state (as the clients decode it)."""
    wire_dtype = cfg.federation.wire_dtype
    remaining = cfg.train.rounds - progress.done
    if remaining <= 0:
        return quantize(progress.initial, wire_dtype)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_record(progress.initial, wire_dtype),
        num_rounds=remaining,
        timeout=cfg.federation.round_timeout,
        evaluate_fn=evaluate_fn,
    )
    return from_record(result.arrays) if len(result.arrays) else quantize(progress.initial, wire_dtype)


# ------------------------------------------------------------------------------------ finish
def _finish(cfg: RunConfig, exp: Experiment, run_dir: RunDir, final: dict[str, torch.Tensor],
            progress: _Progress, t_start: float) -> dict[str, Any]:
    """The final adapter files, the plots, ``summary.json`` and the ``complete`` status."""
    exp.method.load_global(exp.model, final)
    _save_adapters(exp, run_dir)
    with autocast(exp.device, exp.dtype):
        extras = exp.family.finish(exp.model, exp, run_dir.path) or {}  # the family's extras (e.g. generations)
    rows, cumulative = progress.rows, progress.cumulative
    primary = exp.family.primary_metric
    plot_runs({cfg.method.name: rows}, run_dir.path / "plots", title=f"{cfg.method.name} on {cfg.data.task}",
              metric=primary)
    summary = {
        "metric": primary,
        f"{primary}_before": rows[0][f"test_{primary}"] if rows else None,
        f"{primary}_after": rows[-1][f"test_{primary}"] if rows else None,
        "rounds": cfg.train.rounds,
        "bytes_up_total": cumulative["bytes_up"],
        "bytes_down_total": cumulative["bytes_down"],
        "bytes_total": cumulative["bytes_up"] + cumulative["bytes_down"],
        "wall_seconds": time.perf_counter() - t_start,
    }
    personal = f"personal_{primary}"
    if rows and personal in rows[-1]:
        summary[f"{personal}_after"] = rows[-1][personal]
    summary.update(extras)
    if progress.done:
        summary["resumed_from_round"] = progress.done
    run_dir.write_json("summary.json", summary)
    describe_adapters(exp, run_dir.path, summary)  # task_type, portable base id, labels, tokenizer, model card
    run_dir.set_status("complete", rounds=len(rows) - 1)
    return summary


def _save_adapters(exp: Experiment, run_dir: RunDir) -> None:
    """The final global model's adapter files (the method decides: PEFT format, LoRA export, W0 delta)."""
    exp.method.save_artifacts(exp.model, run_dir.path)


#: ``[tool.flwr.app.config]`` keys of florg's Flower App -> the florg config keys they set: the config fields
#: whose metadata names an ``app_key`` (the app's pyproject.toml holds florg's defaults for them)
APP_CONFIG_KEYS = field_aliases("app_key")


def app_config(run_config: Mapping[str, Any]) -> RunConfig:
    """The run config of florg's Flower App from its Flower run config (``context.run_config``).

    Florg's defaults, then ``config-file``, then ``overrides``; then each key of
    :data:`APP_CONFIG_KEYS` whose value differs from florg's default (a key left at its default
    leaves the file's and the overrides' value). A setting given both ways with different values
    is a :class:`ConfigError` naming both; a value of the wrong type is one too.
    """
    file = str(run_config.get("config-file", "")) or None
    overrides = shlex.split(str(run_config.get("overrides", "")))
    base = load_config(file, overrides)
    given = given_keys(read_toml(file, "config file", "configs/demo.toml")) if file else set()
    given |= {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    defaults, have = config_keys(RunConfig()), config_keys(base)
    settings = []
    for app_key, key in APP_CONFIG_KEYS.items():
        if app_key not in run_config:
            continue
        value, default, current = run_config[app_key], defaults[key][0], have[key][0]
        if value == default:
            continue
        if key in given and current not in (default, value):  # a value the file/overrides set, not a method's default
            raise ConfigError(
                f"config key '{key}' is {current!r} in config-file/overrides and {value!r} in the run config key "
                f"'{app_key}'; set it in one place (--run-config \"{app_key}=...\" or the file/overrides)"
            )
        settings.append(f"{key}={json.dumps(value)}")
    try:  # once more with the run config's keys as overrides: what none of them sets is the method's default
        return load_config(file, overrides + settings)
    except ConfigError as exc:
        names = {v: k for k, v in APP_CONFIG_KEYS.items()}
        key = str(exc).split("'")[1] if "'" in str(exc) else ""
        if key not in names:
            raise
        raise ConfigError(f"run config key '{names[key]}': {exc}") from None


app = ServerApp()


@app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = app_config(rc)
    run_dir_path = str(rc.get("run-dir", "")) or None
    run_server(grid, cfg, RunDir.create(cfg, run_dir_path), on_progress=log_progress)


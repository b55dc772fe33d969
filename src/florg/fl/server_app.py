"""The florg ServerApp: run the strategy, evaluate the global model centrally, write the run directory.

``run_server(grid, cfg, run_dir)`` is the whole server side; the embedded simulation
(``florg.fl.simulation``) wraps it in a ServerApp bound to a resolved config. The module-level
``app`` is the ServerApp for deployments started with ``flwr run``: it reads its config from
the Flower run config keys ``config-file`` (a florg TOML file, optional), ``overrides``
(``key=value`` pairs separated by spaces) and ``run-dir``.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from florg.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from florg.config import RunConfig, load_config
from florg.experiment import Experiment, get_experiment
from florg.rundir import RunDir
from florg.train import round_lr

from .records import from_record, quantize, to_record
from .strategy import AdapterStrategy, RoundLog

__all__ = ["run_server", "app"]

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
) -> dict[str, Any]:
    """Run all rounds on ``grid``; returns the run summary (also written to ``summary.json``).

    With ``resume=True`` the run continues after the last round checkpointed in ``run_dir``.
    """
    reporter = reporter or _print_reporter
    t_start = time.perf_counter()
    try:  # a failure while building the model/data must not leave status.json at "running"
        exp = experiment or get_experiment(cfg)
        method = exp.method
        run_dir.write_json("partitions.json", exp.partition_summary)
        initial = {k: v.clone() for k, v in exp.initial_state.items()}
    except BaseException as exc:
        run_dir.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    # Resume: continue after the last checkpointed round; rows of a round cut short are dropped.
    ckpt = load_checkpoint(run_dir.path) if resume else None
    done = int(ckpt["round"]) if ckpt else 0
    if ckpt:
        restore_rng(ckpt)
        initial = ckpt["state"]
        rows = [r for r in run_dir.read_metrics() if r["round"] <= done]
        run_dir.rewrite_metrics(rows)
        cumulative = dict(ckpt["cumulative"])
        run_dir.set_status("running", resumed_from_round=done)
    else:
        rows = []
        cumulative = {"bytes_up": 0, "bytes_down": 0}
        if resume:  # interrupted before the first checkpoint: start over
            run_dir.rewrite_metrics([])
            run_dir.set_status("running")
    round_log = RoundLog()
    strategy = AdapterStrategy(
        method,
        lr_fn=lambda rnd: round_lr(cfg.train, rnd),
        run_config_json=cfg.to_json(),
        seed=cfg.seed,
        fraction_train=cfg.federation.fraction_train,
        min_train_nodes=cfg.federation.min_train_nodes,
        min_available_nodes=cfg.federation.min_available_nodes,
        round_log=round_log,
        max_norm=cfg.federation.max_norm,
        round_offset=done,
        node_wait_timeout=cfg.federation.round_timeout,
        wire_dtype=cfg.federation.wire_dtype,
    )
    if ckpt:
        strategy._node_partition = dict(ckpt.get("node_partition", {}))
        if strategy.privacy is not None and ckpt.get("privacy"):
            strategy.privacy.load_state_dict(ckpt["privacy"])  # epsilon keeps counting across the resume

    def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + done
        if flower_round == 0 and done > 0:
            return None  # the resumed starting point was evaluated before the interruption
        t0 = time.perf_counter()
        state = from_record(arrays)
        method.load_global(exp.model, state)
        res = exp.evaluate()
        info = round_log.get(server_round)
        timing = {"eval_seconds": time.perf_counter() - t0, "wall_seconds": time.perf_counter() - t_start}
        if "agg_seconds" in info:
            timing["agg_seconds"] = info.pop("agg_seconds")
        up, down = int(info.get("bytes_up", 0)), int(info.get("bytes_down", 0))
        cumulative["bytes_up"] += up
        cumulative["bytes_down"] += down
        row = {
            "round": server_round,
            **{f"test_{name}": res[name] for name in exp.family.metrics},
            **info,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_up_cum": cumulative["bytes_up"],
            "bytes_down_cum": cumulative["bytes_down"],
            "bytes_total_cum": cumulative["bytes_up"] + cumulative["bytes_down"],
            "timing": timing,
        }
        rows.append(row)
        run_dir.append_metrics(row)  # the row first, then the checkpoint: see florg.checkpoint
        save_checkpoint(run_dir.path, {
            "round": server_round,
            "state": state,
            "cumulative": dict(cumulative),
            "node_partition": dict(strategy._node_partition),
            "config": cfg.to_dict(),
            "privacy": strategy.privacy.state_dict() if strategy.privacy is not None else None,
        })
        reporter(row)
        return MetricRecord({name: float(res[name]) for name in exp.family.metrics})

    try:
        remaining = cfg.train.rounds - done
        if remaining > 0:
            result = strategy.start(
                grid=grid,
                initial_arrays=to_record(initial, cfg.federation.wire_dtype),
                num_rounds=remaining,
                timeout=cfg.federation.round_timeout,
                evaluate_fn=evaluate_fn,
            )
            final = from_record(result.arrays) if len(result.arrays) else quantize(initial, cfg.federation.wire_dtype)
        else:
            final = quantize(initial, cfg.federation.wire_dtype)
        method.load_global(exp.model, final)
        _save_adapters(exp, run_dir)
        from florg.plots import plot_runs

        plot_runs({cfg.method.name: rows}, run_dir.path / "plots", title=f"{cfg.method.name} on {cfg.data.task}")
        primary = exp.family.primary_metric
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
        if rows and "personal_accuracy" in rows[-1]:
            summary["personal_accuracy_after"] = rows[-1]["personal_accuracy"]
        if done:
            summary["resumed_from_round"] = done
        run_dir.write_json("summary.json", summary)
        run_dir.set_status("complete", rounds=len(rows) - 1)
        return summary
    except BaseException as exc:
        run_dir.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _save_adapters(exp: Experiment, run_dir: RunDir) -> None:
    """The final global model's adapter files (the method decides: PEFT format, LoRA export, W0 delta)."""
    exp.method.save_artifacts(exp.model, run_dir.path)


app = ServerApp()


@app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    overrides = shlex.split(str(rc.get("overrides", "")))
    cfg = load_config(str(rc.get("config-file", "")) or None, overrides)
    run_dir_path = str(rc.get("run-dir", "")) or None
    run_server(grid, cfg, RunDir.create(cfg, run_dir_path))


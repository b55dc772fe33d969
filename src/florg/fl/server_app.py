"""The florg ServerApp: run the strategy, evaluate the global model centrally, write the run directory.

``make_server_app(cfg, run_dir)`` builds a ServerApp bound to a resolved config (used by the
embedded simulation). The module-level ``app`` is the same ServerApp for deployments started
with ``flwr run``: it reads its config from the Flower run config keys ``config-file`` (a florg
TOML file, optional), ``overrides`` (``key=value`` pairs separated by spaces) and ``run-dir``.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from florg.config import RunConfig, load_config
from florg.experiment import Experiment, get_experiment
from florg.rundir import RunDir
from florg.train import evaluate, round_lr

from .records import from_record, to_record
from .strategy import AdapterStrategy, RoundLog

__all__ = ["make_server_app", "run_server", "app"]

Reporter = Callable[[dict[str, Any]], None]


def _print_reporter(row: dict[str, Any]) -> None:
    print(
        f"[florg] round {row['round']:>3}  acc {row['test_accuracy']:.4f}  loss {row['test_loss']:.4f}  "
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
) -> dict[str, Any]:
    """Run all rounds on ``grid``; returns the run summary (also written to ``summary.json``)."""
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
    )
    cumulative = {"bytes_up": 0, "bytes_down": 0}
    rows: list[dict[str, Any]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t0 = time.perf_counter()
        method.load_global(exp.model, from_record(arrays))
        res = evaluate(exp.model, exp.test_loader())
        info = round_log.get(server_round)
        timing = {"eval_seconds": time.perf_counter() - t0, "wall_seconds": time.perf_counter() - t_start}
        if "agg_seconds" in info:
            timing["agg_seconds"] = info.pop("agg_seconds")
        up, down = int(info.get("bytes_up", 0)), int(info.get("bytes_down", 0))
        cumulative["bytes_up"] += up
        cumulative["bytes_down"] += down
        row = {
            "round": server_round,
            "test_accuracy": res["accuracy"],
            "test_loss": res["loss"],
            **info,
            "bytes_up": up,
            "bytes_down": down,
            "bytes_up_cum": cumulative["bytes_up"],
            "bytes_down_cum": cumulative["bytes_down"],
            "bytes_total_cum": cumulative["bytes_up"] + cumulative["bytes_down"],
            "timing": timing,
        }
        rows.append(row)
        run_dir.append_metrics(row)
        reporter(row)
        return MetricRecord({"accuracy": res["accuracy"], "loss": res["loss"]})

    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=to_record(initial),
            num_rounds=cfg.train.rounds,
            timeout=cfg.federation.round_timeout,
            evaluate_fn=evaluate_fn,
        )
        final = from_record(result.arrays) if len(result.arrays) else initial
        method.load_global(exp.model, final)
        _save_adapters(exp, run_dir)
        from florg.plots import plot_runs

        plot_runs({cfg.method.name: rows}, run_dir.path / "plots", title=f"{cfg.method.name} on {cfg.data.task}")
        summary = {
            "accuracy_before": rows[0]["test_accuracy"] if rows else None,
            "accuracy_after": rows[-1]["test_accuracy"] if rows else None,
            "rounds": cfg.train.rounds,
            "bytes_up_total": cumulative["bytes_up"],
            "bytes_down_total": cumulative["bytes_down"],
            "bytes_total": cumulative["bytes_up"] + cumulative["bytes_down"],
            "wall_seconds": time.perf_counter() - t_start,
        }
        run_dir.write_json("summary.json", summary)
        run_dir.set_status("complete", rounds=len(rows) - 1)
        return summary
    except BaseException as exc:
        run_dir.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _save_adapters(exp: Experiment, run_dir: RunDir) -> None:
    """The final adapter in PEFT format and, for FLoRG, exported as a plain LoRA."""
    exp.model.save_pretrained(str(run_dir.path / "adapter"))
    if exp.method.name in ("florg",):
        from florg.adapters import save_as_lora

        save_as_lora(exp.model, str(run_dir.path / "adapter_lora"))


def make_server_app(cfg: RunConfig, run_dir: RunDir, reporter: Reporter | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg`` that writes into ``run_dir``."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, run_dir, reporter)

    return server


app = ServerApp()


@app.main()
def _deployment_main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    overrides = shlex.split(str(rc.get("overrides", "")))
    cfg = load_config(str(rc.get("config-file", "")) or None, overrides)
    run_dir_path = str(rc.get("run-dir", "")) or None
    run_server(grid, cfg, RunDir.create(cfg, run_dir_path))


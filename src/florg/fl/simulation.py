"""The embedded default: Flower's simulation engine (Ray) on this machine.

Every use of Flower's simulation entry point is in this file, so that moving to another entry
point is a one-file change. Client resources are explicit (``federation.client_cpus``, default 1
CPU per client: on a 2-core machine two clients train at a time).

The simulated clients run florg's production ClientApp (:data:`florg.fl.client_app.app`), which
never injects faults. Reliability tests pass the test-only ClientApp instead:
``run_simulation_engine(cfg, run_dir, client_app=florg.fl.faults.app)``.
"""

from __future__ import annotations

import logging
import os
from logging import WARNING
from typing import TYPE_CHECKING, Any

from florg.config import RunConfig
from florg.run.experiment import set_offline_env
from florg.run.rundir import RunDir

from .server_app import Reporter, run_server

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.clientapp import ClientApp

__all__ = ["run_simulation_engine", "backend_config"]


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Ray backend settings sized for this machine."""
    cpus = cfg.federation.backend_cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
        "init_args": {
            "num_cpus": int(cpus),
            "num_gpus": int(cfg.federation.client_gpus > 0),
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": True,
        },
    }


class _QuietFlower(logging.Filter):
    """Keep Flower's console to warnings and errors (florg prints its own per-round progress).

    Flower 1.42 deprecates ``run_simulation`` in favour of ``flwr run``; florg uses it on purpose
    (in-process, no background SuperLink to clean up) and keeps the switch to this one file, so
    that notice is dropped too, as is FedAvg's note that client-side evaluation is off (florg
    evaluates the global model on the server).
    """

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "run_simulation" in msg or "fraction_evaluate is set to 0.0" in msg:
            return False
        return self.verbose or record.levelno >= logging.WARNING


def run_simulation_engine(
    cfg: RunConfig,
    run_dir: RunDir,
    reporter: Reporter | None = None,
    verbose: bool = False,
    resume: bool = False,
    client_app: ClientApp | None = None,
) -> dict[str, Any]:
    """Run the federated job with ``cfg.data.num_clients`` simulated SuperNodes; returns the summary.

    ``client_app`` defaults to florg's production ClientApp; pass ``florg.fl.faults.app`` (test
    only) for ``federation.faults`` to take effect. With ``resume`` the checkpoint is checked
    first (:class:`florg.run.checkpoint.CheckpointError` before anything starts).
    """
    set_offline_env()
    from flwr.common.logger import log
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from florg.run.checkpoint import load_checkpoint

    from .client_app import app as production_app

    if cfg.data.num_clients < cfg.federation.min_available_nodes:
        raise ValueError("federation.min_available_nodes exceeds data.num_clients")
    if resume:
        load_checkpoint(run_dir.path)  # refuse a bad checkpoint before any process starts
    client_app = client_app or production_app
    if cfg.federation.faults and client_app is production_app:
        log(WARNING, "federation.faults is set but the simulated clients run the production ClientApp, which "
                     "never injects faults (fault injection is off on the client); pass "
                     "client_app=florg.fl.faults.app to inject them (tests only)")
    holder: dict[str, Any] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        holder["summary"] = run_server(grid, cfg, run_dir, reporter, resume=resume)

    flwr_logger = logging.getLogger("flwr")
    quiet = _QuietFlower(verbose)
    flwr_logger.addFilter(quiet)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_config=backend_config(cfg),
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.removeFilter(quiet)
    if "summary" not in holder:
        raise RuntimeError(f"the simulation ended without finishing the run; see {run_dir.path / 'status.json'}")
    return holder["summary"]

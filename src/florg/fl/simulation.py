"""The embedded default: Flower's simulation engine (Ray) on this machine.

Every use of Flower's simulation entry point is in this file, so that moving to another entry
point is a one-file change. Client resources are explicit (``federation.client_cpus``, default 1
CPU per client: on a 2-core machine two clients train at a time).

GPUs: ``federation.client_gpus`` is what Ray reserves per simulated client; a fraction lets
several clients share one GPU (0.5: two per GPU). Ray makes only the GPU it assigned visible to
a client (``CUDA_VISIBLE_DEVICES``), and none to a client that reserved none, so a client with
``train.device = auto`` trains on its GPU when it got one and on the CPU otherwise
(:func:`check_gpu_settings` refuses combinations that cannot work before anything starts).

The simulated clients run florg's production ClientApp (:data:`florg.fl.client_app.app`), which
never injects faults. Reliability tests pass the test-only ClientApp instead:
``run_simulation_engine(cfg, run_dir, client_app=florg.fl.faults.app)``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from logging import WARNING
from typing import TYPE_CHECKING, Any

import psutil
import torch
from flwr.common.logger import log
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from florg.config import ConfigError, RunConfig
from florg.device import resolve_device
from florg.run.checkpoint import load_checkpoint
from florg.run.experiment import set_offline_env
from florg.run.rundir import RunDir

from .client_app import app as production_app
from .client_state import STATE_DIR_ENV
from .progress import ProgressFn, RunInterrupted
from .server_app import Reporter, run_server

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

__all__ = ["RunFailed", "RunInterrupted", "backend_config", "check_gpu_settings", "run_simulation_engine",
           "wait_for_nodes"]


class RunFailed(RuntimeError):
    """The run stopped before its last round; the message is the reason recorded in ``status.json``."""


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def backend_config(cfg: RunConfig, verbose: bool = False) -> dict[str, Any]:
    """Ray backend settings sized for this machine (all of its GPUs when the clients reserve GPUs).

    Ray logs errors only, unless ``verbose`` (then its INFO lines too).
    """
    cpus = cfg.federation.backend_cpus or os.cpu_count() or 1
    gpus = _visible_gpus() if cfg.federation.client_gpus > 0 else 0
    return {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": cfg.federation.client_gpus},
        "init_args": {
            "num_cpus": int(cpus),
            "num_gpus": int(gpus),
            "include_dashboard": False,
            "logging_level": logging.INFO if verbose else logging.ERROR,
            "log_to_driver": True,
        },
    }


def check_gpu_settings(cfg: RunConfig, *, warn: bool = True) -> None:
    """Refuse (:class:`ConfigError`) GPU settings the simulated clients cannot run with; warn about idle GPUs."""
    device, gpus = cfg.train.device, cfg.federation.client_gpus
    resolve_device(device)  # cuda on a machine without a GPU: the plain "no CUDA device" error first
    visible = _visible_gpus()
    if gpus > 0 and visible == 0:
        raise ConfigError(f"config key 'federation.client_gpus': {gpus:g} GPUs per client but no CUDA device is "
                          "available here; set federation.client_gpus=0")
    if gpus > 0 and gpus > visible:
        raise ConfigError(f"config key 'federation.client_gpus': {gpus:g} GPUs per client but this machine has "
                          f"{visible}; set it to at most {visible} (a fraction such as 0.5 shares a GPU)")
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"config key 'federation.client_gpus': train.device={device!r} but the simulated clients "
                          "reserve no GPU (federation.client_gpus=0), so Ray hides the GPUs from them; set "
                          "federation.client_gpus (e.g. 0.5 = two clients per GPU) or train.device='auto'")
    if device.startswith("cuda:") and device != "cuda:0" and gpus > 0:
        raise ConfigError(f"config key 'train.device': {device!r} picks a GPU, but in the simulation Ray assigns each "
                          "client its GPU (it sees it as cuda:0); set train.device='cuda' or 'auto'")
    if warn and device == "auto" and gpus == 0 and visible > 0:
        # lazy: looked up per call: tests/test_devices.py patches flwr.common.logger.log
        from flwr.common.logger import log

        log(WARNING, "this machine has %d GPU(s) but federation.client_gpus=0: the simulated clients train on the "
                     "CPU (the server evaluates on the GPU); set federation.client_gpus (e.g. 0.5 = two clients "
                     "per GPU) to train them on the GPU", visible)


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
    on_progress: ProgressFn | None = None,
    handle_signals: bool = False,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run the federated job with ``cfg.data.num_clients`` simulated SuperNodes; returns the summary.

    ``client_app`` defaults to florg's production ClientApp; pass ``florg.fl.faults.app`` (test
    only) for ``federation.faults`` to take effect. With ``resume`` the checkpoint is checked
    first (:class:`florg.run.checkpoint.CheckpointError` before anything starts).
    ``on_progress`` receives each round's replies as they arrive (:mod:`florg.fl.progress`).
    Setting ``stop`` (from any thread) ends the run at the ServerApp's next poll, ``status.json``
    saying ``interrupted``, with :class:`RunInterrupted`; the simulation engine then lets the
    clients' tasks under way finish before it returns.

    Interruption: a ``KeyboardInterrupt`` (Ctrl-C) or ``SystemExit`` (Ray turns SIGTERM into one)
    while the simulation runs stops the ServerApp at its next poll, ends every process the run
    started (Ray's GCS, raylet and client workers, without waiting for their tasks), sets
    ``status.json`` to ``interrupted`` and raises :class:`RunInterrupted` (continue with
    ``florg run --resume RUN_DIR``). ``handle_signals`` (for command-line programs, main thread
    only) also turns SIGTERM into that path and arms a watchdog: if the process has not exited
    :data:`STOP_SECONDS` after the first signal, or a second signal arrives, it ends the run's
    processes and exits at once.
    """
    set_offline_env()
    if cfg.data.num_clients < cfg.federation.min_available_nodes:
        raise ValueError("federation.min_available_nodes exceeds data.num_clients")
    check_gpu_settings(cfg)
    # Ray hides every GPU from a client that reserved none (its current default; pinned so that a
    # client never trains on a GPU it did not reserve), and its notice about that default is noise.
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
    if resume:
        load_checkpoint(run_dir.path)  # refuse a bad checkpoint before any process starts
    client_app = client_app or production_app
    if cfg.federation.faults and client_app is production_app:
        log(WARNING, "federation.faults is set but the simulated clients run the production ClientApp, which "
                     "never injects faults (fault injection is off on the client); pass "
                     "client_app=florg.fl.faults.app to inject them (tests only)")
    holder: dict[str, Any] = {}
    stop = stop if stop is not None else threading.Event()
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        holder["thread"] = threading.current_thread()
        wait_for_nodes(grid, cfg.data.num_clients, cfg.federation.round_timeout, stop)
        holder["summary"] = run_server(grid, cfg, run_dir, reporter, resume=resume, on_progress=on_progress,
                                       stop=stop)

    flwr_logger = logging.getLogger("flwr")
    quiet = _QuietFlower(verbose)
    flwr_logger.addFilter(quiet)
    failure: Exception | None = None
    children_before = _children()
    guard = _SignalGuard(run_dir, children_before) if handle_signals else None
    # The clients' state between rounds (kept optimizer moments, a method's local factors) goes to files in a
    # folder of this run's own instead of Flower's per-node Contexts, which all live in this process and would
    # grow with every client sampled (florg.fl.client_state); the Ray workers inherit the variable.
    state_dir = tempfile.mkdtemp(prefix="florg-client-state-")
    previous_state_dir = os.environ.get(STATE_DIR_ENV)
    os.environ[STATE_DIR_ENV] = state_dir
    try:
        if guard is not None:
            guard.install()
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_config=backend_config(cfg, verbose),
            verbose_logging=verbose,
        )
    except (KeyboardInterrupt, SystemExit) as exc:
        stop.set()
        if guard is not None:
            guard.arm(guard.signum or (signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM))
        _wind_down(holder, run_dir, children_before)
        raise RunInterrupted(f"the run was interrupted ({_signal_name(exc, guard)}); "
                             f"continue with: florg run --resume {run_dir.path}") from None
    except Exception as exc:  # noqa: BLE001 - the server's error, already recorded in status.json by run_server
        failure = exc
    finally:
        flwr_logger.removeFilter(quiet)
        if guard is not None:
            guard.uninstall()
        if previous_state_dir is None:
            os.environ.pop(STATE_DIR_ENV, None)
        else:
            os.environ[STATE_DIR_ENV] = previous_state_dir
        shutil.rmtree(state_dir, ignore_errors=True)
    if "summary" not in holder:
        if run_dir.status().get("status") == "interrupted":  # stopped by the caller's stop request
            raise RunInterrupted(f"the run was interrupted; continue with: florg run --resume {run_dir.path}")
        error = run_dir.status().get("error") or (
            f"{type(failure).__name__}: {failure}" if failure else "the simulation ended without finishing the run")
        raise RunFailed(f"{error} (run directory {run_dir.path}; status.json says 'failed')") from failure
    return holder["summary"]


def wait_for_nodes(grid: Grid, n: int, timeout: float, stop: threading.Event | None = None) -> None:
    """Wait until all ``n`` simulated nodes are registered (or ``timeout`` seconds, or ``stop``).

    Flower registers the simulated SuperNodes in a thread of its own while the ServerApp already runs;
    with 1000 clients the first ``get_node_ids`` saw 928 of them, so the first round sampled from (and
    asked the partition ids of) whichever nodes happened to be registered: not reproducible.
    """
    deadline = time.monotonic() + timeout
    while len(grid.get_node_ids()) < n and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return
        time.sleep(0.05)


# ------------------------------------------------------------------------------ interruption
#: seconds from the first SIGINT/SIGTERM to a forced exit, when the orderly stop has not finished by then
#: (the forced exit itself takes up to about 2 s more on a busy machine: it ends the run's processes first)
STOP_SECONDS = 5.0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def _signal_name(exc: BaseException, guard: _SignalGuard | None) -> str:
    if guard is not None and guard.signum is not None:
        return signal.Signals(guard.signum).name
    return "SIGTERM" if isinstance(exc, (_Terminated, SystemExit)) else "SIGINT"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _reap(children_before: set[int], timeout: float = 1.0) -> None:
    """End every process this run started (Ray's GCS, raylet and workers) that is still alive."""
    procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in children_before]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def _wind_down(holder: dict[str, Any], run_dir: RunDir, children_before: set[int]) -> None:
    """After an interruption: let the ServerApp reach its stop check, end leftover processes, mark the run."""
    thread = holder.get("thread")
    if isinstance(thread, threading.Thread) and thread is not threading.current_thread():
        thread.join(timeout=STOP_SECONDS / 2)  # the server stops at its next poll (or after the evaluation it is in)
    _reap(children_before)
    if run_dir.status().get("status") in (None, "running"):
        run_dir.set_status("interrupted")


class _SignalGuard:
    """SIGINT/SIGTERM handlers for a command-line run (see :func:`run_simulation_engine`)."""

    def __init__(self, run_dir: RunDir, children_before: set[int]) -> None:
        self.run_dir = run_dir
        self.children_before = children_before
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.timer: threading.Timer | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self.previous[signum] = signal.signal(signum, self._handle)

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            self._force()
        self.arm(signum)
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def arm(self, signum: int) -> None:
        """Remember the first signal and start the watchdog (once)."""
        if self.signum is None:
            self.signum = int(signum)
        if self.timer is None:
            self.timer = threading.Timer(STOP_SECONDS, self._force)
            self.timer.daemon = True
            self.timer.start()

    def _force(self) -> None:
        try:
            _reap(self.children_before, timeout=0.5)
            if self.run_dir.status().get("status") in (None, "running"):
                self.run_dir.set_status("interrupted")
            sys.stderr.write(f"florg: interrupted; continue with: florg run --resume {self.run_dir.path}\n")
            sys.stderr.flush()
        finally:
            os._exit(128 + (self.signum or signal.SIGINT))

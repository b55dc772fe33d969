"""``python -m florg.fl.deploy``: one run on a local deployment, from the shell."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from .credentials import TLSFiles, load_node_keys
from .local import LocalDeployment

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m florg.fl.deploy [options] [-- key=value ...]``: one local deployment run."""
    parser = argparse.ArgumentParser(
        prog="python -m florg.fl.deploy",
        description="Run florg on a local Flower deployment (SuperLink + SuperNodes as processes).",
    )
    parser.add_argument("overrides", nargs="*", help="florg config overrides key=value")
    parser.add_argument("--supernodes", type=int, default=2,
                        help="number of SuperNodes (default 2); data.num_clients is set to match "
                        "unless an override sets it")
    parser.add_argument("--workdir", default="deployment", help="logs, FLWR_HOMEs (default ./deployment)")
    parser.add_argument("--config", default=None, help="florg TOML config file")
    parser.add_argument("--run-dir", default=None, help="run directory (default <workdir>/run-<time>)")
    security = parser.add_argument_group(
        "security", "TLS is on by default (throwaway certificates in <workdir>/throwaway-certs unless --tls-dir)")
    security.add_argument("--tls-dir", default=None,
                          help="folder with ca.crt, server.pem, server.key (scripts/make_certs.sh)")
    security.add_argument("--supernode-auth", action="store_true",
                          help="only registered SuperNodes may join (--enable-supernode-auth + flwr supernode "
                          "register); throwaway keys in <workdir>/throwaway-keys unless --node-keys-dir")
    security.add_argument("--node-keys-dir", default=None,
                          help="folder with supernode-<i> / supernode-<i>.pub key pairs "
                          "(scripts/make_node_keys.sh); implies --supernode-auth")
    security.add_argument("--insecure", action="store_true",
                          help="no TLS, no authentication: for local testing only")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    supernode_auth = args.supernode_auth or args.node_keys_dir is not None
    if args.insecure and (args.tls_dir or supernode_auth):
        parser.error("--insecure turns TLS off; it cannot be combined with --tls-dir, --supernode-auth "
                     "or --node-keys-dir")

    workdir = Path(args.workdir).resolve()
    run_dir = args.run_dir or str(workdir / time.strftime("run-%Y%m%d-%H%M%S"))
    overrides = list(args.overrides)
    if not any(o.startswith("data.num_clients=") for o in overrides):
        overrides.append(f"data.num_clients={args.supernodes}")
    tls = TLSFiles.from_dir(args.tls_dir) if args.tls_dir else None
    keys = load_node_keys(args.node_keys_dir, args.supernodes) if args.node_keys_dir else None
    if args.insecure:
        print("WARNING: --insecure: no TLS and no SuperNode authentication (for local testing only)", flush=True)
    with LocalDeployment(workdir, args.supernodes, tls=tls, insecure=args.insecure,
                         supernode_auth=supernode_auth, node_keys=keys) as dep:
        mode = "insecure" if args.insecure else "TLS" + (" + SuperNode authentication" if supernode_auth else "")
        print(f"SuperLink at {dep.address} ({mode}), {args.supernodes} SuperNodes; logs in {dep.log_dir}", flush=True)
        result = dep.run(overrides=overrides, run_dir=run_dir, config_file=args.config, timeout=args.timeout, echo=True)
    print(f"run {result.run_id}: {result.status}; run directory {run_dir}", flush=True)
    return 0 if result.ok else 1


"""Start a local multi-process Flower deployment: one SuperLink, N SuperNodes, then ``flwr run``.

This is the deployment runtime (the same ServerApp and ClientApp as the simulation, but every
piece is its own process talking over the network), on one machine and on loopback ports. It is
meant for integration tests and for trying a deployment before spreading it over machines::

    from florg.fl.deploy import LocalDeployment

    with LocalDeployment("work", num_supernodes=2, supernode_auth=True) as dep:
        result = dep.run(overrides=["data.num_clients=2", "train.rounds=2"], run_dir="work/run")
        print(result.status)              # "finished:completed"

or from a shell: ``python -m florg.fl.deploy --supernodes 2 --workdir work --supernode-auth -- train.rounds=2``.

Every process gets free loopback ports, its own ``FLWR_HOME`` under the work folder and a log
file in ``<workdir>/logs``. Runtime dependency installation and Flower's update check are turned
off, and the Hugging Face offline flags are set. Leaving the ``with`` block (also on errors or
Ctrl-C) stops exactly the processes this object started, and the helper processes they spawned
(SuperExec, ServerApp, ClientApp), by process id.

Security: TLS is the default. Pass certificate files with ``tls`` (see ``scripts/make_certs.sh``)
or let the deployment create a throwaway CA and server certificate in
``<workdir>/throwaway-certs``. With ``supernode_auth=True`` the SuperLink only accepts SuperNodes
whose public keys were registered with ``flwr supernode register`` before they connect (keys from
``scripts/make_node_keys.sh`` or throwaway ones in ``<workdir>/throwaway-keys``). Plain-text
``--insecure`` mode needs an explicit ``insecure=True`` (``--insecure`` on the command line) and is
for testing only.

The package is split by concern: :mod:`.credentials` (TLS certificates, SuperNode keys),
:mod:`.processes` (ports, process environment, the process tree), :mod:`.local`
(:class:`LocalDeployment`) and :mod:`.cli` (``python -m florg.fl.deploy``).
"""

from __future__ import annotations

from .cli import main  # python -m florg.fl.deploy, florg.fl.deploy.main([...])
from .credentials import NodeKey, TLSFiles, load_node_keys, make_node_keys, make_throwaway_certs
from .local import APP_DIR, DeploymentError, LocalDeployment, RunResult
from .local import _last_json as _last_json  # private; reachable here for the tests
from .processes import BASE_ENV, deployment_env, find_free_port, find_free_ports, pid_alive

__all__ = [
    "APP_DIR",
    "BASE_ENV",
    "DeploymentError",
    "LocalDeployment",
    "NodeKey",
    "RunResult",
    "TLSFiles",
    "deployment_env",
    "find_free_port",
    "find_free_ports",
    "load_node_keys",
    "make_node_keys",
    "main",
    "make_throwaway_certs",
    "pid_alive",
]

"""Joining a Ray cluster, or starting a local one that listens on 127.0.0.1 only (search and scoring share this).

Ray reads some of these variables when it is imported, so they are set before the first `import ray`.
"""

from __future__ import annotations

import os
import socket
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` or $RAY_ADDRESS (`ray job submit` sets it); otherwise start a local Ray on 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only, nothing to authenticate
        # Two metrics ports have fixed defaults (44217, 44227): free ones let local Rays coexist on a machine.
        os.environ.setdefault("AUTOSCALER_METRIC_PORT", str(_free_port()))
        os.environ.setdefault("DASHBOARD_METRIC_PORT", str(_free_port()))
    import ray

    if ray.is_initialized():
        return
    if address:
        print(f"[leukray] ray: joining the cluster at {address}", file=sys.stderr, flush=True)
        ray.init(address="auto" if address == os.environ.get("RAY_ADDRESS") else address, log_to_driver=True)
    else:
        print("[leukray] ray: starting a local Ray on 127.0.0.1", file=sys.stderr, flush=True)
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=True)

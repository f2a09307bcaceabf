"""Wait until a Ray cluster has N alive nodes: the barrier of prepare_data.sbatch between starting
the Ray head and workers and starting the data-prep driver.

    python launch/slurm/ray_wait.py 10.0.0.1:6379 --nodes 4 --timeout 300

Exits 0 once N nodes are alive, 1 with a message when the timeout passes first.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time


def wait_for_port(host: str, port: int, deadline: float) -> bool:
    """Poll until something accepts TCP connections on host:port (the GCS is up)."""
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return True
        except OSError:
            time.sleep(1)
    return False


def wait_for_nodes(address: str, nodes: int, deadline: float) -> int:
    """Alive nodes once there are `nodes` of them, or fewer when the deadline passes."""
    import ray

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        while True:
            alive = sum(1 for n in ray.nodes() if n["Alive"])
            if alive >= nodes or time.monotonic() >= deadline:
                return alive
            time.sleep(1)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("address", help="the head's GCS address, host:port")
    parser.add_argument("--nodes", type=int, required=True, help="how many nodes must be alive")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait in all")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.timeout
    host, _, port = args.address.rpartition(":")
    if not wait_for_port(host, int(port), deadline):
        sys.exit(f"error: no Ray head answers at {args.address} after {args.timeout:.0f} s")
    alive = wait_for_nodes(args.address, args.nodes, deadline)
    if alive < args.nodes:
        sys.exit(
            f"error: {alive} of {args.nodes} Ray nodes joined {args.address} within {args.timeout:.0f} s"
        )
    print(f"ray cluster at {args.address}: {alive} nodes alive")


if __name__ == "__main__":
    main()

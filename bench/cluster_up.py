"""Start a NATS cluster with JetStream on this machine (127.0.0.1) to try LangOrch's replicas locally.

    python3 -m uv run python bench/cluster_up.py [--nodes 3] [--state-dir DIR]

It prints the ``LANGORCH_NATS_URL`` seed list and ``LANGORCH_NATS_REPLICAS`` to give ``langorch up`` or
``langorch serve``, then runs until Ctrl-C (or SIGTERM) and stops the nodes. The nodes keep their stores in the
state directory (a temporary one by default, removed at the end): a second start on the same ``--state-dir``
finds the streams again. See docs/operations/cluster.md.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from langorch_infra.embedded import EmbeddedNatsCluster


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nodes", type=int, default=3, help="cluster members (3 or 5 for JetStream quorum)")
    parser.add_argument("--state-dir", type=Path, help="where the nodes keep their stores (default: a temporary "
                        "directory, removed at the end)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes: give 1 or more")
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="langorch-cluster-"))
    cluster = EmbeddedNatsCluster(state, n=args.nodes)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        cluster.start()
        for i, node in enumerate(cluster.nodes):
            print(f"{cluster.server_name(i)}: {node.url}  monitoring http://127.0.0.1:{node.http_port}  "
                  f"log {node.log_file}")
        print(f"\nexport LANGORCH_NATS_URL={cluster.url}\nexport LANGORCH_NATS_REPLICAS={min(args.nodes, 3)}\n"
              "\nCtrl-C stops the cluster.", flush=True)
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        if args.state_dir is None:
            shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

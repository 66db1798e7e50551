"""A Ray cluster of its own for the preemption test, run as a separate process (the test's own process is joined
to the session's cluster, and a process joins one cluster at a time).

Ray's ``cluster_utils.Cluster``: a head without CPUs (the driver's Train controller lives there) and one 1-CPU
node, where the training worker lands. It prints one JSON line ``{"address", "node_id", "session_dir"}`` and then
answers commands read from stdin, one JSON line each:

    drain S    drain the worker node through ``pipeline.spot_watcher.ray_drain`` (Ray's drain API, reason
               PREEMPTION, S seconds to its deadline), as the spot watcher does on EC2's notice
    replace    take the worker node away (its processes killed at once, as a reclaimed instance's: Ray then
               records the death as the drained node's preemption) and add a new one
    stop       shut the cluster down and exit

    python tests/preemptible_cluster.py
"""
from __future__ import annotations

import datetime
import json
import sys

from ray.cluster_utils import Cluster

from pipeline.spot_watcher import Notice, ray_drain


def say(**values) -> None:
    print(json.dumps(values), flush=True)


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    say(address=cluster.address, node_id=worker.node_id, session_dir=cluster.head_node.get_session_dir_path())
    try:
        for line in sys.stdin:
            command, *rest = line.split()
            if command == "drain":
                seconds = int(rest[0])
                when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
                ray_drain(cluster.address, worker.node_id)(Notice("terminate", when), seconds)
                say(drained=worker.node_id)
            elif command == "replace":
                cluster.remove_node(worker, allow_graceful=False)  # a reclaimed instance: powered off
                worker = cluster.add_node(num_cpus=1)
                cluster.wait_for_nodes()
                say(node_id=worker.node_id)
            elif command == "stop":
                break
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

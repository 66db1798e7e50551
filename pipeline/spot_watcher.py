"""A spot node's preemption watcher: EC2's two-minute interruption notice turned into a Ray drain.

EC2 announces the reclaim of a spot instance about two minutes ahead in the instance metadata
(``/latest/meta-data/spot/instance-action``: 404 until then, then ``{"action": "terminate", "time":
"2026-12-05T12:00:00Z"}``); Ray's AWS provider does not read it. This watcher polls it over IMDSv2 (a session
token from ``PUT /latest/api/token``, sent as ``X-aws-ec2-metadata-token``) and, on a notice, drains its own node
through Ray's drain API (``ray drain-node``, reason ``DRAIN_NODE_REASON_PREEMPTION``, the notice's deadline), once.
Ray Train then sees the preemption (``ray.train.get_preemption_info``) and counts the restart against
``ray.max_preemption_failures`` rather than ``ray.max_failures``.

    python -m pipeline.spot_watcher --address HEAD:6379 [--every-s 5]     # cluster.yaml starts it on spot nodes

No Ray import here: the drain runs Ray's own CLI, so this module and its test need only the standard library.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

IMDS = "http://169.254.169.254"
TOKEN_TTL_S = 21600  # IMDSv2 tokens last up to 6 h; a new one is fetched when refused


@dataclass(frozen=True)
class Notice:
    action: str  # terminate | stop | hibernate
    time: datetime.datetime  # when EC2 acts (UTC)

    def seconds_left(self, now: datetime.datetime) -> int:
        return max(0, int((self.time - now).total_seconds()))


class Metadata:
    """The instance metadata service over IMDSv2."""

    def __init__(self, base: str = IMDS, timeout_s: float = 2.0) -> None:
        self.base, self.timeout_s, self.token = base.rstrip("/"), timeout_s, ""

    def _token(self) -> str:
        request = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)})
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return response.read().decode()

    def notice(self) -> Notice | None:
        """The pending interruption notice, None while there is none."""
        for attempt in range(2):
            if not self.token:
                self.token = self._token()
            request = urllib.request.Request(f"{self.base}/latest/meta-data/spot/instance-action",
                                             headers={"X-aws-ec2-metadata-token": self.token})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    found = json.loads(response.read())
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                if error.code == 401 and attempt == 0:  # the token expired: fetch another once
                    self.token = ""
                    continue
                raise
            when = datetime.datetime.fromisoformat(found["time"].replace("Z", "+00:00"))
            return Notice(found["action"], when)
        return None


def ray_drain(address: str, node_id: str | None = None) -> Callable[[Notice, int], None]:
    """Drain a node through Ray's CLI (``ray drain-node``, reason PREEMPTION): ``node_id``, by default the node
    the command runs on."""
    def drain(notice: Notice, seconds_left: int) -> None:
        ray = Path(sys.executable).with_name("ray")  # the environment's own Ray CLI
        node = [f"--node-id={node_id}"] if node_id else []
        subprocess.run([str(ray), "drain-node", f"--address={address}", *node, "--reason=DRAIN_NODE_REASON_PREEMPTION",
                        f"--reason-message=spot interruption notice: {notice.action} at {notice.time.isoformat()}",
                        f"--deadline-remaining-seconds={seconds_left}"], check=True, timeout=60)
    return drain


def watch(metadata: Metadata, drain: Callable[[Notice, int], None], every_s: float = 5.0,
          now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
          log: Callable[[str], None] = print, polls: int | None = None) -> Notice | None:
    """Poll every ``every_s`` until a notice, drain once, return it (None after ``polls`` polls without one)."""
    count = 0
    while polls is None or count < polls:
        count += 1
        try:
            notice = metadata.notice()
        except (OSError, urllib.error.URLError) as error:  # IMDS hiccup: keep watching
            log(f"spot watcher: instance metadata unreachable ({error}); retrying")
            notice = None
        if notice is not None:
            left = notice.seconds_left(now())
            log(f"spot watcher: {notice.action} at {notice.time.isoformat()} ({left} s): draining this Ray node")
            drain(notice, left)
            return notice
        time.sleep(every_s)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the Ray head (HOST:6379)")
    parser.add_argument("--every-s", type=float, default=5.0, help="seconds between metadata polls")
    parser.add_argument("--imds", default=IMDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    watch(Metadata(args.imds), ray_drain(args.address), args.every_s, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Ray cluster a job runs on: connecting to it, what it can hold at most, and asking its autoscaler.

One owner asks, the driver of a training or a sweep: ``requested(bundles, ...)`` tells the autoscaler the
bundles the work will place (``ray.autoscaler.sdk.request_resources``; the request is cluster-wide and each call
replaces the last), waits up to ``ray.resource_wait_s`` for the first of them to fit, and withdraws the request
when the work ends (the placement groups then hold what they use; idle nodes go after the config's
``idle_timeout_minutes``). What exceeds the cluster's maximum is refused at once: the maximum is computed from
the autoscaler's own cluster config (``ray.autoscaler_config``; ``ray up`` puts it on the head as
``~/ray_bootstrap_config.yaml``, where ``ray job submit`` runs the driver), from every node type's explicit
``resources``. A private local instance has no autoscaler: there what is not there is refused at once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.config import ConfigError, first_line

_started_locally = False  # init_ray started a private instance (no autoscaler can add nodes to it)
SHOWN = ("CPU", "GPU")
LOCAL_DISK_LABEL = "varcon.io/local-disk-gb"  # a node type's local disk for data.stage, in GB (cluster.yaml labels)
# a custom resource: how many sweep trial drivers a node type hosts, declared only by node types never preempted (the
# head, on-demand CPU nodes); a trial driver asks for one wherever the autoscaler config declares it, so a spot
# reclaim never takes a trial's driver (nor the Ray Train controller, which Ray places on its driver's node)
TRIAL_DRIVER_SLOT = "varcon_trial_driver"
PROGRESS_EVERY_S = 60.0  # a line while the autoscaler works (cold GPU nodes take minutes: ray.resource_wait_s)


def init_ray(verbose: bool = False, log: Callable[[str], None] = print) -> None:
    """Connect to the cluster in ``$RAY_ADDRESS`` (``ray job submit`` sets it), else start a local instance
    (Ray's own rule: a cluster started on this machine by ``ray start`` is joined; ``RAY_ADDRESS=local`` always
    starts a new private one). Ray's worker and controller output stays in its log folder on this node (named
    once), unless ``verbose`` streams it here as well."""
    global _started_locally
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, log_to_driver=verbose, logging_level=logging.WARNING)  # no connection banner
        except (ray.exceptions.AuthenticationError, ConnectionError) as refused:  # a token missing / not taken
            where = address or "this machine"
            raise ConfigError(f"cannot join the Ray cluster at {where} ({first_line(str(refused))[:100]}): is it "
                              f"running, and does this process have its token? (RAY_AUTH_MODE=token and "
                              f"RAY_AUTH_TOKEN_PATH=<the cluster's token file>, or ~/.ray/auth_token)") from None
        _started_locally = address in (None, "local")
        others = other_ray_instances() if _started_locally else []
        if others:
            log(f"varcon: warning: this machine runs another Ray instance ({', '.join(others)}): Ray Train's clean-up "
                f"of a run that ends ungracefully (a paused or stopped sweep trial) asks Ray's state API, which "
                f"cannot choose between them, so the run's CPUs/GPUs stay reserved; join it (RAY_ADDRESS=ADDRESS) "
                f"or stop it before a PBT/PB2 sweep or a study")
        if not verbose:
            log(f"Ray's own output (workers, Train controller, autoscaler): {ray_logs_folder()}  (--verbose shows "
                f"it here)")


def other_ray_instances() -> list[str]:
    """GCS addresses on this machine other than the connected instance's (``ray._private.services``: the scan
    Ray's own address resolution makes, no public API)."""
    import ray
    from ray._private.services import find_gcs_addresses

    own = ray.get_runtime_context().gcs_address
    return sorted(address for address in find_gcs_addresses() if address != own)


def ray_logs_folder() -> str:
    """The session log folder of the Ray node this driver runs on."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # no public accessor in this Ray
    return node.get_logs_dir_path() if node is not None else "/tmp/ray/session_latest/logs"


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict[str, float]
    max_workers: int
    is_head: bool = False
    local_disk_gb: float | None = None  # declared by the LOCAL_DISK_LABEL label; None: not declared

    def holds(self, bundle: dict) -> bool:
        """Whether one node of this type holds ``bundle``."""
        return all(self.resources.get(k, 0.0) >= v for k, v in bundle.items() if v)


@dataclass(frozen=True)
class ClusterMaximum:
    """What an autoscaling cluster can grow to: its node types (the head's ``max_workers`` counts as 1) and the
    cluster's ``max_workers``. Node types without explicit ``resources`` are unknown and hold nothing here."""

    node_types: tuple[NodeType, ...]
    max_workers: int
    source: str

    @classmethod
    def from_config(cls, path: str | Path) -> ClusterMaximum:
        config = yaml.safe_load(Path(path).expanduser().read_text())
        head = config.get("head_node_type")
        types = []
        for name, spec in (config.get("available_node_types") or {}).items():
            resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
            types.append(NodeType(name, resources, 1 if name == head else int(spec.get("max_workers", 0)),
                                  name == head, _declared_gb(spec, name, path)))
        return cls(tuple(types), int(config.get("max_workers", 0)), str(path))

    def problem(self, bundles: list[dict]) -> str | None:
        """Why ``bundles`` can never be placed, or None: a bundle no node type holds, or totals beyond what the
        largest nodes can add up to within ``max_workers``."""
        for bundle in bundles:
            if not any(t.holds(bundle) for t in self.node_types):
                return f"no node type of {self.source} holds a bundle of {_describe(bundle)}"
        needed = _totals(bundles)
        for resource, amount in needed.items():
            most = self.most(resource)
            if amount > most:
                return (f"the run needs {amount:g} {resource} but {self.source} can grow to {most:g} {resource} at "
                        f"most (node types x max_workers)")
        return None

    def local_disks(self, bundle: dict) -> dict[str, float]:
        """``{node type: declared local disk in GB}`` of the node types that can hold ``bundle`` (where a worker
        of that bundle may land) and declare their disk."""
        return {t.name: t.local_disk_gb for t in self.node_types if t.local_disk_gb is not None and t.holds(bundle)}

    def declares(self, resource: str) -> bool:
        """Whether any node type offers ``resource``."""
        return any(t.resources.get(resource, 0.0) > 0 for t in self.node_types)

    def most(self, resource: str) -> float:
        """The most of ``resource`` the cluster holds: the head, plus the worker types richest in it first,
        within the cluster's ``max_workers``."""
        heads = [t for t in self.node_types if t.is_head]
        workers = sorted((t for t in self.node_types if not t.is_head), key=lambda t: -t.resources.get(resource, 0))
        total, left = sum(t.resources.get(resource, 0.0) for t in heads), self.max_workers
        for t in workers:
            count = min(t.max_workers, left)
            total, left = total + count * t.resources.get(resource, 0.0), left - count
        return total


def _declared_gb(node_type: dict, name: str, source: str | Path) -> float | None:
    value = (node_type.get("labels") or {}).get(LOCAL_DISK_LABEL)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"node type {name} of {source}: label {LOCAL_DISK_LABEL}={value!r} must be a number of "
                          f"GB") from None


def _totals(bundles: list[dict]) -> dict[str, float]:
    found: dict[str, float] = {}
    for bundle in bundles:
        for key, value in bundle.items():
            found[key] = found.get(key, 0.0) + value
    return found


def _describe(resources: dict) -> str:
    shown = {k: resources.get(k, 0.0) for k in SHOWN} | {k: v for k, v in resources.items() if k not in SHOWN}
    return ", ".join(f"{v:g} {k}" for k, v in shown.items())


def fits(have: dict, bundles: list[dict]) -> bool:
    """Whether the resource totals ``have`` hold ``bundles``' totals."""
    return all(have.get(k, 0.0) >= v for k, v in _totals(bundles).items())


def cluster_maximum(autoscaler_config: str) -> ClusterMaximum | None:
    """The maximum of the cluster described by ``autoscaler_config``, None when there is no such file."""
    path = Path(autoscaler_config).expanduser() if autoscaler_config else None
    return ClusterMaximum.from_config(path) if path is not None and path.is_file() else None


def refuse_impossible(first: list[dict], autoscaler_config: str) -> None:
    """A ``ConfigError`` at once where ``first`` can never fit: beyond a local instance's resources, or beyond
    the cluster's maximum (``cluster_maximum``); nothing is asked of the autoscaler."""
    import ray

    have = ray.cluster_resources()
    if fits(have, first):
        return
    if _started_locally:
        raise ConfigError(_shortfall(first, have, "lower ray.num_workers or ray.cpus_per_worker, set "
                                                  "ray.use_gpu=false, or run on a cluster"))
    maximum = cluster_maximum(autoscaler_config)
    problem = maximum.problem(first) if maximum is not None else None
    if problem:
        raise ConfigError(f"{problem}: lower ray.num_workers or ray.cpus_per_worker, or add node types / raise "
                          f"max_workers in the cluster config")


@contextmanager
def requested(bundles: list[dict], first: list[dict], wait_s: float, autoscaler_config: str,
              log: Callable[[str], None] = print) -> Iterator[dict[str, float]]:
    """Ask the autoscaler for ``bundles`` while the block runs and wait until ``first`` (the part that must fit
    before work starts, e.g. one trial of a sweep) fits; yields the cluster's resources then. Refuses at once
    what exceeds the cluster's maximum (or, on a local instance, its resources); a ``ConfigError`` after
    ``wait_s`` names the shortfall."""
    import ray

    refuse_impossible(first, autoscaler_config)
    have = ray.cluster_resources()
    if _started_locally or fits(have, first):
        yield have
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    try:
        log(f"asked the autoscaler for {len(bundles)} bundles ({_describe(_totals(bundles))}); waiting up to "
            f"{wait_s:g} s (ray.resource_wait_s)")
        asked, asked_at, before = time.monotonic(), time.time(), have
        deadline, next_line = asked + wait_s, asked + PROGRESS_EVERY_S
        failed: dict[str, str] = {}  # node type: its latest launch failure, as already shown
        while not fits(have := ray.cluster_resources(), first):
            now = time.monotonic()
            for node_type, reason in launch_failures(since=math.floor(asked_at)).items():
                if failed.get(node_type) != reason:
                    log(f"the autoscaler could not launch a {node_type} node: {reason}")
                    failed.pop(node_type, None)  # the newest failure last
                    failed[node_type] = reason
            if now >= deadline:
                last = "".join(f"; its last launch failure: {t}: {r}" for t, r in list(failed.items())[-1:])
                raise ConfigError(_shortfall(first, have, f"the autoscaler did not add the nodes within {wait_s:g} s "
                                                          f"(ray.resource_wait_s){last}: see `ray status` and the "
                                                          f"autoscaler's log (monitor.log)"))
            if now >= next_line:
                log(waiting_line(first, before, have, now - asked, wait_s))
                next_line += PROGRESS_EVERY_S
            time.sleep(min(5.0, max(0.1, deadline - now)))
        minutes = (time.monotonic() - asked) / 60
        log(f"the cluster holds the run after {minutes:.1f} min: {_describe(_shown(have, first))}")
        yield have
    finally:
        request_resources(bundles=[])  # withdraw: each call replaces the cluster-wide request


def launch_failures(since: float = 0.0) -> dict[str, str]:
    """``{node type: "Category: description"}`` for each node type whose latest launch, at or after ``since``
    (Unix time), failed: what Ray's autoscaler (v1, which ``ray up`` runs on VMs) publishes in its status in the
    GCS and ``ray status`` lists as recent failures. On AWS the category is EC2's error code, e.g.
    InsufficientInstanceCapacity, or UnauthorizedOperation for a right the head's role lacks. Empty when nothing
    failed or the status is not there (a private instance, no autoscaler)."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS) if _internal_kv_initialized() else None
    if not raw:
        return {}
    report = json.loads(raw).get("autoscaler_report") or {}
    records = ((report.get("node_availability_summary") or {}).get("node_availabilities") or {}).values()
    return {record["node_type"]: f"{info.get('category')}: {info.get('description')}"
            for record in sorted(records, key=lambda r: r.get("last_checked_timestamp", 0.0))
            if not record.get("is_available", True) and (info := record.get("unavailable_node_information"))
            and record.get("last_checked_timestamp", 0.0) >= since}


def _shown(resources: dict, bundles: list[dict]) -> dict[str, float]:
    """``resources`` restricted to CPU, GPU and what ``bundles`` ask for (not memory, node:<ip>, ...)."""
    return {k: resources.get(k, 0.0) for k in dict.fromkeys([*SHOWN, *_totals(bundles)])}


def waiting_line(first: list[dict], before: dict, have: dict, waited_s: float, wait_s: float) -> str:
    """The line printed every ``PROGRESS_EVERY_S`` while the autoscaler adds nodes: what the run needs, what the
    cluster has and has gained since the request, and the minutes waited of ``ray.resource_wait_s``."""
    added = {k: have.get(k, 0.0) - before.get(k, 0.0) for k in _shown(have, first)}
    return (f"waiting for the autoscaler: the run needs {_describe(_shown(_totals(first), first))}; the cluster has "
            f"{_describe(_shown(have, first))} ({_describe(added)} added since asked); {waited_s / 60:.0f} of "
            f"{wait_s / 60:.0f} min (ray.resource_wait_s)")


def _shortfall(bundles: list[dict], have: dict, fix: str) -> str:
    """Why ``bundles`` do not fit: CPU, GPU and whatever else they ask for (e.g. a trial driver slot)."""
    return (f"the run needs {_describe(_shown(_totals(bundles), bundles))} but the Ray cluster has "
            f"{_describe(_shown(have, bundles))}: {fix}")


def training_bundles(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> list[dict]:
    """The placement-group bundles of one Ray Train run (one per worker)."""
    bundle = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    return [dict(bundle) for _ in range(num_workers)]


def trials_that_fit(maximum: ClusterMaximum | None, trial: list[dict], wanted: int) -> int:
    """How many of ``wanted`` trials of ``trial``'s bundles the cluster's maximum holds side by side."""
    if maximum is None:
        return wanted
    totals = _totals(trial)
    most = [math.floor(maximum.most(k) / v) for k, v in totals.items() if v]
    return max(1, min([wanted, *most]))

"""Joining or starting Ray, the same way for every job, and what the jobs ask of the cluster."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["ensure_ray", "join_ray", "RayCluster"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ensure_ray(address: str | None = None, *, cpus_needed: float = 0):
    """The ``ray`` module, initialised: reuse a running session, join ``address`` or
    ``$RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray.

    A local Ray gets at least 4 logical CPUs (Ray Data stalls with fewer), and at least
    ``cpus_needed``. The caller's SIGINT/SIGTERM handlers survive ``ray.init`` (which installs
    its own, ending the process with a stack dump), so that a job can stop cleanly.
    """
    import ray

    if not ray.is_initialized():
        in_main = threading.current_thread() is threading.main_thread()
        handlers = {s: signal.getsignal(s) for s in _STOP_SIGNALS} if in_main else {}
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            cpus = max(4, int(cpus_needed + 0.999), os.cpu_count() or 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)
    return ray


@dataclass(frozen=True)
class RayCluster:
    """The Ray a job runs on, as :meth:`~pro2sam.pipeline.settings.Resources.resolve` sees it.

    Attributes:
        ray: the ``ray`` module, initialised.
        local: a Ray this process started on this machine: it never grows.
    """

    ray: Any
    local: bool

    def resources(self) -> dict[str, float]:
        """The cluster's total logical resources now (``CPU``, ``GPU``, ...)."""
        return self.ray.cluster_resources()

    def can_grow(self) -> bool | None:
        """Whether an autoscaler could add nodes to this cluster, as Ray says it: False for a
        local Ray and for a cluster started without an autoscaler, True for one with an
        autoscaler that may add nodes, None where Ray does not say (yet).

        Ray has no public call for this; it is read where Ray's own libraries read it. A cluster
        config in the GCS (reported by autoscaler v2, read by Ray Data and Ray Train for the
        cluster's largest size) can grow where one of its node groups can (Ray Data's rule). Else
        the v1 autoscaler's status (what ``ray status`` shows): a monitor started without an
        autoscaling config runs a read-only provider, which lists every node as a node type of
        its own, named ``node_<node id>``; any other node type comes from an autoscaling config.
        """
        if self.local:
            return False
        try:
            import json

            from ray._private import ray_constants
            from ray._private.state import state
            from ray.experimental.internal_kv import _internal_kv_get

            config = state.get_cluster_config()
            if config is not None and config.node_group_configs:
                return any(
                    group.max_count == -1 or group.max_count > group.min_count
                    for group in config.node_group_configs
                    if group.resources and group.max_count != 0
                )
            status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
            report = json.loads(status).get("autoscaler_report") if status else None
            node_types = (report or {}).get("node_type_mapping") or {}
        except Exception:  # a Ray that keeps these elsewhere: say nothing
            return None
        if not node_types:
            return None
        return not all(node_type == f"node_{node_id}" for node_id, node_type in node_types.items())

    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        """Ask the autoscaler for ``bundles`` (one per actor)."""
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)


def join_ray(address: str | None = None, *, cpus_needed: float = 0) -> RayCluster:
    """:func:`ensure_ray`, and whether the Ray is a local one this call started (a Ray already
    running in this process, as a test's or a notebook's, counts as a cluster)."""
    import ray

    local = not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())
    return RayCluster(ensure_ray(address, cpus_needed=cpus_needed), local)

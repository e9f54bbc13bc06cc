"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import os

__all__ = ["ensure_ray"]


def ensure_ray(address: str | None = None, *, cpus_needed: float = 0):
    """The ``ray`` module, initialised: reuse a running session, join ``address`` or
    ``$RAY_ADDRESS`` (as under ``ray job submit``), else start a local Ray.

    A local Ray gets at least 4 logical CPUs (Ray Data stalls with fewer), and at least
    ``cpus_needed``.
    """
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            cpus = max(4, int(cpus_needed), os.cpu_count() or 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    return ray

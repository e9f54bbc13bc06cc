"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["ensure_ray"]

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

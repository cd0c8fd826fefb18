"""Starting or joining Ray for a job."""

from __future__ import annotations

import math
import os
from pathlib import Path

from eyas.config import RunConfig


def init_ray(run: RunConfig) -> None:
    """Join the cluster named by ``run.ray_address`` or ``$RAY_ADDRESS`` (as under ``ray job
    submit``), else start a private local instance. Workers on a remote cluster get the eyas
    package shipped with the job unless it is installed on the nodes."""
    import ray

    if ray.is_initialized():
        return
    address = run.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        package_dir = str(Path(__file__).resolve().parent)
        ray.init(address=address, runtime_env={"py_modules": [package_dir]}, log_to_driver=True)
        return
    # A private single-machine instance: Ray 2.60's default token auth would only add a token
    # file that local clients (and the dashboard) must carry; turn it off unless asked for.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=run.num_cpus, include_dashboard=None)


def actor_threads(torch_threads: int | None, num_cpus: float) -> int:
    """Torch threads for a Ray actor: the configured count, else its CPUs rounded up (Ray sets
    OMP_NUM_THREADS from them rounded down, so an actor holding 1.5 CPUs would get 1)."""
    return torch_threads or max(1, math.ceil(num_cpus))


def use_torch_threads(n: int) -> None:
    """Give torch ``n`` intra-op threads in the CALLING thread.

    OpenMP keeps the thread count per OS thread, and Ray Data runs an actor's ``__call__`` in
    a worker thread of its own (its ``__init__`` may run elsewhere): a count set in
    ``__init__`` does not reach the thread that computes. Call this at the top of ``__call__``.
    """
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)

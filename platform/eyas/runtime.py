"""Starting or joining Ray for a job, and what every job's command line shares: the output
check before Ray starts, the summary with absolute URIs, and one-line errors."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eyas.config import ConfigError, RunConfig

USER_ERRORS = (ConfigError,)  # + storage.ArtifactError (imported lazily: pyarrow)


def user_error(exc: BaseException) -> str | None:
    """The message of a configuration or artifact error behind ``exc`` (also when a Ray task or
    actor raised it: Ray wraps it with its remote traceback), else None (a bug: keep the trace)."""
    from eyas.storage import ArtifactError

    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(cause, BaseException):
            todo.insert(0, cause)
            continue
        if isinstance(err, (*USER_ERRORS, ArtifactError)):
            return str(err)
        todo += [err.__cause__, err.__context__]
    return None


def cli(main: Callable[[], Any]) -> None:
    """Run a job's ``main``; a configuration or artifact error ends it with ``error: <message>``
    on stderr and exit status 2, without a traceback (bugs keep theirs)."""
    try:
        main()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        msg = user_error(exc)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def output_uri(run: RunConfig) -> str:
    """``run.output`` as an absolute URI, checked BEFORE Ray starts: a relative path inside Ray's
    temporary working_dir copy without ``EYAS_HOME`` is refused (``eyas.storage.check_output``)."""
    from eyas.storage import check_output

    uri = check_output(run.output, "run.output")
    print(f"# output: {uri}", flush=True)
    return uri


def absolute_outputs(value: Any) -> Any:
    """Every relative local path in a manifest's ``outputs`` made absolute (for the summary)."""
    from eyas import storage

    if isinstance(value, dict):
        return {k: absolute_outputs(v) for k, v in value.items()}
    if isinstance(value, list):
        return [absolute_outputs(v) for v in value]
    if isinstance(value, str) and storage.is_relative_local(value):
        return storage.absolute_uri(value)
    return value


def job_summary(manifest: dict[str, Any], keys: tuple[str, ...], artifact: str) -> dict[str, Any]:
    """What a job prints at the end: ``keys`` of its manifest, ``outputs`` as absolute URIs, and
    ``artifact``, the absolute URI of the whole artifact."""
    out = {k: manifest.get(k) for k in keys if k in manifest}
    if "outputs" in out:
        out["outputs"] = absolute_outputs(out["outputs"])
    return {"artifact": artifact, **out}


def say(line: str) -> None:
    """Write one console line to the process's own stdout. Use it in Ray Train workers: Ray
    Train replaces ``print`` there with one that both logs the text and, because Ray wraps
    ``sys.stdout`` in its workers, prints it as well, so each line reached the driver twice."""
    sys.__stdout__.write(line + "\n")
    sys.__stdout__.flush()


def init_ray(run: RunConfig) -> None:
    """Join the cluster named by ``run.ray_address`` or ``$RAY_ADDRESS`` (as under ``ray job
    submit``), else start a private local instance. Workers on a remote cluster get the eyas
    package shipped with the job unless it is installed on the nodes."""
    import ray

    quiet_ray_data()
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


def quiet_ray_data() -> None:
    """Keep Ray Data's console output to what a person needs.

    - Off a terminal (``ray job logs``, CI, a file) Ray Data logs every operator's progress every
      few seconds: about 2,000 lines in a default pipeline run. The stages print their own line
      per batch, so Ray Data's progress is turned off there; on a terminal its bars stay.
    - Its high-memory detector repeats a 14-line advice every 30 s for any actor holding more
      than a small default (the regeneration actors hold the target, ~2.3 GiB for SmolLM2, the
      PII actors a spaCy model, ~0.7 GiB, by design): about 200 of a default run's 480 lines.
      It is off; memory is not requested per actor either, since on a small machine Ray's
      ``memory`` resource would leave those actors unschedulable.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    if not sys.stdout.isatty():
        ctx.enable_progress_bars = False


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

"""Worker-side checkpoint plumbing: live objects <-> checkpoint directories, and where to resume.

Runs inside Ray Train workers. All checkpoint I/O goes through the filesystem Ray Train itself
persists checkpoints with (``ray.train.get_context().get_storage()``), so workers need no
object-store credentials of their own beyond what the driver handed to Ray Train.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from eyas.runtime import say
from eyas.train.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    TrainState,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
)

DRAFT_PREFIX = "draft."


# ----------------------------------------------------------------------------- state dicts


def model_state(module: nn.Module) -> dict[str, Tensor]:
    """The head's full state dict (checkpoint / export keys, no ``draft.`` prefix). Collective under
    FSDP (every rank calls it); with FSDP only rank 0 receives tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(DRAFT_PREFIX): v for k, v in full.items()}


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (loads into plain, DDP or FSDP modules)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore(directory: str, module: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> TrainState:
    """Load a checkpoint written by ``write_checkpoint`` into the live objects; return its state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    weights, optim, sched, state = load_checkpoint(directory)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, {DRAFT_PREFIX + k: v for k, v in weights.items()}, options=options)
    set_optimizer_state_dict(module, optimizer, optim, options=options)
    scheduler.load_state_dict(sched)
    return state


def write_checkpoint(module: nn.Module, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, state: TrainState,
                     rank: int, local_mode: bool) -> str | None:
    """Gather the state (all ranks) and write it on rank 0 into a fresh temporary directory."""
    weights, optim = model_state(module), optimizer_state(module, optimizer)
    if rank != 0:
        return None
    directory = tempfile.mkdtemp(prefix="eyas-train-local-ckpt-" if local_mode else "eyas-train-ckpt-")
    save_checkpoint(directory, weights, optim, scheduler.state_dict(), state)
    return directory


# ----------------------------------------------------------------------------- the run's storage


def run_storage() -> tuple[Any, str] | None:
    """(pyarrow filesystem, folder) where Ray Train persists this run's checkpoints; None in local
    mode, which persists nothing."""
    import ray.train

    try:
        storage = ray.train.get_context().get_storage()
    except NotImplementedError:
        return None
    return storage.storage_filesystem, storage.experiment_fs_path


def stored_checkpoints(fs: Any, folder: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete checkpoint below ``folder`` on ``fs``, newest first."""
    import pyarrow.fs as pafs

    if fs.get_file_info(folder).type == pafs.FileType.NotFound:
        return []
    files = {f.path for f in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
             if f.type == pafs.FileType.File}
    dirs = {f.rsplit("/", 1)[0] for f in files if f.endswith("/" + STATE_FILE)}
    found = []
    for d in dirs:
        if {f"{d}/{MODEL_FILE}", f"{d}/{OPTIMIZER_FILE}"} <= files:
            with fs.open_input_stream(f"{d}/{STATE_FILE}") as inp:
                found.append((int(json.loads(inp.read())["trainer"]["step"]), d))
    return sorted(found, reverse=True)


def copy_to_local(fs: Any, folder: str, local: str) -> str:
    """Copy one checkpoint folder from ``fs`` into the local directory ``local`` (streamed)."""
    import pyarrow.fs as pafs

    pafs.copy_files(folder, local, source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
    return local


@contextlib.contextmanager
def resume_dir() -> Iterator[str | None]:
    """The local directory of the newest checkpoint of this run, or None for a fresh start.

    Ray Train's ``get_checkpoint()`` is the usual source. A report still queued in a worker that
    died right after writing its checkpoint never reaches Ray's bookkeeping (V2 drains reports
    every 2 s), so the run's folder is also listed and the higher step wins: a killed worker
    costs at most one checkpoint interval."""
    import ray.train

    reported = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        best, best_step = None, -1
        if reported is not None:
            best = stack.enter_context(reported.as_directory())
            best_step = read_train_state(best).step
        where = run_storage()
        stored = stored_checkpoints(*where) if where else []
        if stored and stored[0][0] > best_step:
            say(f"[eyas.train] resuming from {stored[0][1]} (step {stored[0][0]}), newer than the "
                  f"checkpoint Ray Train reported (step {best_step})")
            best = copy_to_local(where[0], stored[0][1], stack.enter_context(tempfile.TemporaryDirectory()))
        yield best


def maybe_inject_fault(fault_step: int | None, rank: int, next_step: int) -> None:
    """TEST HOOK (``train.fault_injection_step``): rank 0 dies with ``os._exit`` before that step,
    once per run; a marker file in the run's folder keeps the restarted attempt alive."""
    if fault_step is None or rank != 0 or next_step != fault_step:
        return
    where = run_storage()
    if where is None:
        return
    import pyarrow.fs as pafs

    fs, folder = where
    marker = f"{folder}/_fault_injected_step{fault_step}"
    if fs.get_file_info(marker).type != pafs.FileType.NotFound:
        return
    with fs.open_output_stream(marker) as out:
        out.write(f"fault injected before step {fault_step}\n".encode())
    say(f"[eyas.train] fault injection: worker rank 0 exits before step {fault_step}")
    os._exit(1)

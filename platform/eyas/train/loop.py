"""The per-worker training loop: TTT on feature batches, AdamW, checkpoints, metrics.

``train_loop_per_worker`` is what ``TorchTrainer`` runs in every worker. It takes a plain dict
(``LoopSpec.to_dict``: config values, the vocab mapping's bytes, an object ref). Each worker:
loads the target's frozen embedding + lm_head (never the whole target), builds the head with the
run's vocab mapping, resumes from the run's last checkpoint when there is one, and then steps
through its shard of the ``train`` dataset (``ray.train.get_dataset_shard``).

Console: rank 0 prints one short line per report (``report_line``, through ``runtime.say``: once,
not twice as Ray Train's patched ``print`` would); Ray Train's own INFO line
per report (the whole metrics dict, several KB, from every worker) is silenced
(``quiet_ray_train_reports``). The full metrics still go to ``ray.train.report``, the run's
manifest and the Ray metrics.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from eyas import metrics as ray_metrics
from eyas.draft.model import DraftConfig, Eagle3Draft
from eyas.draft.ttt import ttt_forward
from eyas.runtime import say
from eyas.train.checkpoint import TrainState
from eyas.train.config import TrainConfig
from eyas.train.data import micro_batches, table_to_batch
from eyas.train.optim import build_optimizer
from eyas.train.resume import maybe_inject_fault, restore, resume_dir, write_checkpoint

FEATURE_KEYS = ("aux", "hidden", "input_ids", "loss_mask", "attention_mask")
REPORTED = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s")  # + acc_0 .. acc_{k-1}


@dataclass
class LoopSpec:
    """Everything a worker needs, resolved by the driver (``eyas.train.trainer``). Workers do no
    storage I/O of their own: the mapping travels here, init weights through the object store,
    checkpoints through Ray Train's storage (the filesystem Ray persists them with)."""

    train: dict[str, Any]  # TrainConfig.model_dump()
    draft_config: dict[str, Any]  # dataclasses.asdict(DraftConfig)
    target: str  # absolute local target model directory (readable on every node)
    vocab_mapping: bytes  # safetensors blob with d2t, t2d
    max_steps: int
    init_weights: Any = None  # ObjectRef of an exported draft's model.safetensors bytes (fine-tuning)
    local_mode: bool = False  # Ray Train local mode: the loop runs in the driver process

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TTTModule(nn.Module):
    """The draft head as the only submodule, so DDP / FSDP wrap exactly the trained weights; the
    frozen target tensors are forward arguments (never broadcast, never sharded)."""

    def __init__(self, draft: Eagle3Draft) -> None:
        super().__init__()
        self.draft = draft

    def forward(self, embed_weight: Tensor, lm_head_weight: Tensor, aux: Tensor, hidden: Tensor,
                input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor, ttt_length: int,
                step_decay: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Batch tensors as ``eyas.features.schema.collate`` gives them -> (loss (), step losses
        (k,), step acc (k,), step counts (k,)) of ``ttt_forward``."""
        out = ttt_forward(self.draft, embed_weight, lm_head_weight, aux, hidden, input_ids, loss_mask,
                          attention_mask, ttt_length=ttt_length, step_decay=step_decay)
        return (out.loss, torch.stack(out.step_losses), torch.stack(out.step_acc),
                torch.stack(out.step_counts))


# ----------------------------------------------------------------------------- building blocks


def build_draft(spec: LoopSpec) -> Eagle3Draft:
    """The head with the run's vocab mapping; initial weights from the seed or ``init_weights``."""
    import ray
    from safetensors.torch import load

    train = TrainConfig.model_validate(spec.train)
    torch.manual_seed(train.seed)
    draft = Eagle3Draft(DraftConfig(**spec.draft_config)).float()
    mapping = load(spec.vocab_mapping)
    draft.set_vocab_mapping(mapping["d2t"], mapping["t2d"])
    if spec.init_weights is not None:
        weights = load(ray.get(spec.init_weights))
        if not (torch.equal(weights["d2t"], draft.d2t) and torch.equal(weights["t2d"], draft.t2d)):
            raise ValueError("train.init_from: the draft's vocab mapping differs from the run's "
                             "vocab_mapping.safetensors; fine-tuning must reuse the checkpoint's mapping "
                             "(start over with run.force=true)")
        draft.load_state_dict(weights)
    return draft


def prepare_module(draft: Eagle3Draft, train: TrainConfig) -> nn.Module:
    """Move to the worker's device and wrap in DDP (or FSDP) when there are several workers."""
    import ray.train.torch

    strategy = "fsdp" if train.fsdp else "ddp"
    # the vocab-mapping buffers are equal on every rank: synced once at init, never per forward
    kwargs = {} if train.fsdp else {"forward_sync_buffers": False}
    return ray.train.torch.prepare_model(TTTModule(draft), parallel_strategy=strategy,
                                         parallel_strategy_kwargs=kwargs)


def step_stats(loss: Tensor, step_losses: Tensor, accs: Tensor, counts: Tensor, tokens: int) -> Tensor:
    """One micro-batch as a flat float64 vector that sums across micro-batches and workers:
    [loss, 1, tokens, step_losses (k), acc*count (k), count (k)]."""
    head = torch.tensor([float(loss.detach()), 1.0, float(tokens)], dtype=torch.float64)
    counts64 = counts.detach().double().cpu()
    return torch.cat([head, step_losses.detach().double().cpu(), accs.detach().double().cpu() * counts64,
                      counts64])


def stats_to_metrics(total: Tensor, k: int) -> dict[str, float]:
    """Summed ``step_stats`` -> loss (mean over micro-batches), step_loss_j, acc_j, tokens."""
    n = max(float(total[1]), 1.0)
    out = {"loss": float(total[0]) / n, "tokens": float(total[2])}
    losses, weighted, counts = total[3:3 + k], total[3 + k:3 + 2 * k], total[3 + 2 * k:3 + 3 * k]
    for j in range(k):
        out[f"step_loss_{j}"] = float(losses[j]) / n
        out[f"acc_{j}"] = float(weighted[j]) / max(float(counts[j]), 1.0)
        out[f"count_{j}"] = float(counts[j])
    return out


def all_reduce_sum(vec: Tensor, device: torch.device) -> Tensor:
    """Sum a CPU float64 vector over workers (identity for one process); NCCL reduces on ``device``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return vec
    work = vec.to(device) if dist.get_backend() == "nccl" else vec.clone()
    dist.all_reduce(work)
    return work.cpu()


def window_summary(window: deque[dict[str, float]], k: int, state: TrainState) -> dict[str, float]:
    """Count-weighted acc_j and mean loss over the last steps; tokens/s over those steps without
    the first step of an attempt (steady state, epoch boundaries included) and over the whole run
    (with data-pipeline startup and restarts)."""
    summary = {"loss": sum(m["loss"] for m in window) / max(len(window), 1)}
    for j in range(k):
        counts = sum(m[f"count_{j}"] for m in window)
        summary[f"acc_{j}"] = sum(m[f"acc_{j}"] * m[f"count_{j}"] for m in window) / max(counts, 1.0)
    steady = [m for m in window if not m["first_of_attempt"]] or list(window)
    seconds = sum(m["tokens"] / max(m["tokens_per_s"], 1e-9) for m in steady)
    summary["tokens_per_s"] = sum(m["tokens"] for m in steady) / max(seconds, 1e-9)
    summary["tokens_per_s_overall"] = state.tokens_total / max(state.train_seconds, 1e-9)  # with startup
    summary["steps"] = state.step
    return summary


def publish(metrics: dict[str, float], k: int, run_name: str) -> None:
    """Step metrics as Ray metrics (Prometheus / dashboard), tagged with the run name."""
    ray_metrics.set_gauge("eyas_train_loss", metrics["loss"], "TTT loss of the last step", run=run_name)
    ray_metrics.set_gauge("eyas_train_lr", metrics["lr"], "learning rate", run=run_name)
    ray_metrics.set_gauge("eyas_train_tokens_per_s", metrics["tokens_per_s"],
                          "training tokens per second (all workers)", run=run_name)
    ray_metrics.set_gauge("eyas_train_step", metrics["step"], "optimizer steps done", run=run_name)
    ray_metrics.inc("eyas_train_tokens_total", metrics["tokens"], "training tokens processed", run=run_name)
    for j in range(k):
        ray_metrics.set_gauge("eyas_train_acc", metrics[f"acc_{j}"], "TTT argmax agreement per step",
                              run=run_name, position=str(j))


def quiet_ray_train_reports() -> None:
    """Keep Ray Train's per-report INFO line (``Reporting training result N: TrainingReport(...)``
    with every metric, from every worker) off the console; its warnings still show. Its logger
    is named after the module's file path, so it is found without importing Ray's internals."""
    spec = importlib.util.find_spec("ray.train.v2._internal.execution.context")
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(logging.WARNING)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def report_line(metrics: dict[str, float], max_steps: int, seconds_per_step: float) -> str:
    """One console line per report: step/total, loss, acc_0, tokens/s and the time left."""
    eta = _duration((max_steps - metrics["step"]) * seconds_per_step)
    return (f"[eyas.train] step {int(metrics['step'])}/{max_steps}  loss {metrics['loss']:.3f}  "
            f"acc_0 {metrics['acc_0']:.3f}  {metrics['tokens_per_s']:.0f} tok/s  eta {eta}")


# ----------------------------------------------------------------------------- the loop


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: batch[k].to(device, non_blocking=True) for k in FEATURE_KEYS}


def _accumulate(module: nn.Module, target: tuple[Tensor, Tensor], batches: list[dict[str, Tensor]],
                train: TrainConfig, device: torch.device) -> Tensor:
    """Forward + backward over the micro-batches of one optimizer step (gradient sync only on the
    last); returns the summed ``step_stats`` of this worker."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=train.precision == "bf16")
    total = None
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()
        b = _to_device(batch, device)
        with sync:
            with autocast:
                loss, step_losses, accs, counts = module(
                    *target, b["aux"], b["hidden"], b["input_ids"], b["loss_mask"], b["attention_mask"],
                    train.ttt_length, train.step_decay)
            (loss / len(batches)).backward()
        stats = step_stats(loss, step_losses, accs, counts, int(batch["attention_mask"].sum()))
        total = stats if total is None else total + stats
    return total


def _clip(module: nn.Module, max_norm: float) -> float:
    clip = getattr(module, "clip_grad_norm_", None)  # FSDP shards gradients: use its own clip
    norm = clip(max_norm) if clip is not None else torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
    return float(norm)


def _next_batches(stream: Iterator[tuple[int, int, Any]], n: int, train: TrainConfig, state: TrainState
                  ) -> list[dict[str, Tensor]]:
    """The next ``n`` micro-batches, decoded; advances the data position in ``state``."""
    batches = []
    for _ in range(n):
        epoch, index, table = next(stream)
        batches.append(table_to_batch(table, train.max_length))
        state.epoch, state.batch_in_epoch = epoch, index + 1
    return batches


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=LoopSpec.to_dict())``)."""
    import ray.train
    import ray.train.torch

    from eyas.draft.target import load_target_head

    spec = LoopSpec(**config)
    train = TrainConfig.model_validate(spec.train)
    k = train.ttt_length
    # Step 1: worker setup. One intra-op thread per worker: more is far slower on shared CPUs.
    entered = time.time()
    quiet_ray_train_reports()
    torch.set_num_threads(train.torch_threads)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")

    # Step 2: the frozen target tensors and the head (vocab mapping decided by the driver).
    embed, lm_head, _ = load_target_head(spec.target)
    target = (embed.to(device), lm_head.to(device))
    module = prepare_module(build_draft(spec), train)
    optimizer, scheduler = build_optimizer([p for p in module.parameters() if p.requires_grad], train,
                                           spec.max_steps)

    # Step 3: resume from the run's last checkpoint (weights, optimizer, schedule, data position).
    state = TrainState()
    with resume_dir() as directory:
        if directory is not None:
            state = restore(directory, module, optimizer, scheduler)
            state.resumed_at.append(state.step)
            state.history = []  # the checkpoint's own steps are not part of this attempt
            say(f"[eyas.train] rank {rank} resumed at step {state.step} (epoch {state.epoch}, "
                  f"batch {state.batch_in_epoch})")
    shard = ray.train.get_dataset_shard("train")
    stream = micro_batches(shard, train.batch_size, state.epoch, state.batch_in_epoch, train.shuffle_buffer,
                           train.seed)
    window: deque[dict[str, float]] = deque(maxlen=train.metrics_window)
    unreported: list[dict[str, float]] = []
    last_local_ckpt: str | None = None

    module.train()
    if rank == 0:
        say(f"[eyas.train] worker setup {time.time() - entered:.1f}s, training steps "
              f"{state.step + 1}..{spec.max_steps}")
    cycle_start = time.perf_counter()
    first_step, attempt_seconds = state.step, 0.0
    while state.step < spec.max_steps:
        maybe_inject_fault(train.fault_injection_step, rank, state.step + 1)
        # Step 4: one optimizer step over grad_accum micro-batches.
        batches = _next_batches(stream, train.grad_accum, train, state)
        lr = scheduler.get_last_lr()[0]
        local = _accumulate(module, target, batches, train, device)
        grad_norm = _clip(module, train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # Step 5: metrics summed over workers. The step's time runs from the end of the previous
        # step: it includes the previous report (a barrier) and waiting for data.
        totals = all_reduce_sum(local, device)
        now = time.perf_counter()
        elapsed, cycle_start = now - cycle_start, now
        state.step += 1
        state.tokens_total += int(totals[2])
        state.train_seconds += elapsed
        attempt_seconds += elapsed
        step_metrics = stats_to_metrics(totals, k)
        step_metrics.update(step=state.step, epoch=state.epoch, lr=lr, grad_norm=grad_norm,
                            tokens_per_s=float(totals[2]) / max(elapsed, 1e-9),
                            first_of_attempt=float(not window))
        window.append(step_metrics)
        compact = {key: step_metrics[key] for key in REPORTED}
        compact.update({f"acc_{j}": step_metrics[f"acc_{j}"] for j in range(k)})
        state.history.append(compact)
        unreported.append(compact)
        if rank == 0:
            publish(step_metrics, k, ctx.get_experiment_name())

        # Step 6: report (a barrier: every rank decides alike) every report_every steps with the
        # per-step metrics since the last report; every checkpoint_every steps and at the end
        # with a checkpoint.
        with_checkpoint = state.step % train.checkpoint_every == 0 or state.step == spec.max_steps
        if not with_checkpoint and state.step % train.report_every:
            continue
        report, unreported = {**compact, "steps": unreported}, []
        if rank == 0:
            pace = attempt_seconds / max(state.step - first_step, 1)
            say(report_line(step_metrics, spec.max_steps, pace))
        if not with_checkpoint:
            ray.train.report(report)
            continue
        state.summary = window_summary(window, k, state)
        directory = write_checkpoint(module, optimizer, scheduler, state, rank, spec.local_mode)
        ckpt = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report({**report, "summary": state.summary}, checkpoint=ckpt)
        state.history = []
        if spec.local_mode and directory:  # local mode keeps the object: drop the previous one
            if last_local_ckpt:
                shutil.rmtree(last_local_ckpt, ignore_errors=True)
            last_local_ckpt = directory
        elif directory:  # uploaded synchronously to the run's storage by report()
            shutil.rmtree(directory, ignore_errors=True)

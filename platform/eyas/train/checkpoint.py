"""Training checkpoints without pickles: safetensors for tensors, JSON for everything else.

A checkpoint directory holds::

    model.safetensors      the draft's state dict (fp32 master weights, d2t, t2d): the keys of
                           an exported draft, so ``Eagle3Draft.load_state_dict`` reads it as is
    optimizer.safetensors  AdamW state, one tensor per ``state/<param name>/<field>``
    trainer_state.json     optimizer param groups, scheduler state, step, data position,
                           token / time counters, metrics since the previous checkpoint

The optimizer state dict is keyed by parameter NAME (``torch.distributed.checkpoint``'s
full-state-dict form), so it loads into a plain, DDP or FSDP module alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Where training stands. ``batch_in_epoch`` counts the micro-batches of ``epoch`` this
    worker has consumed (the data position); counters survive resumes."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_total: int = 0
    train_seconds: float = 0.0
    resumed_at: list[int] = field(default_factory=list)  # steps at which a restart resumed
    history: list[dict[str, float]] = field(default_factory=list)  # per-step metrics since last ckpt
    summary: dict[str, float] = field(default_factory=dict)  # window averages at this checkpoint


def flatten_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A name-keyed optimizer state dict -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, fields in osd["state"].items():
        for key, value in fields.items():
            if isinstance(value, Tensor):
                tensors[f"state/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_optimizer_state``."""
    state: dict[str, dict[str, Any]] = {}
    for flat, value in tensors.items():
        _, rest = flat.split("/", 1)
        name, key = rest.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    for name, fields in meta["scalars"].items():
        state.setdefault(name, {}).update(fields)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(directory: str | Path, model_state: dict[str, Tensor], optimizer_state: dict[str, Any],
                    scheduler_state: dict[str, Any], state: TrainState) -> None:
    """Write the three files of a checkpoint into ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(out / MODEL_FILE))
    tensors, optim_meta = flatten_optimizer_state(optimizer_state)
    save_file(tensors, str(out / OPTIMIZER_FILE))
    doc = {"format_version": FORMAT_VERSION, "trainer": asdict(state), "optimizer": optim_meta,
           "scheduler": scheduler_state}
    (out / STATE_FILE).write_text(json.dumps(doc, indent=1))


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any], TrainState]:
    """(model state, optimizer state (name-keyed), scheduler state, TrainState) of a checkpoint."""
    from safetensors.torch import load_file

    path = Path(directory)
    missing = [f for f in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} lacks {missing}: it was not written by "
                                "eyas.train (or is incomplete); delete it to start over")
    doc = json.loads((path / STATE_FILE).read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format_version {doc.get('format_version')}; "
                         f"this eyas reads {FORMAT_VERSION}")
    optimizer = unflatten_optimizer_state(load_file(str(path / OPTIMIZER_FILE)), doc["optimizer"])
    return load_file(str(path / MODEL_FILE)), optimizer, doc["scheduler"], TrainState(**doc["trainer"])


def read_train_state(directory: str | Path) -> TrainState:
    """Only the ``TrainState`` of a checkpoint (step, counters, metrics)."""
    doc = json.loads((Path(directory) / STATE_FILE).read_text())
    return TrainState(**doc["trainer"])

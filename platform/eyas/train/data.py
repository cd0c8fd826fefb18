"""Feature data for training and evaluation: which target, which split, which batches.

The seam: everything downstream takes a ``ray.data.Dataset`` of ``FEATURE_SCHEMA`` rows.
The features stage owns where the rows come from (``eyas.features.online.feature_dataset``:
``<features.artifact>/<split>/*.parquet`` offline, the live target online); this module batches them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from eyas.features.config import FeaturesConfig
from eyas.targets import resolve_target


@dataclass
class FeatureSpec:
    """What the features were computed from: the target directory, its captured layers (layer
    OUTPUT indices, None = EAGLE-3's default) and its hidden size (None = read from the target)."""

    target: str
    aux_layer_ids: list[int] | None
    hidden_size: int | None


def feature_spec(features: FeaturesConfig, target: str | None = None, key: str = "train.target") -> FeatureSpec:
    """The target and layers of the features (``eyas.features.online.feature_info``: the offline
    artifact's manifest, or the config online). ``target`` (train.target / evaluate.target), when
    given, must name the same model."""
    from eyas.features.online import feature_info

    info = feature_info(features)
    recorded = str(info.get("path") or features.target)
    path = resolve_target(target or recorded, key)
    if target and resolve_target(recorded, "features target") != path:
        raise ValueError(f"{key}={target!r} differs from the target the features were computed "
                         f"with ({recorded!r}); train against that target, or re-run the features stage")
    ids = info.get("aux_layer_ids")
    hidden = info.get("hidden_size")
    return FeatureSpec(path, [int(i) for i in ids] if ids is not None else None,
                       int(hidden) if hidden is not None else None)


def feature_datasets(features: FeaturesConfig, splits: tuple[str, ...] = ("train",)) -> dict[str, Any]:
    """The seam between the features stage and training: split name -> ``ray.data.Dataset`` of
    ``FEATURE_SCHEMA`` rows, offline (the artifact's Parquet) or online (the live target), as
    ``eyas.features.online.feature_dataset`` provides them."""
    from eyas.features.online import feature_dataset

    return {split: feature_dataset(features, split) for split in splits}


def count_assistant_tokens(ds: Any, vocab_size: int, batch_size: int = 4096) -> Tensor:
    """(vocab_size,) int64 frequencies of assistant tokens (``loss_mask == 1``) over a dataset;
    reads only the ``input_ids`` and ``loss_mask`` columns."""
    import pyarrow.compute as pc

    from eyas.draft.vocab import count_tokens

    def flat_pairs() -> Iterator[tuple[Tensor, Tensor]]:
        for table in ds.select_columns(["input_ids", "loss_mask"]).iter_batches(
                batch_size=batch_size, batch_format="pyarrow"):
            ids = pc.list_flatten(table["input_ids"]).to_numpy(zero_copy_only=False)
            mask = pc.list_flatten(table["loss_mask"]).to_numpy(zero_copy_only=False)
            yield torch.from_numpy(ids.astype("int64")), torch.from_numpy(mask.astype("int64"))

    pairs = list(flat_pairs())
    return count_tokens((p[0] for p in pairs), (p[1] for p in pairs), vocab_size)


def table_to_batch(table: Any, max_length: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """A pyarrow table of feature rows -> ``collate`` output cut to ``max_length`` tokens:
    input_ids, loss_mask, attention_mask (B, T) int64, aux (B, T, 3H), hidden (B, T, H)."""
    from eyas.features.schema import collate

    batch = collate(table.to_pylist(), dtype)
    return {k: v[:, :max_length] for k, v in batch.items()}


def micro_batches(shard: Any, batch_size: int, epoch: int = 0, skip: int = 0, shuffle_buffer: int = 0,
                  seed: int = 0) -> Iterator[tuple[int, int, Any]]:
    """Endless ``(epoch, index_in_epoch, pyarrow table)`` over a dataset shard (a ``DataIterator``
    or a ``Dataset``), one pass per epoch, starting at ``epoch`` after ``skip`` batches.

    ``shuffle_buffer`` > 0 shuffles rows locally with seed ``seed + epoch``: a different order
    every epoch, the same order again when an epoch is replayed. Skipped batches are read but not
    decoded: this is how a resumed run continues at its saved data position. An epoch that yields
    nothing is an error (fewer rows than workers)."""
    while True:
        seen = 0
        shuffle = ({"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed + epoch}
                   if shuffle_buffer else {})
        for index, table in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                                         prefetch_batches=1, **shuffle)):
            seen += 1
            if index >= skip:
                yield epoch, index, table
        if seen == 0:
            raise RuntimeError(f"epoch {epoch}: this worker's shard of the train split is empty; "
                               "use fewer workers than training rows (or more data)")
        if skip > seen:
            raise RuntimeError(f"resume position {skip} is past the end of epoch {epoch} "
                               f"({seen} batches): the data or batch size changed since the checkpoint")
        epoch, skip = epoch + 1, 0


def micro_batches_per_epoch(num_rows: int, num_workers: int, batch_size: int) -> int:
    """Micro-batches each worker sees per epoch (Ray Train splits rows equally, dropping the rest)."""
    per_worker = num_rows // max(num_workers, 1)
    if per_worker == 0:
        raise ValueError(f"{num_rows} training rows cannot be split over {num_workers} workers; "
                         "use fewer workers or more data")
    return -(-per_worker // batch_size)

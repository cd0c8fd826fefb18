"""From a training checkpoint to a served draft directory, and directory copies by URI."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from eyas import storage
from eyas.draft.model import DraftConfig, Eagle3Draft
from eyas.export.check import check_draft_dir
from eyas.export.writer import save_draft
from eyas.train.checkpoint import MODEL_FILE


def upload_dir(local: str | Path, uri: str) -> list[str]:
    """Copy every file of a local directory to ``uri`` (same relative paths, streamed);
    returns the URIs written."""
    root = Path(local)
    storage.copy(str(root), uri)
    return [storage.join(uri, p.relative_to(root).as_posix())
            for p in sorted(p for p in root.rglob("*") if p.is_file())]


def download_dir(uri: str, local: str | Path) -> Path:
    """Copy every file below ``uri`` into the local directory ``local`` (streamed); returns it."""
    if not storage.list_files(uri):
        raise FileNotFoundError(f"{uri}: no files there; point at an exported draft directory")
    storage.copy(uri, str(local))
    return Path(local)


@contextmanager
def local_dir(uri: str) -> Iterator[Path]:
    """A local directory with the files of ``uri``: the path itself when local, else a temp copy."""
    if not storage.is_remote(uri):
        path = Path(storage.resolve(uri)[1])
        if not path.is_dir():
            raise FileNotFoundError(f"{uri} is not a directory")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="eyas-dl-") as tmp:
        yield download_dir(uri, tmp)


def draft_from_checkpoint(checkpoint_dir: str | Path, config: DraftConfig) -> Eagle3Draft:
    """The fp32 head stored in a training checkpoint directory."""
    from safetensors.torch import load_file

    draft = Eagle3Draft(config).float()
    draft.load_state_dict(load_file(str(Path(checkpoint_dir) / MODEL_FILE)))
    return draft


def export_draft(draft: Eagle3Draft, output_uri: str, target_dir: str, dtype: str) -> list[str]:
    """``save_draft`` into ``output_uri`` (copied there when remote), then ``check_draft_dir``
    against the target. Raises naming every problem; returns the written file URIs."""
    with tempfile.TemporaryDirectory(prefix="eyas-export-") as tmp:
        save_draft(draft, tmp, dtype=dtype)
        problems = check_draft_dir(tmp, target_dir)
        if problems:
            raise ValueError("the exported draft fails its check against the target "
                             f"{target_dir}:\n  - " + "\n  - ".join(problems))
        storage.delete_dir(output_uri)
        return upload_dir(tmp, output_uri)


def read_draft_config(draft_dir: str | Path) -> DraftConfig:
    """``DraftConfig`` of an exported directory."""
    return DraftConfig.from_hf_config(json.loads((Path(draft_dir) / "config.json").read_text()))

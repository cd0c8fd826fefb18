"""The small interface every serving backend implements, and what it yields.

``await backend.generate(request_id, prompt_ids, params)`` validates and submits a request
(raising ``ValueError`` for input the engine rejects) and returns a ``GenerationStream``: an
async iterator of ``GenerationChunk`` (text deltas, stop strings already cut) whose last chunk
has ``finish_reason`` set and carries the final counts and speculative statistics. Closing the
stream early (``aclose``: a client disconnect, a cancelled task) aborts the request in the
engine and frees its slot.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from eyas.engine.sampling import SamplingParams

DRAFT_FILES = ("config.json", "model.safetensors")


@dataclass(frozen=True)
class SpecStats:
    """Speculative statistics of one request.

    verify_steps: target verification forwards (SGLang's ``spec_verify_ct``); accepted_tokens:
    draft tokens accepted; decoded_tokens: tokens those steps emitted, so
    ``acceptance_length = decoded_tokens / verify_steps`` (tau; 1.0 for plain decoding).
    """

    verify_steps: int
    accepted_tokens: int
    decoded_tokens: int

    @property
    def acceptance_length(self) -> float:
        return self.decoded_tokens / self.verify_steps if self.verify_steps else 0.0


@dataclass(frozen=True)
class GenerationChunk:
    """New text of one request since the previous chunk, with the running counts."""

    text: str
    new_tokens: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk
    spec: SpecStats | None = None  # on the last chunk, when the backend reports it


class GenerationStream(Protocol):
    """What ``Backend.generate`` returns."""

    def __aiter__(self) -> AsyncIterator[GenerationChunk]: ...

    async def __anext__(self) -> GenerationChunk: ...

    async def aclose(self) -> None:
        """Abort the request unless it finished; idempotent."""


class Backend(Protocol):
    """An engine behind the OpenAI API (see the module docstring)."""

    name: str  # "eyas" | "sglang"
    max_context: int  # prompt + completion tokens a request may use

    async def generate(self, request_id: str, prompt_ids: list[int],
                       params: SamplingParams) -> GenerationStream: ...

    def info(self) -> dict[str, Any]:
        """Backend state for ``/v1/server_info`` (slots, queue, engine settings)."""

    def round_stats(self) -> dict[str, dict[str, Any]] | None:
        """Decode rounds per speculation setting (share, predicted vs measured mean round
        time, ``eyas.engine.policy.RoundRecords.snapshot``); None when the backend has none."""

    def check_health(self) -> None:
        """Raise RuntimeError when the backend can no longer serve (Serve restarts it)."""

    def shutdown(self) -> None: ...


def local_draft_dir(value: str, key: str) -> str:
    """A draft directory usable by a local loader: ``assets:`` resolved, ``s3://`` and ``gs://``
    directories copied to a local temporary folder, hub ids passed through (SGLang)."""
    from eyas.storage import is_remote
    from eyas.targets import resolve_target

    if is_remote(value):
        return download_dir(value, DRAFT_FILES)
    return resolve_target(value, key)


def target_model_path(value: str) -> str:
    """The target model as a local directory (``assets:`` resolved) or a hub id."""
    from eyas.storage import is_remote
    from eyas.targets import resolve_target

    if is_remote(value):
        raise ValueError(f"model={value!r}: the target must be a local directory (or a hub id "
                         "for SGLang); copy it to the nodes' disk first")
    return resolve_target(value, "model")


def download_dir(uri: str, files: tuple[str, ...]) -> str:
    """Copy ``files`` of a remote directory ``uri`` to a fresh local folder; return its path."""
    from eyas.storage import ArtifactError, copy, join

    out = Path(tempfile.mkdtemp(prefix="eyas-serve-"))
    for name in files:
        try:
            copy(join(uri, name), str(out / name))
        except (ArtifactError, OSError) as exc:
            raise FileNotFoundError(f"{join(uri, name)} could not be read ({exc}); point the "
                                    "path at an exported draft directory") from exc
    return str(out)

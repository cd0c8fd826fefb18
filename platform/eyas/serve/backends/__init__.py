"""Serving backends behind one small interface (``base.Backend``): the eyas engine, SGLang."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eyas.serve.backends.base import Backend, GenerationChunk, GenerationStream, SpecStats

if TYPE_CHECKING:
    from eyas.serve.config import ServeConfig

__all__ = ["Backend", "GenerationChunk", "GenerationStream", "SpecStats", "make_backend"]


def make_backend(cfg: ServeConfig, tokenizer: Any) -> Backend:
    """The backend ``cfg.backend`` names (heavy imports happen here, on the replica)."""
    if cfg.backend == "eyas":
        from eyas.serve.backends.eyas_engine import EyasBackend

        return EyasBackend(cfg, tokenizer)
    if cfg.backend == "sglang":
        from eyas.serve.backends.sglang_engine import SGLangBackend

        return SGLangBackend(cfg, tokenizer)
    raise ValueError(f"backend={cfg.backend!r}: use 'eyas' or 'sglang'")

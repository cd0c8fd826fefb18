"""Speculation settings of the eyas engine (``SpecConfig``), and the corpus n-gram store a
setting may need (``load_store``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from eyas.engine.ngram_store import STORE_FILE, NgramStore


@dataclass
class SpecConfig:
    """EAGLE-3 settings with SGLang's names: S steps, top-K per node, D tree tokens; plus an
    optional n-gram lookup branch of up to ``ngram_tokens`` nodes (0 = off) matching the last
    ``ngram_max`` .. ``ngram_min`` tokens (``eyas.engine.lookup``); an optional corpus branch of
    up to ``corpus_tokens`` nodes from the draft directory's n-gram store of the training replies
    (``eyas.engine.ngram_store``; 0 = off); ``max_speculative_batch``:
    rounds with more requests running decode plainly (None = always speculate). Verifying a
    tree costs little more than one token while the forward is memory-bound and about D tokens
    once it is compute-bound; where that turns depends on the machine and the head, so measure
    it (bench/decode_speed.py at several concurrencies), or let ``mode="adaptive"`` choose per
    round among plain decoding, chains of depth 1..S and the configured tree
    (``eyas.engine.policy``; ``max_speculative_batch`` still caps it); ``calibrate`` times
    every adaptive candidate on dummy requests when the engine starts (``Engine.calibrate``)."""

    draft_dir: str | None = None
    num_steps: int = 3
    eagle_topk: int = 1
    num_draft_tokens: int = 4
    ngram_tokens: int = 0
    ngram_min: int = 1
    ngram_max: int = 3
    corpus_tokens: int = 0
    max_speculative_batch: int | None = None
    mode: Literal["fixed", "adaptive"] = "fixed"
    calibrate: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "adaptive"):
            raise ValueError(f"mode={self.mode!r}: use 'fixed' (the configured tree every round) "
                             "or 'adaptive' (a setting chosen per round)")
        if self.calibrate and self.mode != "adaptive":
            raise ValueError("calibrate=True times the adaptive candidates: set mode='adaptive'")
        if self.max_speculative_batch is not None and self.max_speculative_batch < 1:
            raise ValueError(f"max_speculative_batch={self.max_speculative_batch}: use >= 1, or "
                             "None to speculate at every batch size")
        if self.ngram_tokens < 0 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"ngram_tokens={self.ngram_tokens}, ngram_min={self.ngram_min}, "
                             f"ngram_max={self.ngram_max}: need ngram_tokens >= 0 and "
                             "1 <= ngram_min <= ngram_max")
        if self.corpus_tokens < 0:
            raise ValueError(f"corpus_tokens={self.corpus_tokens}: use >= 0 (0 = no corpus branch)")

    @property
    def max_tree_nodes(self) -> int:
        """Tree nodes one verification can hold: D plus the lookup and corpus branches."""
        return self.num_draft_tokens + self.ngram_tokens + self.corpus_tokens



def load_store(spec: SpecConfig) -> NgramStore:
    """The draft directory's n-gram store, for ``corpus_tokens``; a clear error without one."""
    path = Path(spec.draft_dir or "") / STORE_FILE
    if spec.draft_dir is None or not path.is_file():
        raise ValueError(f"speculative.corpus_tokens={spec.corpus_tokens} needs {path}: the train "
                         "stage writes it beside the head (train.ngram_store_max_n > 0); for an "
                         "older head: python -m eyas.engine.ngram_store FEATURES_URI DRAFT_DIR")
    return NgramStore.load(str(path))

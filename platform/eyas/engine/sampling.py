"""Per-request sampling: parameters, logits -> probabilities, seeded draws, stop conditions.

Randomness is drawn as uniforms from each request's own ``torch.Generator``, one per output
position (``UniformStream``), and turned into tokens by inverse-CDF lookup: a seeded request
reproduces exactly whatever else runs in the same batch and whichever speculation setting each
round uses, and speculative acceptance reuses the same pure-tensor machinery.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

TEMPERATURE_FLOOR = 1e-5  # below: greedy; logits / T would overflow float32 into inf and NaN
TOP_P_FLOOR = 1e-6  # float32 flushes top_p <= 1e-46 to 0, which would drop every token


@dataclass
class SamplingParams:
    """How one request is decoded. ``temperature < TEMPERATURE_FLOOR`` (0 included) means greedy
    (top_p/top_k ignored)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # when False the model's eos ids also stop the request
    seed: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first out-of-range field."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = disabled)")
        if any(not s for s in self.stop):
            raise ValueError("stop contains an empty string; remove it")

    @property
    def greedy(self) -> bool:
        return self.temperature < TEMPERATURE_FLOOR


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator:
    """A generator seeded with ``seed`` (a fresh random seed when None)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


class UniformStream:
    """A request's uniforms in [0, 1): the one at index t decides its output token t (the first,
    from prefill, is t = 0), whichever round and setting produce that token.

    ``peek(n)`` shows the next n without using them; ``consume(k)`` drops the k that decided
    the tokens a round emitted. Draws come from the request's generator in blocks of
    ``BLOCK``, so the sequence does not depend on how rounds consume it (CUDA generators give
    other numbers for rand(1) twice than for rand(2)).
    """

    BLOCK = 64

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._buffer = torch.empty(0, device=generator.device)

    def peek(self, n: int) -> Tensor:
        """(n,) float32, the next n uniforms."""
        while len(self._buffer) < n:
            block = torch.rand(self.BLOCK, generator=self.generator, device=self.generator.device)
            self._buffer = torch.cat([self._buffer, block])
        return self._buffer[:n]

    def consume(self, k: int) -> None:
        self._buffer = self._buffer[k:]


def draw_uniforms(streams: Sequence[UniformStream | None], n: int,
                  device: str | torch.device) -> Tensor:
    """(B, n) float32: row b the next n uniforms of ``streams[b]`` (not consumed); zeros where
    None (greedy rows)."""
    return torch.stack([torch.zeros(n, device=device) if s is None else s.peek(n)
                        for s in streams])


def probs_from_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """The distribution each request samples from.

    logits (N, V) float; temperature (N,) float (below ``TEMPERATURE_FLOOR`` = greedy: one-hot on
    the argmax); top_k (N,) int64 (0 = off); top_p (N,) float (1 = off; floored at
    ``TOP_P_FLOOR``). Returns probs (N, V) float32. Top-k is applied before top-p, both to the
    temperature-scaled logits. A row whose distribution is not finite (inf/NaN logits) falls back
    to the one-hot argmax rather than sampling garbage.
    """
    logits = logits.float()
    greedy = temperature < TEMPERATURE_FLOOR
    top_p = top_p.float().clamp(min=TOP_P_FLOOR)
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    if bool((top_k > 0).any()):  # sorting 50-150k logits per row is costly: only when asked
        k = torch.where(top_k > 0, top_k, logits.shape[-1]).clamp(max=logits.shape[-1])
        top = scaled.topk(int(k.max()), dim=-1).values  # (N, kmax) descending
        kth = top.gather(1, (k - 1)[:, None])  # (N, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # (N, V)
        drop_sorted = mass_before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    finite = logits.nan_to_num(nan=float("-inf"))
    one_hot = torch.zeros_like(probs).scatter(1, finite.argmax(-1, keepdim=True), 1.0)
    broken = ~torch.isfinite(probs).all(-1) | ~(probs.sum(-1) > 0)  # (N,)
    return torch.where((greedy | broken)[:, None], one_hot, probs)


def sample_from_probs(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw: probs (N, V) non-negative (need not sum to 1), uniforms (N,) in [0, 1).

    Returns (N,) int64 token ids; a token with zero mass is never returned.
    """
    cdf = probs.cumsum(-1)  # (N, V)
    target = uniforms[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def truncate_at_stop(
    previous: list[int], new: list[int], params: SamplingParams, eos_ids: Sequence[int],
    decode: Callable[[list[int]], str] | None,
) -> tuple[list[int], str | None, int | str | None]:
    """Cut ``new`` tokens (appended to the completion ``previous``) at the first stop condition.

    Checked per token in order: a stop token id (kept in the output), a stop string completed
    in the decoded completion (the token completing it is kept; trim the text yourself at
    ``stop_reason``), ``max_tokens``. Returns (kept new tokens, finish_reason "stop"/"length"
    or None, stop_reason: the stop token id or string, else None).
    """
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    string_hit = _first_stop_string(previous, new, params.stop, decode)
    for j, tok in enumerate(new):
        if tok in stop_ids:
            return new[: j + 1], "stop", tok
        if string_hit is not None and j == string_hit[0]:
            return new[: j + 1], "stop", string_hit[1]
        if len(previous) + j + 1 >= params.max_tokens:
            return new[: j + 1], "length", None
    return new, None, None


TOKENS_PER_CHAR = 4  # byte-fallback tokens: up to 4 per character
TAIL_SLACK = 8  # tokens of context before a stop string (merges at the cut)


def _first_stop_string(previous: list[int], new: list[int], stops: list[str],
                       decode: Callable[[list[int]], str] | None) -> tuple[int, str] | None:
    """(index into ``new`` of the token completing a stop string, the string), or None."""
    if not stops or not new:
        return None
    if decode is None:
        raise ValueError("SamplingParams.stop needs a tokenizer: give the Engine one, or put a "
                         "tokenizer next to the model's config.json")
    # Only the tail can complete a stop string (none was complete before, or the request would
    # have ended): decoding the whole output each step would cost O(length) per token. A token
    # decodes to at least a quarter character (UTF-8 byte fallback), so this tail holds the
    # longest stop string's start.
    tail = previous[-(TOKENS_PER_CHAR * max(map(len, stops)) + TAIL_SLACK):]
    if not any(s in decode(tail + new) for s in stops):
        return None
    for j in range(len(new)):
        text = decode(tail + new[: j + 1])
        hits = [s for s in stops if s in text]
        if hits:
            return j, min(hits, key=text.find)
    return None

"""The round-time model of a running engine, measured online (``eyas.engine.policy`` uses it).

A speculative round of B requests costs, phase by phase (the engine times each one):
- extend: the draft over the tokens each request committed since its last speculative round
  (B x W, W the longest pending run);
- grow: S tree-growth steps over K frontier nodes each (B x K x S draft positions), plus the
  lookup and corpus branches;
- verify: ONE target forward over the T tree tokens of every request (B x T);
- accept: target distributions, acceptance, cache compaction and bookkeeping (B x T).
A plain round is verify + accept with T = 1 (one target forward, one sampled token), so plain
decoding and every speculative setting are priced by the same measurements.

Each phase keeps an estimate of its seconds per exact shape (e.g. ``(B, T)``) and, for shapes
never run, per work size (e.g. ``B * T`` tokens), interpolated linearly between the nearest
measured sizes; past the largest measured size the time grows in proportion (the forward is
compute-bound there: pessimistic on purpose), below the smallest it stays flat (a forward never
gets cheaper than its fixed cost). Until a shape has ``WARM_TIMINGS`` timings of its own it is
never predicted slower than a measured shape that differs only by a larger last entry (more
tree tokens, pending tokens or draft steps), so a shape timed in a stalled round is bounded by
its larger siblings; a settled shape keeps its own estimate (where the cost hardly depends on
the last entry, as at small batches, the least of several noisy siblings predicted ~15% low:
measured through Serve, 2 requests).

An estimate is robust to stalls (a first call's one-time costs, a preempted process, a
collector pause): the least of a shape's first ``WARM_TIMINGS`` timings, then an exponential
moving average (weight ``alpha``) of timings clipped to half / twice the estimate.

The machine's speed drifts (measured here: a 2-core VM's plain round went 18 -> 25 ms within
minutes, and longer contexts cost more), and a setting the policy rarely runs would keep the
timings of its last run. So the tables hold times in units of a shared ``CostModel.speed``: a
round whose every phase has a settled estimate of its own (``WARM_TIMINGS`` timings) moves
``speed`` toward its measured / tabled ratio (weight ``SPEED_ALPHA``), and every prediction is
tabled x ``speed``. The frequent settings thus keep the rare ones' predictions current, and the
tables, which move slower (``COST_ALPHA``), keep the relative costs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

COST_ALPHA = 0.05  # EMA weight of a shape's new timing (in units of speed): relative costs
SPEED_ALPHA = 0.5  # EMA weight of a round's measured / tabled ratio in the machine's speed:
# fast, so the tables take little of a drift (~COST_ALPHA / SPEED_ALPHA); its round-to-round
# noise scales every setting's prediction alike, so it never changes the policy's choice
WARM_TIMINGS = 3  # a shape's first timings, of which the least is kept


def ema(old: float | None, new: float, alpha: float) -> float:
    """``new`` blended into ``old`` with weight ``alpha`` (``new`` alone when ``old`` is None)."""
    return new if old is None else (1 - alpha) * old + alpha * new


@dataclass
class Timing:
    """The robust running estimate of one shape's seconds (see the module docstring)."""

    value: float = 0.0
    count: int = 0

    def add(self, seconds: float, alpha: float) -> None:
        self.count += 1
        if self.count == 1:
            self.value = seconds
        elif self.count <= WARM_TIMINGS:
            self.value = min(self.value, seconds)
        else:
            self.value = ema(self.value, min(max(seconds, self.value / 2), 2 * self.value), alpha)


@dataclass
class PhaseCost:
    """Seconds of one phase: estimates per exact shape key, grouped by all entries but the
    last (``exact[key[:-1]][key[-1]]``), and per work size for other keys."""

    alpha: float = COST_ALPHA
    exact: dict[tuple[int, ...], dict[int, Timing]] = field(default_factory=dict)
    by_size: dict[int, Timing] = field(default_factory=dict)
    _sizes: list[int] = field(default_factory=list)  # sorted keys of by_size

    def observe(self, key: tuple[int, ...], size: int, seconds: float) -> None:
        self.exact.setdefault(key[:-1], {}).setdefault(key[-1], Timing()).add(seconds, self.alpha)
        if size not in self.by_size:
            bisect.insort(self._sizes, size)
        self.by_size.setdefault(size, Timing()).add(seconds, self.alpha)

    def settled(self, key: tuple[int, ...]) -> float | None:
        """``key``'s own estimate once it has ``WARM_TIMINGS`` timings, else None."""
        timing = self.exact.get(key[:-1], {}).get(key[-1])
        return timing.value if timing is not None and timing.count >= WARM_TIMINGS else None

    def predict(self, key: tuple[int, ...], size: int) -> float | None:
        """Seconds for ``key``: its own estimate when it ran before, else interpolated over
        sizes; until it is settled, at most any measured key that differs only by a larger
        last entry. None before any observation."""
        settled = self.settled(key)
        if settled is not None:
            return settled
        group, last = self.exact.get(key[:-1], {}), key[-1]
        own = group[last].value if last in group else self._by_size(size)
        bound = min((t.value for n, t in group.items() if n > last), default=None)
        return own if bound is None else bound if own is None else min(own, bound)

    def _by_size(self, size: int) -> float | None:
        """Interpolated over the measured sizes (module docstring); None before any."""
        sizes = self._sizes
        if not sizes:
            return None
        i = bisect.bisect_left(sizes, size)
        if i == len(sizes):  # past the largest measured size: proportional
            return self.by_size[sizes[-1]].value * size / sizes[-1]
        if i == 0 or sizes[i] == size:  # at or below the smallest: flat
            return self.by_size[sizes[i]].value
        lo, hi = sizes[i - 1], sizes[i]
        w = (size - lo) / (hi - lo)
        return (1 - w) * self.by_size[lo].value + w * self.by_size[hi].value


@dataclass(frozen=True)
class RoundShape:
    """What a round's cost depends on: ``steps`` 0 is a plain round (``tokens`` 1)."""

    batch: int  # B requests
    steps: int = 0  # S draft steps
    topk: int = 1  # K frontier nodes per step
    tokens: int = 1  # T tree tokens per request, lookup and corpus branches included
    pending: int = 0  # W: the longest run of tokens waiting for the draft extend


@dataclass
class CostModel:
    """The four phase costs of ``eyas.engine.costs`` (see the module docstring)."""

    alpha: float = COST_ALPHA
    extend: PhaseCost = field(init=False)
    grow: PhaseCost = field(init=False)
    verify: PhaseCost = field(init=False)
    accept: PhaseCost = field(init=False)

    speed: float = 1.0  # the machine's current slowness: tabled times x speed = seconds

    def __post_init__(self) -> None:
        self.extend, self.grow, self.verify, self.accept = (PhaseCost(self.alpha) for _ in range(4))

    def predict(self, shape: RoundShape) -> float | None:
        """Seconds of a round of ``shape``; None while a phase it needs was never measured."""
        parts = [p.predict(key, size) for p, key, size in self._phases(shape)]
        return None if None in parts else self.speed * sum(parts)  # type: ignore[arg-type]

    def observe(self, shape: RoundShape, seconds: tuple[float, ...]) -> None:
        """Fold in a timed round: ``seconds`` per phase of ``shape`` (extend, grow, verify,
        accept; verify, accept for a plain round); first into ``speed`` when every phase of
        the shape is settled (module docstring), then into the tables in units of it."""
        phases = self._phases(shape)
        if len(phases) != len(seconds):
            raise ValueError(f"{len(seconds)} phase timings for a round of {len(phases)} phases")
        settled = [phase.settled(key) for phase, key, _ in phases]
        if None not in settled and sum(settled) > 0:  # type: ignore[arg-type]
            ratio = sum(seconds) / sum(settled)  # type: ignore[arg-type]
            self.speed = ema(self.speed, min(max(ratio, self.speed / 2), 2 * self.speed),
                             SPEED_ALPHA)
        for (phase, key, size), s in zip(phases, seconds, strict=True):
            phase.observe(key, size, s / self.speed)

    def _phases(self, shape: RoundShape) -> list[tuple[PhaseCost, tuple[int, ...], int]]:
        """(phase, exact key, work size) of each phase a round of ``shape`` runs."""
        B, T = shape.batch, shape.tokens
        tail = [(self.verify, (B, T), B * T), (self.accept, (B, T), B * T)]
        if shape.steps == 0:
            return tail
        S, K, W = shape.steps, shape.topk, max(shape.pending, 1)
        return [(self.extend, (B, W), B * W), (self.grow, (B, K, S), B * K * S), *tail]

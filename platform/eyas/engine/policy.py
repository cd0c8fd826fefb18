"""Adaptive speculation: each decode round runs the setting with the most expected tokens/second.

Verifying a tree costs little more than one token while the target's forward is memory- or
dispatch-bound, and about T tokens once the batch makes it compute-bound; rejected draft tokens
are then paid in full. So the best setting depends on the batch, the machine and the text, and
``AdaptivePolicy.choose`` picks it per round:

- Candidates: plain decoding, chains of depth 1..S' (top-1, D = depth + 1, S' = min(S, D - 1)
  so every candidate fits the configured tree's cache slack), and the configured tree when
  ``eagle_topk > 1``. The lookup and corpus branches ride along on every speculative round.
- Expected tokens of a request per round (``Acceptance``): 1 + the draft tokens it accepts.
  Chains: per-depth conditional acceptance rates a_k (EMAs, per request, initialised from a
  global EMA, which starts at ``PolicyConfig.prior``, a starting value that counts as one
  observation, so the first rounds move it quickly); a chain of depth d accepts
  sum_{j<=d} prod_{k<=j} a_k. The tree: its observed accepted draft tokens (EMA; before any
  tree round, the deepest chain's estimate). Branches: the tokens accepted beyond the EAGLE-3
  path (EMA), added to every speculative setting. A plain round measures nothing, so in
  each one the batch's estimates move ``PolicyConfig.relax`` of the way back to the global
  ones: a request that rejected a few drafts is not left on plain decoding for good (its
  text may have turned predictable again; only a speculative round can tell).
- Round time: ``eyas.engine.costs.CostModel``, measured on this engine (optional warm-up,
  ``Engine.calibrate``, then every timed round). A round verifies T = D + the branch width
  tokens per request; the width is an EMA per batch size, the configured maximum before a
  batch size's first speculative round (a larger batch nearly always has a row with a full
  match, and that row pads the others).
- Exploration: a plain round measures no draft, and a chain of depth d measures depths <= d
  only. The deepest chain and the tree are "probes": a probe that is not the best setting runs
  once the rounds since its last run, times ``explore_budget`` times the best setting's round
  time, cover its regret (its round time minus the time the best setting takes for as many
  tokens). Exploring thus costs at most ``explore_budget`` of the decode time: often when a
  probe is nearly as good (a batch of one), rarely when it is far behind (a full batch whose
  verification is compute-bound); besides, each probe runs at least once every
  ``max_explore_interval`` rounds (so a probe timed in a stalled round is timed again).
  Every setting runs once at the start (deepest first) unless ``Engine.calibrate`` timed them
  already. The other settings are not probed: their acceptance is measured by the deepest
  chain, and their costs are bounded by the probes' until they have their own timings
  (``eyas.engine.costs``), then re-timed only when chosen.

All settings are lossless (every tree is verified by the target), so the choice changes speed,
never the output. Pure numpy: no torch, no engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from eyas.engine.costs import COST_ALPHA, CostModel, RoundShape, ema

BRANCH_ALPHA = 0.1  # EMA weight of a round's branch width (per batch size); before a batch
# size's first speculative round its width is the configured maximum: at a large batch some
# request nearly always has a full lookup match, and the widest row pads them all


@dataclass(frozen=True)
class Setting:
    """One speculation setting with SGLang's S / K / D; ``num_steps`` 0 is plain decoding."""

    num_steps: int
    topk: int = 1
    num_draft_tokens: int = 1

    @property
    def plain(self) -> bool:
        return self.num_steps == 0

    @property
    def chain(self) -> bool:
        return self.topk == 1 and not self.plain

    @property
    def name(self) -> str:
        """"plain", "chain 3/1/4", "tree 5/4/8": the label of records and metrics."""
        if self.plain:
            return "plain"
        kind = "chain" if self.topk == 1 else "tree"
        return f"{kind} {self.num_steps}/{self.topk}/{self.num_draft_tokens}"


PLAIN = Setting(0)


def candidate_settings(num_steps: int, topk: int, num_draft_tokens: int) -> list[Setting]:
    """plain, chains of depth 1..min(S, D - 1), then the configured tree when K > 1 (with K = 1
    the configured setting is the deepest chain, or drafts steps it never keeps)."""
    depth = min(num_steps, num_draft_tokens - 1)
    chains = [Setting(d, 1, d + 1) for d in range(1, depth + 1)]
    tree = [Setting(num_steps, topk, num_draft_tokens)] if topk > 1 else []
    return [PLAIN, *chains, *tree]


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's constants (the defaults serve every config here)."""

    prior: float = 0.7  # conditional acceptance per depth before anything is measured
    alpha_request: float = 0.1  # EMA weight of a request's own new round
    alpha_global: float = 0.02  # EMA weight of a round's batch mean in the global estimate
    # Both are slow on purpose: the policy stops speculating for a request when its estimate
    # drops, so a quick estimate rests right after its last misses, below the true rate.
    # Measured through Serve (SmolLM2 head, one request at a time) with 0.3 / 0.1: the global
    # depth-1 rate sat at 0.1-0.25 while the speculative rounds accepted 0.37 on average, and
    # 58% / 86% of the rounds were plain (two 30 s runs at concurrency 1).
    relax: float = 0.1  # per plain round: share of the way a request's estimates go back to global
    explore_budget: float = 0.01  # the share of decode time exploration may cost (SmolLM2,
    # CPU, 16-32 requests: adaptive was 1-5% slower than plain decoding, nearly all probes)
    max_explore_interval: int = 1000  # rounds: a probe runs at least this often
    cost_alpha: float = COST_ALPHA


class Acceptance:
    """Acceptance estimates per KV slot (one request each) and globally (the last row).

    chain (N + 1, S') conditional acceptance at depths 1..S'; tree (N + 1,) draft tokens
    accepted per tree round (NaN: no tree round yet); branch (N + 1,) tokens the lookup/corpus
    branches add beyond the EAGLE-3 path. A newly admitted request starts from the global row
    and blends its own observations in with weight alpha_request. The global row, fed with
    each round's batch mean, counts its starting value (the prior) as one observation: its
    k-th observation weighs max(alpha_global, 1/(k+1)), so the first rounds move it quickly.
    """

    def __init__(self, num_slots: int, depth: int, cfg: PolicyConfig) -> None:
        self.cfg, self.g = cfg, num_slots  # g: the global row
        self.chain = np.full((num_slots + 1, depth), cfg.prior)
        self.tree = np.full(num_slots + 1, math.nan)
        self.branch = np.zeros(num_slots + 1)
        self.chain_n = np.zeros(depth)  # the global row's observations per depth
        self.tree_n, self.branch_n = np.zeros(1), np.zeros(1)

    @property
    def global_chain(self) -> np.ndarray:
        return self.chain[self.g]

    @property
    def global_tree(self) -> float:
        return float(self.tree[self.g])

    def admit(self, slot: int) -> None:
        g = self.g
        self.chain[slot], self.tree[slot], self.branch[slot] = (
            self.chain[g], self.tree[g], self.branch[g])

    def expected_tokens(self, slots: np.ndarray, settings: list[Setting]) -> list[float]:
        """Tokens the batch ``slots`` (B,) emits per round under each setting."""
        by_depth = np.cumprod(self.chain[slots], axis=1).cumsum(axis=1)  # (B, S') accepted
        tree = self.tree[slots]
        unknown = by_depth[:, -1] if math.isnan(self.global_tree) else self.global_tree
        tree = np.where(np.isnan(tree), unknown, tree)
        batch, branch = float(len(slots)), float(self.branch[slots].sum())
        chains = by_depth.sum(axis=0)  # (S',)
        return [batch if s.plain else batch + branch + float(
            chains[s.num_steps - 1] if s.chain else tree.sum()) for s in settings]

    def observe(self, slots: np.ndarray, setting: Setting, eagle: np.ndarray,
                total: np.ndarray) -> None:
        """A speculative round: ``eagle`` (B,) draft tokens accepted from the EAGLE-3 tree,
        ``total`` (B,) including the branches'. A chain of depth d tried depths
        1..min(eagle + 1, d) and accepted the first ``eagle`` of them."""
        if setting.chain:
            k = np.arange(self.chain.shape[1])[None]  # (1, S')
            tried = k < np.minimum(eagle + 1, setting.num_steps)[:, None]  # (B, S')
            hit = (k < eagle[:, None]).astype(float)
            self._learn(self.chain, self.chain_n, slots, hit, tried)
        else:
            rows = self.tree[slots]
            self.tree[slots] = np.where(np.isnan(rows), eagle, rows)
            if math.isnan(self.global_tree):
                self.tree[self.g] = eagle.mean()
            self._learn(self.tree, self.tree_n, slots, eagle.astype(float))
        self._learn(self.branch, self.branch_n, slots, (total - eagle).astype(float))

    def relax(self, slots: np.ndarray) -> None:
        """A plain round of ``slots`` (B,): their estimates move ``cfg.relax`` of the way back
        to the global row (their own observations age; a plain round adds none)."""
        w, g = self.cfg.relax, self.g
        self.chain[slots] += w * (self.chain[g] - self.chain[slots])
        self.branch[slots] += w * (self.branch[g] - self.branch[slots])
        if not math.isnan(self.global_tree):
            rows = self.tree[slots]
            self.tree[slots] = np.where(np.isnan(rows), rows, rows + w * (self.global_tree - rows))

    def _learn(self, values: np.ndarray, counts: np.ndarray, slots: np.ndarray, new: np.ndarray,
               tried: np.ndarray | None = None) -> None:
        """Blend ``new`` (B, ...) into the rows ``slots`` where ``tried``, and its mean over
        the tried requests into the global row (``counts``: the global row's observations,
        shaped like one row)."""
        tried = np.ones(new.shape, dtype=bool) if tried is None else tried
        w = np.where(tried, self.cfg.alpha_request, 0.0)
        values[slots] = (1 - w) * values[slots] + w * new
        n = tried.sum(axis=0)
        mean = np.where(n > 0, (new * tried).sum(axis=0) / np.maximum(n, 1), 0.0)
        counts += n > 0  # the global row's observations
        w = np.where(n > 0, np.maximum(self.cfg.alpha_global, 1 / (counts + 1)), 0.0)
        g = slice(self.g, self.g + 1)
        values[g] = (1 - w) * values[g] + w * mean


@dataclass(frozen=True)
class Choice:
    """The setting of one round, its round shape and the predicted seconds (None: unmeasured)."""

    setting: Setting
    shape: RoundShape
    predicted_s: float | None


class AdaptivePolicy:
    """Chooses each round's setting; learns from every timed round (module docstring)."""

    def __init__(self, settings: list[Setting], num_slots: int,
                 cfg: PolicyConfig | None = None, max_branch: int = 0) -> None:
        self.cfg = cfg or PolicyConfig()
        self.max_branch = max_branch  # tree tokens the lookup + corpus branches add at most
        self.settings = settings
        depth = max(s.num_steps for s in settings if s.chain)
        self.probes = [s for s in settings if (s.chain and s.num_steps == depth) or
                       not (s.chain or s.plain)]
        self.acceptance = Acceptance(num_slots, depth, self.cfg)
        self.costs = CostModel(self.cfg.cost_alpha)
        self.branch_width: dict[int, float] = {}  # per batch size: EMA of the tree tokens
        # the branches add (the batch's widest branch pads every row, so it grows with B)
        self.since = dict.fromkeys(self.probes, 0)  # rounds since each probe last ran
        self.seen: set[Setting] = set()

    def shape(self, setting: Setting, batch: int, pending: int) -> RoundShape:
        """The expected shape of a round of ``setting`` for ``batch`` requests."""
        if setting.plain:
            return RoundShape(batch)
        width = round(self.branch_width.get(batch, self.max_branch))
        return RoundShape(batch, setting.num_steps, setting.topk,
                          setting.num_draft_tokens + width, pending)

    def choose(self, slots: np.ndarray, pending: int) -> Choice:
        """The setting for a round of the requests in ``slots`` (B,) int; ``pending`` is the
        longest run of tokens waiting for the draft extend."""
        shapes = [self.shape(s, len(slots), pending) for s in self.settings]
        times = [self.costs.predict(sh) for sh in shapes]
        unseen = [i for i, s in enumerate(self.settings) if s not in self.seen]
        pick = unseen[-1] if unseen else self._pick(
            self.acceptance.expected_tokens(slots, self.settings),
            [math.inf if t is None else max(t, 1e-9) for t in times])
        for p in self.since:
            self.since[p] += 1
        return Choice(self.settings[pick], shapes[pick], times[pick])

    def _pick(self, tokens: list[float], times: list[float]) -> int:
        """The setting with the most tokens per second, or the probe whose exploration is due
        (see the module docstring); ``tokens`` and ``times`` per setting."""
        rates = [e / t for e, t in zip(tokens, times, strict=True)]
        best = int(np.argmax(rates))
        budget = self.cfg.explore_budget / len(self.probes) * times[best]
        for probe in sorted(self.probes, key=self.since.__getitem__, reverse=True):
            i = self.settings.index(probe)
            regret = times[i] - tokens[i] / rates[best]
            since = self.since[probe]
            if i != best and (since * budget >= regret or since >= self.cfg.max_explore_interval):
                return i
        return best

    def observe(self, setting: Setting, slots: np.ndarray, shape: RoundShape,
                seconds: tuple[float, ...], eagle: np.ndarray | None = None,
                total: np.ndarray | None = None) -> None:
        """A timed round as it ran (``shape.tokens``: the real tree width; ``seconds`` per
        phase, see ``CostModel.observe``); ``eagle`` / ``total`` (B,) accepted draft tokens
        of a speculative round (``Acceptance.observe``)."""
        self.costs.observe(shape, seconds)
        self.seen.add(setting)
        if setting in self.since:
            self.since[setting] = 0
        if setting.plain:
            self.acceptance.relax(slots)
            return
        if eagle is None or total is None:
            raise ValueError(f"a {setting.name} round needs its accepted token counts")
        self.acceptance.observe(slots, setting, eagle, total)
        B = shape.batch
        self.branch_width[B] = ema(self.branch_width.get(B, self.max_branch),
                                   shape.tokens - setting.num_draft_tokens, BRANCH_ALPHA)

    def forget_acceptance(self, num_slots: int) -> None:
        """Back to the prior acceptance (after a calibration on meaningless prompts)."""
        self.acceptance = Acceptance(num_slots, self.acceptance.chain.shape[1], self.cfg)
        self.branch_width = {}


@dataclass
class SettingRecord:
    """Cheap counters of one setting's rounds."""

    rounds: int = 0
    measured_s: float = 0.0  # every round
    predicted_rounds: int = 0  # rounds the cost model predicted
    predicted_s: float = 0.0
    compared_s: float = 0.0  # measured seconds of the predicted rounds
    abs_error_s: float = 0.0  # sum of |predicted - measured| over them

    def summary(self, total_rounds: int) -> dict[str, float | int | None]:
        """Share of rounds; mean predicted and measured round time (ms) and the mean |error|
        relative to the measured time (%), over the predicted rounds (measured: over all
        rounds when none was predicted, as in fixed mode)."""
        pr = self.predicted_rounds
        measured = (self.compared_s / pr if pr else
                    self.measured_s / self.rounds if self.rounds else None)
        return {"rounds": self.rounds, "share": self.rounds / total_rounds if total_rounds else 0.0,
                "predicted_ms": 1e3 * self.predicted_s / pr if pr else None,
                "measured_ms": None if measured is None else 1e3 * measured,
                "error_pct": 100 * self.abs_error_s / self.compared_s if self.compared_s else None}


@dataclass
class RoundRecords:
    """Decode rounds per setting name (engine-thread writes; readers take ``snapshot``)."""

    by_setting: dict[str, SettingRecord] = field(default_factory=dict)

    def add(self, name: str, predicted_s: float | None, measured_s: float) -> None:
        rec = self.by_setting.get(name)
        if rec is None:
            rec = self.by_setting[name] = SettingRecord()
        rec.rounds += 1
        rec.measured_s += measured_s
        if predicted_s is not None:
            rec.predicted_rounds += 1
            rec.predicted_s += predicted_s
            rec.compared_s += measured_s
            rec.abs_error_s += abs(predicted_s - measured_s)

    def reset(self) -> None:
        self.by_setting = {}

    def snapshot(self) -> dict[str, dict[str, float | int | None]]:
        """Per setting name: ``SettingRecord.summary``."""
        recs = self.by_setting.copy()  # one C-level copy: safe against the engine thread
        total = sum(r.rounds for r in recs.values())
        return {name: rec.summary(total) for name, rec in sorted(recs.items())}

    def overall(self) -> dict[str, float | int | None]:
        """``SettingRecord.summary`` over every round."""
        recs = list(self.by_setting.copy().values())
        sums = SettingRecord(*(sum(getattr(r, f) for r in recs)
                               for f in SettingRecord.__dataclass_fields__))
        return sums.summary(sums.rounds)

"""EAGLE-3 tree speculation: tree masks, selection, acceptance rules, losslessness, parity.

Test doubles of the draft interface (``OracleDraft``, ``ConstantDraft``) are named as such;
they implement the ``Eagle3Draft`` methods the engine calls and nothing else. The engine tests
run in both speculation modes (``mode``: the configured tree every round, or the adaptive
choice per round, ``eyas.engine.policy``).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from eyas.engine.accept import accept_greedy, accept_sampled
from eyas.engine.engine import MAX_CATCH_UP, Engine, SamplingParams, SpecConfig
from eyas.engine.kv_cache import KVCache, cache_attention_mask
from eyas.engine.model import Transformer
from eyas.engine.sampling import sample_from_probs
from eyas.engine.tree import select_tree, tree_attention_mask, tree_depths, validate_tree_knobs

PROMPTS = [[1, 403, 407, 261, 378], [1, 22, 33], [1, 403, 407, 261, 378, 10, 300, 42, 99, 7]]


# ----------------------------------------------------------------------------- test doubles


def stub_kv(position_ids: Tensor, past_kv) -> tuple[Tensor, Tensor]:
    """A 1-wide dummy KV cache grown by the new positions, as the engine expects from a draft."""
    k = torch.zeros(*position_ids.shape[:1], 1, position_ids.shape[1], 1)
    if past_kv is not None:
        k = torch.cat([past_kv[0], k], dim=2)
    return k, k.clone()


class OracleDraft(nn.Module):
    """TEST DOUBLE that cheats: it knows the target's greedy continuation ``sequence`` and
    proposes it by position (draft output at position t predicts token t+2). Single request."""

    def __init__(self, sequence: list[int], vocab: int) -> None:
        super().__init__()
        self.sequence, self.vocab = sequence, vocab
        self.register_buffer("d2t", torch.zeros(vocab, dtype=torch.long))

    def fuse(self, aux: Tensor) -> Tensor:
        return aux[..., :1]

    def forward(self, input_embeds, hidden, position_ids, attn_bias=None, past_kv=None):
        return position_ids[..., None].float(), stub_kv(position_ids, past_kv)  # out encodes the position

    def logits(self, out: Tensor) -> Tensor:
        pos = (out[..., 0].round().long() + 2).clamp(max=len(self.sequence) - 1)
        want = torch.tensor(self.sequence)[pos]
        return torch.nn.functional.one_hot(want, self.vocab).float() * 20.0

    def draft_to_target(self, ids: Tensor) -> Tensor:
        return ids


class ConstantDraft(nn.Module):
    """TEST DOUBLE proposing the same ranked tokens at every node, whatever the context."""

    def __init__(self, vocab: int, preferred: list[int]) -> None:
        super().__init__()
        fixed = torch.full((vocab,), -10.0)
        fixed[torch.tensor(preferred)] = torch.linspace(5.0, 1.0, len(preferred))
        self.register_buffer("fixed", fixed)
        self.register_buffer("d2t", torch.zeros(vocab, dtype=torch.long))

    def fuse(self, aux: Tensor) -> Tensor:
        return aux[..., :1]

    def forward(self, input_embeds, hidden, position_ids, attn_bias=None, past_kv=None):
        return hidden, stub_kv(position_ids, past_kv)

    def logits(self, out: Tensor) -> Tensor:
        return self.fixed.expand(*out.shape[:-1], -1)

    def draft_to_target(self, ids: Tensor) -> Tensor:
        return ids


class TickClock:
    """TEST DOUBLE of ``Engine.clock``: each reading is 1 ms after the previous one, so every
    phase of a round takes 1 ms (plain rounds 2 ms, speculative ones 4 ms) and the adaptive
    choice follows acceptance alone: on a shared test machine the real timer's noise would make
    it random. (The policy tests time a synthetic machine; bench/decode_speed.py a real one.)"""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1e-3
        return self.now


def ticking(engine: Engine) -> Engine:
    """``engine``, timed by a ``TickClock`` when it is adaptive."""
    if engine.policy is not None:
        engine.clock = TickClock()
    return engine


def random_draft(stories260k: Path):
    from eyas.draft.model import DraftConfig, Eagle3Draft

    torch.manual_seed(0)
    cfg = json.loads((stories260k / "config.json").read_text())
    return Eagle3Draft(DraftConfig.from_target_config(cfg, 512, aux_layer_ids=[0, 2, 3]))


# ----------------------------------------------------------------------------- tree helpers

#        0
#      /   \
#     1     2
#    / \     \
#   3   4     5
PARENTS = torch.tensor([[-1, 0, 0, 1, 1, 2]])


def test_tree_attention_mask_hand_computed():
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(tree_attention_mask(PARENTS)[0], expected)
    assert tree_depths(PARENTS).tolist() == [[0, 1, 1, 2, 2, 2]]
    chain = torch.tensor([[-1, 0, 1, 2]])
    assert torch.equal(tree_attention_mask(chain)[0], torch.ones(4, 4, dtype=torch.bool).tril())


def test_cache_mask_puts_tree_after_each_prefix():
    local = tree_attention_mask(torch.tensor([[-1, 0, 0], [-1, 0, 1]]))
    mask = cache_attention_mask(torch.tensor([2, 0]), local, 5)
    assert mask[0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]]
    assert mask[1].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]


def test_select_tree_keeps_best_paths_and_ancestors():
    # candidates: a(-0.1) b(-2.0) | a's children c(-0.1: tie with a) d(-0.5) | b's child e
    tokens = torch.tensor([[10, 11, 12, 13, 14]])
    parents = torch.tensor([[-1, -1, 0, 0, 1]])
    scores = torch.tensor([[-0.1, -2.0, -0.1, -0.5, -2.5]])
    tree = select_tree(torch.tensor([7]), tokens, parents, scores, num_draft_tokens=4)
    assert tree.tokens.tolist() == [[7, 10, 12, 13]]
    assert tree.parents.tolist() == [[-1, 0, 1, 1]]


def test_tree_knobs_are_checked():
    validate_tree_knobs(5, 4, 8)
    validate_tree_knobs(3, 1, 4)
    with pytest.raises(ValueError, match="num_draft_tokens=6"):
        validate_tree_knobs(3, 1, 6)


def test_compact_moves_accepted_entries():
    cache = KVCache(2, 2, 12, 1, 1)
    slot = cache.allocate()
    cache.lengths[slot] = 3
    cache.k[:, slot, :, 0, 0] = torch.arange(12.0)
    cache.compact(torch.tensor([slot]), torch.tensor([[0, 2, 5, 5]]), torch.tensor([3]))
    assert cache.lengths[slot] == 6
    assert cache.k[1, slot, :6, 0, 0].tolist() == [0, 1, 2, 3, 5, 8]


# ----------------------------------------------------------------------------- acceptance


def test_accept_greedy_walks_matching_children():
    tokens = torch.tensor([[5, 6, 7, 8, 9, 4]])
    argmax = torch.tensor([[7, 0, 4, 0, 0, 3]])  # root wants 7 (node 2), node 2 wants 4 (node 5)
    path, kept, bonus = accept_greedy(tokens, PARENTS, argmax)
    assert kept.tolist() == [3] and path[0, :3].tolist() == [0, 2, 5] and bonus.tolist() == [3]
    path, kept, bonus = accept_greedy(tokens, PARENTS, torch.tensor([[1, 0, 0, 0, 0, 0]]))
    assert kept.tolist() == [1] and bonus.tolist() == [1]


def test_accept_sampled_with_one_hot_equals_greedy():
    g = torch.Generator().manual_seed(0)
    B, D, V = 64, 6, 5
    tokens = torch.randint(0, V, (B, D), generator=g)
    tokens[:, 1:3] = torch.tensor([0, 1])  # siblings under the root must differ
    argmax = torch.randint(0, V, (B, D), generator=g)
    probs = torch.nn.functional.one_hot(argmax, V).float()
    parents = torch.tensor([[-1, 0, 0, 1, 2, 3]]).expand(B, D)
    got = accept_sampled(tokens, parents, probs, torch.rand(B, D + 1, generator=g))
    want = accept_greedy(tokens, parents, argmax)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert torch.equal(a, b)


# A toy Markov target over V tokens, a deterministic top-K tree drafted from another matrix.
V, L, N_SAMPLES = 4, 3, 40000
TOY_PARENTS = torch.tensor([-1, 0, 0, 1])  # root, its two best children, the best grandchild
CHI2_LIMIT = 114.0  # chi-square 99.99% quantile for 63 degrees of freedom


def toy_tree(Q: Tensor, last: Tensor) -> Tensor:
    top2 = Q[last].topk(2, -1).indices
    return torch.stack([last, top2[:, 0], top2[:, 1], Q[top2[:, 0]].argmax(-1)], dim=1)


def accept_naive(tokens, parents, probs, q_probs, uniforms):
    """The WRONG rule for deterministic drafts: standard speculative sampling, accept with
    min(1, p/q), on rejection continue with norm(max(0, p - q))."""
    B, D = tokens.shape
    rows = torch.arange(B)
    cur, active = torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.bool)
    residual, path = probs[:, 0].clone(), [torch.zeros(B, dtype=torch.long)]
    for _ in range(D - 1):
        moved = torch.zeros_like(active)
        for c in range(1, D):
            tok = tokens[:, c : c + 1]
            trial = active & ~moved & (parents[:, c] == cur)
            p, q = residual / residual.sum(1, keepdim=True), q_probs[rows, cur]
            ratio = (p.gather(1, tok) / q.gather(1, tok)).squeeze(1).clamp(max=1)
            accept = trial & (uniforms[:, c] < ratio)
            residual = torch.where((trial & ~accept)[:, None], (p - q).clamp(min=0), residual)
            cur = torch.where(accept, c, cur)
            moved |= accept
        residual = torch.where(moved[:, None], probs[rows, cur], residual)
        active &= moved
        path.append(cur)
    path_t = torch.stack(path, 1)
    kept = 1 + (path_t[:, 1:] != path_t[:, :-1]).sum(1)
    return path_t, kept, sample_from_probs(residual, uniforms[:, D])


def simulate_toy(M: Tensor, Q: Tensor, naive: bool, seed: int) -> Tensor:
    """Frequencies (V**L,) of the first L tokens over N_SAMPLES speculative generations."""
    g = torch.Generator().manual_seed(seed)
    D = len(TOY_PARENTS)
    out = torch.zeros(N_SAMPLES, L + D, dtype=torch.long)
    n = torch.zeros(N_SAMPLES, dtype=torch.long)
    last, parents = torch.zeros(N_SAMPLES, dtype=torch.long), TOY_PARENTS.expand(N_SAMPLES, D)
    while n.min() < L:
        tokens = toy_tree(Q, last)
        u = torch.rand(N_SAMPLES, D + 1, generator=g)
        if naive:
            path, kept, bonus = accept_naive(tokens, parents, M[tokens], Q[tokens], u)
        else:
            path, kept, bonus = accept_sampled(tokens, parents, M[tokens], u)
        emitted = torch.cat([tokens.gather(1, path[:, 1:]), bonus[:, None]], 1)  # (N, D)
        emitted.scatter_(1, (kept - 1)[:, None], bonus[:, None])
        j = torch.arange(D)[None]
        rows, cols = ((j < kept[:, None]) & (n[:, None] + j < out.shape[1])).nonzero(as_tuple=True)
        out[rows, n[rows] + cols] = emitted[rows, cols]
        n, last = n + kept, bonus
    index = (out[:, :L] * torch.tensor([V * V, V, 1])).sum(1)
    return torch.bincount(index, minlength=V**L).float()


@pytest.mark.parametrize("seed", [0, 1])
def test_sampled_acceptance_is_lossless_monte_carlo(seed: int):
    """Chi-square of L-token sequence counts against the exact Markov probabilities."""
    g = torch.Generator().manual_seed(seed)
    M = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)  # target p(next | prev)
    Q = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)  # draft q(next | prev)
    exact = torch.tensor([float(M[0, a] * M[a, b] * M[b, c])
                          for a, b, c in itertools.product(range(V), repeat=L)]) * N_SAMPLES
    chi2 = ((simulate_toy(M, Q, naive=False, seed=100 + seed) - exact) ** 2 / exact).sum()
    assert chi2 < CHI2_LIMIT, f"lossless rule: chi2={chi2:.1f}"
    chi2_naive = ((simulate_toy(M, Q, naive=True, seed=100 + seed) - exact) ** 2 / exact).sum()
    assert chi2_naive > 10 * CHI2_LIMIT, f"the naive rule should fail: chi2={chi2_naive:.1f}"


# ----------------------------------------------------------------------------- target + tree


def causal_from_zero(T: int) -> Tensor:
    """(1, T, T) causal mask for T tokens written at positions 0..T-1 of an empty slot."""
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None]
    return cache_attention_mask(torch.tensor([0]), causal, T)


def test_tree_verification_equals_sequential_paths(stories260k: Path):
    """Logits at every tree node == logits of its root-to-node path decoded causally."""
    model = Transformer.from_pretrained(stories260k)
    prompt, tree_tokens = PROMPTS[0], [261, 10, 300, 42, 99, 7]
    P, D = len(prompt), len(tree_tokens)
    cache = model.new_cache(1, P + D)
    slots = torch.tensor([0])
    pos = torch.arange(P)[None]
    with torch.no_grad():
        model(torch.tensor([prompt]), pos, cache, slots, pos, causal_from_zero(P))
        mask = cache_attention_mask(torch.tensor([P]), tree_attention_mask(PARENTS), P + D)
        logits, _ = model(torch.tensor([tree_tokens]), P + tree_depths(PARENTS), cache, slots,
                          P + torch.arange(D)[None], mask)
        ref = Transformer.from_pretrained(stories260k)
        for node, path in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5]]):
            seq = prompt + [tree_tokens[i] for i in path]
            T = len(seq)
            want, _ = ref(torch.tensor([seq]), torch.arange(T)[None], ref.new_cache(1, T), slots,
                          torch.arange(T)[None], causal_from_zero(T))
            torch.testing.assert_close(logits[0, node], want[0, -1], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- engine parity


@pytest.fixture(params=["fixed", "adaptive"])
def mode(request) -> str:
    """SpecConfig.mode of the engine tests."""
    return request.param


@pytest.fixture(scope="module")
def plain_greedy(stories260k: Path):
    engine = Engine(str(stories260k))
    return engine.generate(PROMPTS, SamplingParams(max_tokens=48))


@pytest.mark.parametrize("steps,topk,draft_tokens,ngram", [(3, 1, 4, 0), (5, 1, 6, 0), (5, 4, 8, 0),
                                                          (3, 1, 4, 4), (5, 4, 8, 3)])
def test_greedy_speculative_equals_plain_random_head(stories260k, plain_greedy, steps, topk,
                                                     draft_tokens, ngram, mode):
    spec = SpecConfig(num_steps=steps, eagle_topk=topk, num_draft_tokens=draft_tokens,
                      ngram_tokens=ngram, mode=mode)
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=48))
    for want, got in zip(plain_greedy, outs, strict=True):
        assert got.token_ids == want.token_ids
        assert got.stats.verify_steps >= 1
        assert got.stats.acceptance_length >= 1.0


@pytest.mark.parametrize("steps,topk,draft_tokens", [(3, 1, 4), (5, 4, 8)])
def test_oracle_draft_is_accepted_and_exact(stories260k, plain_greedy, steps, topk, draft_tokens,
                                            mode):
    want = plain_greedy[0]
    oracle = OracleDraft(PROMPTS[0] + want.token_ids, vocab=512)
    spec = SpecConfig(num_steps=steps, eagle_topk=topk, num_draft_tokens=draft_tokens, mode=mode)
    engine = ticking(Engine(str(stories260k), spec=spec, draft=oracle))
    got = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=48))[0]
    assert got.token_ids == want.token_ids
    # nearly every draft accepted (adaptive: after one round of each setting, shallow ones too)
    assert got.stats.acceptance_length > (steps if mode == "fixed" else steps - 1)
    stats = got.stats
    assert stats.decoded_tokens == got.completion_tokens - 1  # all but the prefill token
    # every round emits its accepted drafts + a bonus, except a last round cut at max_tokens
    assert stats.decoded_tokens - stats.verify_steps <= stats.accepted_tokens
    assert stats.accepted_tokens <= stats.decoded_tokens - stats.verify_steps + 1


@pytest.mark.parametrize("ngram", [0, 4])
def test_plain_rounds_above_the_batch_limit_stay_exact(stories260k, plain_greedy, ngram, mode):
    """Three requests decode plainly while all run (limit 2) and speculate once the shortest
    has finished: the same greedy output token for token, and both kinds of rounds ran
    (adaptive: the limit caps it; the random head's drafts then rarely pay)."""
    spec = SpecConfig(num_steps=3, eagle_topk=1, num_draft_tokens=4, ngram_tokens=ngram,
                      max_speculative_batch=2, mode=mode)
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k))
    lengths = [48, 16, 48]
    engine.record_phases = True
    outs = engine.generate(PROMPTS, [SamplingParams(max_tokens=n) for n in lengths])
    for want, got, n in zip(plain_greedy, outs, lengths, strict=True):
        assert got.token_ids == want.token_ids[:n]
    assert engine.phase_rounds["decode"] >= 10
    assert engine.phase_rounds["verify"] >= (10 if mode == "fixed" else 1)
    if mode == "adaptive":
        assert engine.round_records.by_setting["plain"].rounds >= 16  # all 3 running: capped


def test_plain_rounds_keep_only_the_last_tokens_for_the_draft_catch_up(stories260k, plain_greedy):
    """40 plain rounds (three requests over a limit of 2), then speculation: each request's
    pending draft inputs never exceed MAX_CATCH_UP (they reach it: the oldest are dropped),
    and the output is still the plain greedy output."""
    spec = SpecConfig(num_steps=3, eagle_topk=1, num_draft_tokens=4, max_speculative_batch=2)
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k))
    lengths = [48, 40, 48]
    for i, (prompt, n) in enumerate(zip(PROMPTS, lengths, strict=True)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=n))
    outs, longest = {}, []
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
        longest.append(max((len(r.pending_ids) for r in engine._running), default=0))
    assert max(longest) == MAX_CATCH_UP
    for i, n in enumerate(lengths):
        assert outs[str(i)].token_ids == plain_greedy[i].token_ids[:n]


def test_lookup_branch_is_verified_with_the_tree(stories260k, plain_greedy, mode):
    """A draft that is never right: every accepted token comes from the n-gram branch. The third
    prompt's greedy continuation repeats itself, so the lookup pays there."""
    accepted = {}
    for ngram in (0, 4):
        spec = SpecConfig(num_steps=3, eagle_topk=1, num_draft_tokens=4, ngram_tokens=ngram,
                          mode=mode)
        engine = Engine(str(stories260k), spec=spec, draft=ConstantDraft(512, [3, 5, 7]))
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=48))
        assert [o.token_ids for o in outs] == [w.token_ids for w in plain_greedy]
        accepted[ngram] = [o.stats.accepted_tokens for o in outs]
    assert accepted[0] == [0, 0, 0]
    if mode == "fixed":  # adaptive: after the first rounds showed no gain, plain rounds win
        assert accepted[4][2] >= 10


@pytest.mark.parametrize("ngram", [0, 4])
def test_corpus_branch_is_verified_with_the_tree(stories260k, plain_greedy, tmp_path, ngram, mode):
    """A draft that is never right, and a store of the plain greedy replies themselves: the
    corpus branch (alone or beside the lookup branch) carries nearly every token, exactly."""
    from eyas.engine.ngram_store import STORE_FILE, NgramStore

    corpus = [p + o.token_ids for p, o in zip(PROMPTS, plain_greedy, strict=True)]
    NgramStore.build(corpus, min_n=2, max_n=8).save(str(tmp_path / STORE_FILE))
    spec = SpecConfig(str(tmp_path), num_steps=3, eagle_topk=1, num_draft_tokens=4, ngram_tokens=ngram,
                      corpus_tokens=4, mode=mode)
    engine = ticking(Engine(str(stories260k), spec=spec, draft=ConstantDraft(512, [3, 5, 7])))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=48))
    assert [o.token_ids for o in outs] == [w.token_ids for w in plain_greedy]
    assert all(o.stats.acceptance_length > 3.0 for o in outs), [o.stats.acceptance_length for o in outs]


def test_corpus_branch_without_a_store_is_a_clear_error(stories260k, tmp_path):
    spec = SpecConfig(str(tmp_path), corpus_tokens=4)
    with pytest.raises(ValueError, match="speculative.corpus_tokens=4 needs .*ngram_store.npz"):
        Engine(str(stories260k), spec=spec, draft=random_draft(stories260k))


@pytest.mark.parametrize("ngram,limit", [(0, None), (3, None), (3, 32)])
def test_engine_sampling_follows_target_monte_carlo(stories260k: Path, ngram: int, limit: int | None,
                                                    mode: str):
    """Speculative sampling (tree 3/4/8 [+ lookup], temperature 1, top-k 3) emits the target's law over
    3-token continuations: chi-square over bins with expected count >= 5 (rarer ones pooled),
    limit = the 99.99% quantile for the bins' degrees of freedom (<= 26)."""
    model = Transformer.from_pretrained(stories260k)
    # with the lookup branch, the prompt repeats 403 407 so the branch proposes 261 378 403
    prompt, n_samples, top_k = PROMPTS[0] + ([403, 407] if ngram else []), 2000, 3
    exact, mass = target_law(model, prompt, length=3, top_k=top_k)
    draft = ConstantDraft(512, sorted(mass, key=mass.__getitem__, reverse=True))
    spec = SpecConfig(num_steps=3, eagle_topk=4, num_draft_tokens=8, ngram_tokens=ngram,
                      max_speculative_batch=limit, mode=mode)  # 32: full batches of 64 decode plainly
    engine = ticking(Engine(str(stories260k), spec=spec, draft=draft, max_batch_size=64))
    engine.record_phases = True
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=top_k, seed=i)
              for i in range(n_samples)]
    outs = engine.generate([prompt] * n_samples, params)
    counts = Counter(tuple(o.token_ids) for o in outs)
    assert set(counts) <= set(exact)
    tau = sum(o.stats.acceptance_length for o in outs) / n_samples
    assert tau > (1.3 if mode == "fixed" and not limit else 1.0)  # drafts do get accepted
    if mode == "adaptive" and not limit:  # mostly plain at 64 requests, but not only
        assert len(engine.round_records.by_setting) >= 3
    if limit:
        assert engine.phase_rounds["decode"] > 0 and engine.phase_rounds["verify"] > 0
    big = [k for k, p in exact.items() if p * n_samples >= 5]
    obs = [counts[k] for k in big] + [n_samples - sum(counts[k] for k in big)]
    exp = [exact[k] * n_samples for k in big] + [n_samples * (1 - sum(exact[k] for k in big))]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True) if e > 0)
    assert chi2 < 63.0, f"chi2={chi2:.1f} over {len(obs)} bins"  # 99.99% quantile, 26 dof


def target_law(model: Transformer, prompt: list[int], length: int, top_k: int
               ) -> tuple[dict[tuple[int, ...], float], dict[int, float]]:
    """Exact probabilities of every top-k continuation of ``length`` tokens (temperature 1)
    and the total probability mass each token receives along the way."""
    exact: dict[tuple[int, ...], float] = {}
    mass: dict[int, float] = {}

    def next_top(seq: list[int]) -> tuple[list[int], list[float]]:
        T = len(seq)
        cache, pos = model.new_cache(1, T), torch.arange(T)[None]
        mask = causal_from_zero(T)
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq]), pos, cache, torch.tensor([0]), pos, mask)
        vals, ids = logits[0, -1].topk(top_k)
        return ids.tolist(), vals.softmax(-1).tolist()

    def walk(seq: list[int], p: float) -> None:
        if len(seq) - len(prompt) == length:
            exact[tuple(seq[len(prompt):])] = p
            return
        for tok, q in zip(*next_top(seq), strict=True):
            mass[tok] = mass.get(tok, 0.0) + p * q
            walk(seq + [tok], p * q)

    walk(list(prompt), 1.0)
    return exact, mass


def test_seeded_sampling_is_reproducible(stories260k: Path, plain_greedy, mode):
    spec = SpecConfig(num_steps=3, eagle_topk=2, num_draft_tokens=5, mode=mode)
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k))
    params = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=123)
    a = engine.generate([PROMPTS[1]], params)[0].token_ids
    b = engine.generate([PROMPTS[1], PROMPTS[0]], [params, SamplingParams(max_tokens=5)])
    assert a == b[0].token_ids
    assert b[1].token_ids == plain_greedy[0].token_ids[:5]  # greedy row of a mixed batch


@pytest.mark.parametrize("steps,topk,draft_tokens", [(3, 1, 4), (5, 4, 8)])
def test_seeded_sampling_equals_plain_sampling(stories260k: Path, mode, steps, topk, draft_tokens):
    """Each output token is drawn with the request's uniform for its position, whichever round
    (and setting) produced it: seeded speculative sampling reproduces seeded plain sampling token
    for token, with drafts accepted (the oracle proposes that very output)."""
    params = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=7)
    want = Engine(str(stories260k)).generate([PROMPTS[0]], params)[0]
    oracle = OracleDraft(PROMPTS[0] + want.token_ids, vocab=512)
    spec = SpecConfig(num_steps=steps, eagle_topk=topk, num_draft_tokens=draft_tokens, mode=mode)
    engine = ticking(Engine(str(stories260k), spec=spec, draft=oracle))
    got = engine.generate([PROMPTS[0]], params)[0]
    assert got.token_ids == want.token_ids
    assert got.stats.acceptance_length > 2.0


# ----------------------------------------------------------------------------- adaptive mode


def test_adaptive_mode_follows_the_draft(stories260k, plain_greedy):
    """A draft that is always right makes deep speculative rounds win; one that is never right
    makes plain rounds win (after one round of every setting); the output is exact either way."""
    want = plain_greedy[0]
    spec = SpecConfig(num_steps=5, eagle_topk=4, num_draft_tokens=8, mode="adaptive")
    right = ticking(Engine(str(stories260k), spec=spec,
                           draft=OracleDraft(PROMPTS[0] + want.token_ids, 512)))
    wrong = ticking(Engine(str(stories260k), spec=spec, draft=ConstantDraft(512, [3, 5, 7])))
    for engine in (right, wrong):
        assert engine.generate([PROMPTS[0]], SamplingParams(max_tokens=48))[0].token_ids == \
            want.token_ids
    shares = {name: s["share"] for name, s in right.round_records.snapshot().items()}
    assert set(shares) == {"plain", "tree 5/4/8"} | {f"chain {d}/1/{d + 1}" for d in range(1, 6)}
    assert 1 - shares["plain"] - shares["chain 1/1/2"] - shares["chain 2/1/3"] > 0.6
    assert wrong.round_records.snapshot()["plain"]["share"] > 0.6
    prior = right.policy.cfg.prior
    assert right.policy.acceptance.global_chain.min() > prior
    assert wrong.policy.acceptance.global_chain[0] < prior
    assert right.policy.acceptance.global_tree > 4  # of 5 draft tokens


def test_calibration_times_every_setting_then_forgets_it(stories260k, plain_greedy):
    spec = SpecConfig(num_steps=3, eagle_topk=2, num_draft_tokens=5, mode="adaptive",
                      calibrate=True)
    engine = Engine(str(stories260k), spec=spec, draft=random_draft(stories260k), max_batch_size=4)
    policy = engine.policy
    assert policy.seen == set(policy.settings)  # no cold-start round needed
    assert {k[0] for k in policy.costs.verify.exact} == {1, 4}  # batch sizes 1 and 4 = 4 // 4
    assert not engine.has_unfinished() and engine.num_free_slots == 4
    assert engine.round_records.by_setting == {} and engine.totals.verify_steps == 0
    assert (policy.acceptance.global_chain == policy.cfg.prior).all()
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=48))
    assert [o.token_ids for o in outs] == [w.token_ids for w in plain_greedy]
    assert all(s["predicted_ms"] is not None
               for s in engine.round_records.snapshot().values())  # every round predicted


def test_mode_is_checked_and_calibration_needs_adaptive(stories260k):
    with pytest.raises(ValueError, match="mode='tuned'"):
        SpecConfig(mode="tuned")
    with pytest.raises(ValueError, match="calibrate=True .* mode='adaptive'"):
        SpecConfig(calibrate=True)
    engine = Engine(str(stories260k), spec=SpecConfig(), draft=random_draft(stories260k))
    with pytest.raises(ValueError, match="mode='adaptive'"):
        engine.calibrate()

"""The eyas engine: continuous batching over a slot KV cache, optionally with EAGLE-3 trees.

``Engine.step()`` does one unit of work for every request in flight: it prefills newly
admitted requests (one forward each, emitting their first token), then runs ONE batched
decode round for the requests already running: a plain one-token decode, or a speculative
round (draft extend -> tree growth [+ an n-gram lookup branch] -> one target forward over
all trees -> per-request acceptance -> cache compaction). Requests join and leave between steps. ``step`` is
synchronous and thread-safe; a serving layer calls it in a loop. Which round runs: the
configured tree (``SpecConfig.mode="fixed"``, plain above ``max_speculative_batch``), or the
setting of ``eyas.engine.policy`` for the batch at hand (``"adaptive"``); either way the
rounds are counted per setting in ``Engine.round_records``.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from eyas.engine.accept import accept_greedy, accept_sampled, accepted_counts
from eyas.engine.costs import RoundShape
from eyas.engine.kv_cache import KVCache, cache_attention_mask
from eyas.engine.lookup import add_chains, ngram_lookup
from eyas.engine.model import Transformer
from eyas.engine.policy import PLAIN, AdaptivePolicy, RoundRecords, Setting, candidate_settings
from eyas.engine.sampling import (
    SamplingParams,
    UniformStream,
    draw_uniforms,
    make_generator,
    probs_from_logits,
    sample_from_probs,
    truncate_at_stop,
)
from eyas.engine.spec import SpecConfig, load_store
from eyas.engine.tree import (
    DraftHead,
    DraftTree,
    draft_extend,
    grow_tree,
    tree_attention_mask,
    tree_depths,
    validate_tree_knobs,
)

__all__ = ["Engine", "RequestOutput", "RequestStats", "SamplingParams", "SpecConfig"]

MAX_CATCH_UP = 8  # plain-decoded tokens a request keeps for its next draft extend: the draft
# catches up on the most recent ones only (its cache skips the older ones). Measured on the
# SmolLM2 head, 8 requests, 20 plain rounds before each chain 3/1/4 round: 0.50 accepted
# drafts per request and round with a full catch-up, with the last 16, with the last 4; the
# draft phase 12.6 -> 9.4 -> 8.8 ms. So a probe after a long plain stretch costs what any
# round costs, and a request's pending features stay a few KB.


@dataclass
class RequestStats:
    """Per-request decoding counters (prefill's first token is not a verification step)."""

    verify_steps: int = 0  # target forwards after prefill (decode steps or tree verifications)
    accepted_tokens: int = 0  # draft tokens accepted and emitted
    decoded_tokens: int = 0  # tokens emitted by those forwards (accepted + bonus)

    @property
    def acceptance_length(self) -> float:
        """Tokens emitted per verification step (1.0 for plain decoding)."""
        return self.decoded_tokens / self.verify_steps if self.verify_steps else 0.0


@dataclass
class RequestOutput:
    """What one step produced for one request (``token_ids``: the whole completion so far)."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | None
    stop_reason: int | str | None  # the stop token id or stop string that ended it
    stats: RequestStats
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    uniforms: UniformStream | None  # None: greedy
    slot: int = -1
    output: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    # Draft extend inputs for the next round: tokens t+1 and target aux features at t.
    pending_ids: Tensor | None = None  # (n,) int64, n <= MAX_CATCH_UP after plain rounds
    pending_aux: Tensor | None = None  # (n, 3Ht)

    @property
    def root(self) -> int:
        """The last emitted token: not yet in the target cache."""
        return self.output[-1]


class Engine:
    """A small LLM engine over a Llama-family target, with optional EAGLE-3 speculation."""

    def __init__(self, model_dir: str, spec: SpecConfig | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_batch_size: int = 16,
                 max_seq_len: int | None = None, draft: DraftHead | None = None,
                 tokenizer: object | None = None) -> None:
        self.model_dir, self.device, self.dtype = Path(model_dir), torch.device(device), dtype
        if draft is None and spec is not None:
            if spec.draft_dir is None:
                raise ValueError("SpecConfig.draft_dir is None and no draft module was given: "
                                 "point draft_dir at an exported EAGLE-3 draft directory")
            from eyas.draft.model import Eagle3Draft

            draft = Eagle3Draft.from_pretrained(spec.draft_dir)
        self.spec = spec or (SpecConfig() if draft is not None else None)
        self.store = load_store(self.spec) if self.spec and self.spec.corpus_tokens else None
        if self.spec is not None:
            validate_tree_knobs(self.spec.num_steps, self.spec.eagle_topk,
                                self.spec.num_draft_tokens)
            self.configured = Setting(self.spec.num_steps, self.spec.eagle_topk,
                                      self.spec.num_draft_tokens)
        aux_ids = getattr(getattr(draft, "config", None), "aux_layer_ids", None)
        self.model = Transformer.from_pretrained(model_dir, dtype, device, aux_ids)
        cfg = self.model.config
        _check_draft_fits(draft, cfg.hidden_size, cfg.vocab_size)
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        slack = self.spec.max_tree_nodes if self.spec else 1
        self.cache = self.model.new_cache(max_batch_size, self.max_seq_len + slack)
        self.draft = draft.to(device=device, dtype=dtype).eval() if draft is not None else None
        self.draft_cache = self._new_draft_cache(max_batch_size, self.max_seq_len + slack)
        self.eos_ids = list(cfg.eos_token_ids)
        self._tokenizer = tokenizer
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._finished_out: list[RequestOutput] = []
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self.totals = RequestStats()
        self.phase_seconds: Counter[str] = Counter()  # filled when record_phases is True
        self.phase_rounds: Counter[str] = Counter()
        self.record_phases = False
        self.clock: Callable[[], float] = time.perf_counter  # times the rounds
        self.round_records = RoundRecords()  # decode rounds per setting
        self.policy = self._new_policy(max_batch_size)
        self._forced: Setting | None = None  # set by calibrate()
        if self.policy is not None and self.spec.calibrate:
            self.calibrate()

    # ------------------------------------------------------------------ public API

    def add_request(self, request_id: str, prompt_ids: list[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request; it is prefilled by the next ``step`` that has a free slot."""
        params = params or SamplingParams()
        params.validate()
        if not prompt_ids:
            raise ValueError(f"request {request_id!r}: prompt_ids is empty; pass at least BOS")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"request {request_id!r}: prompt of {len(prompt_ids)} tokens does "
                             f"not fit max_seq_len={self.max_seq_len}; shorten it")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"request {request_id!r}: prompt_ids outside [0, {vocab})")
        gen = None if params.greedy else UniformStream(make_generator(params.seed, self.device))
        with self._lock:
            if request_id in self._ids:
                raise ValueError(f"request_id {request_id!r} is already in flight; use a new id")
            self._ids.add(request_id)
            self._waiting.append(_Request(request_id, list(prompt_ids), params, gen))

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its slot; the next ``step`` reports it
        with finish_reason "abort". Returns False when the id is not in flight."""
        with self._lock:
            req = next((r for r in [*self._waiting, *self._running]
                        if r.request_id == request_id), None)
            if req is None:
                return False
            if req in self._waiting:
                self._waiting.remove(req)
            self._finish(req, [], "abort", None)
            return True

    def has_unfinished(self) -> bool:
        """True while any request waits, runs, or has an unreported result."""
        return bool(self._waiting or self._running or self._finished_out)

    @property
    def num_free_slots(self) -> int:
        return self.cache.num_free

    def step(self) -> list[RequestOutput]:
        """Prefill newly admitted requests, then one batched decode/speculative round."""
        with self._lock, torch.inference_mode():
            outputs: dict[str, RequestOutput] = {}
            batch = sorted(self._running, key=lambda r: r.slot)  # consecutive slots read as views
            while self._waiting and self.cache.num_free:
                req = self._waiting.popleft()
                self._emit(req, [self._prefill(req)], outputs)
            if batch:
                emitted = self._round(batch)
                for req, tokens in zip(batch, emitted, strict=True):
                    self._emit(req, tokens, outputs)
            for out in self._finished_out:
                outputs[out.request_id] = out
            self._finished_out = []
            return list(outputs.values())

    def generate(self, prompts: Sequence[list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run the prompts to completion; returns each one's final output, in order.

        Needs an idle engine (it consumes every output ``step`` returns); a serving loop
        uses ``add_request`` + ``step`` instead.
        """
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine but requests are in flight; "
                               "drive them with step() until has_unfinished() is False")
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        base = f"gen-{time.monotonic_ns()}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def calibrate(self, batch_sizes: Sequence[int] | None = None, rounds: int = 2,
                  prompt_len: int = 16) -> None:
        """Time every adaptive candidate setting for ``rounds`` rounds at a few batch sizes
        (default: 1, a quarter of the slots, all slots) on requests with random prompts of
        ``prompt_len`` tokens, so the cost model starts measured. The acceptance they show
        (random text) is forgotten, and neither they nor their rounds count in any record."""
        if self.policy is None:
            raise ValueError("calibrate() times the adaptive candidates: it needs a draft and "
                             "SpecConfig(mode='adaptive')")
        if self.has_unfinished():
            raise RuntimeError("calibrate() needs an idle engine but requests are in flight")
        slots = self.cache.lengths.shape[0]
        length = max(1, min(prompt_len, self.max_seq_len // 2))
        gen = torch.Generator().manual_seed(0)
        params = SamplingParams(max_tokens=self.max_seq_len - length, ignore_eos=True)
        try:
            for B in batch_sizes or sorted({1, max(1, slots // 4), slots}):
                prompts = torch.randint(self.model.config.vocab_size, (B, length), generator=gen)
                ids = [f"calibrate-{B}-{i}" for i in range(B)]
                for rid, prompt in zip(ids, prompts.tolist(), strict=True):
                    self.add_request(rid, prompt, params)
                self.step()  # prefill
                for setting in self.policy.settings:
                    self._forced = setting
                    for _ in range(rounds):
                        self.step()
                self._forced = None
                for rid in ids:
                    self.abort(rid)
                self.step()  # collects the aborted requests
        finally:
            self._forced = None
        self.policy.forget_acceptance(slots)
        self.round_records.reset()
        self.totals = RequestStats()

    # ------------------------------------------------------------------ prefill and decode

    def _round(self, batch: list[_Request]) -> list[list[int]]:
        """One decode round, plain or speculative with the setting ``_choose`` picks (plain
        rounds keep the draft's inputs queued: the next speculative round drafts over them
        first); its time goes to ``round_records``."""
        setting, predicted = self._choose(batch)
        if setting.plain:
            emitted, seconds = self._decode(batch)
        else:
            emitted, seconds = self._speculate(batch, setting)
        self.round_records.add(setting.name, predicted, seconds)
        return emitted

    def _choose(self, batch: list[_Request]) -> tuple[Setting, float | None]:
        """Plain without a draft or above ``max_speculative_batch``; else the configured tree
        (fixed mode) or the policy's choice (adaptive; the forced setting while calibrating).
        Returns the setting and, in adaptive mode, the predicted round seconds."""
        limit = self.spec.max_speculative_batch if self.spec else None
        plain = self.draft is None or (limit is not None and len(batch) > limit)
        if self.policy is None:
            return (PLAIN if plain else self.configured), None
        pending = max(len(r.pending_ids) for r in batch)
        if plain or self._forced is not None:
            setting = PLAIN if plain else self._forced
            shape = self.policy.shape(setting, len(batch), pending)
            return setting, self.policy.costs.predict(shape)
        choice = self.policy.choose(np.array([r.slot for r in batch]), pending)
        return choice.setting, choice.predicted_s

    def _add_lookup_branches(self, tree: DraftTree, batch: list[_Request]) -> DraftTree:
        """Hang each request's context-lookup chain, then its corpus chain, from its tree's root
        (each branch only when configured; a request without a match adds padding)."""
        spec = self.spec
        assert spec is not None
        if not spec.ngram_tokens and self.store is None:
            return tree
        contexts = [r.prompt + r.output for r in batch]
        tokens, parents = tree.tokens, tree.parents
        if spec.ngram_tokens:
            tokens, parents = add_chains(tokens, parents, [
                ngram_lookup(c, spec.ngram_tokens, spec.ngram_min, spec.ngram_max) for c in contexts])
        if self.store is not None:
            tokens, parents = add_chains(tokens, parents,
                                         [self.store.propose(c, spec.corpus_tokens) for c in contexts])
        return DraftTree(tokens, parents)

    def _prefill(self, req: _Request) -> int:
        """Run the prompt through the target (and the draft), return the first token."""
        req.slot = self.cache.allocate()
        self._running.append(req)
        P = len(req.prompt)
        ids = torch.tensor([req.prompt], device=self.device)  # (1, P)
        pos = torch.arange(P, device=self.device)[None]  # (1, P)
        slots = torch.tensor([req.slot], device=self.device)
        causal = torch.ones(P, P, dtype=torch.bool, device=self.device).tril()[None]
        mask = cache_attention_mask(self.cache.lengths[slots], causal, P)
        logits, aux = self.model(ids, pos, self.cache, slots, pos, mask, last_only=True)
        self.cache.lengths[slots] = P
        first = int(self._sample([req], logits[:, -1])[0])
        if self.draft is not None:
            self.draft_cache.lengths[slots] = 0
            if P > 1:  # entries 0..P-2 now; the last pairs f_{P-1} with `first` next round
                counts = torch.tensor([P - 1], device=self.device)
                draft_extend(self.draft, self.model.embed_tokens, self.draft_cache, slots,
                             ids[:, 1:], aux[:, :-1], counts)
            req.pending_ids = torch.tensor([first], device=self.device)
            req.pending_aux = aux[0, -1:]
        if self.policy is not None:
            self.policy.acceptance.admit(req.slot)
        return first

    def _decode(self, batch: list[_Request]) -> tuple[list[list[int]], float]:
        """One plain decode step: each request's root goes in, one sampled token comes out.
        Returns the tokens and the round's seconds."""
        marks = [self._clock()]
        slots, lens = self._slots_and_lengths(batch)
        roots = torch.tensor([[r.root] for r in batch], device=self.device)  # (B, 1)
        one = torch.ones(1, 1, 1, dtype=torch.bool, device=self.device)
        mask = cache_attention_mask(lens, one, int(lens.max()) + 1)
        pos = lens[:, None]
        logits, aux = self.model(roots, pos, self.cache, slots, pos, mask)
        self.cache.lengths[slots] += 1
        marks.append(self._clock())
        sampled = self._sample(batch, logits[:, 0])  # (B,)
        tokens = sampled.tolist()
        for b, req in enumerate(batch):
            req.stats.verify_steps += 1
            if self.draft is not None:  # the root's features + the new token: next draft extend
                keep = 1 - MAX_CATCH_UP
                req.pending_ids = torch.cat([req.pending_ids[keep:], sampled[b:b + 1]])
                req.pending_aux = torch.cat([req.pending_aux[keep:], aux[b, :1]])
        marks.append(self._clock())
        return [[t] for t in tokens], self._timed(PLAIN, batch, RoundShape(len(batch)), marks)

    def _speculate(self, batch: list[_Request], setting: Setting
                   ) -> tuple[list[list[int]], float]:
        """One EAGLE-3 round of ``setting`` for the whole batch, each tree extended by the
        request's lookup and corpus chains (when on); returns the tokens each request emits
        and the round's seconds."""
        draft = self.draft
        assert draft is not None
        marks = [self._clock()]
        slots, lens = self._slots_and_lengths(batch)
        # Step 1: draft extend over what each request committed last round.
        ids_in = [r.pending_ids for r in batch]
        counts = torch.tensor([len(ids) for ids in ids_in], device=self.device)
        ids = torch.nn.utils.rnn.pad_sequence(ids_in, batch_first=True)
        aux = torch.nn.utils.rnn.pad_sequence([r.pending_aux for r in batch], batch_first=True)
        embed = self.model.embed_tokens
        last_out = draft_extend(draft, embed, self.draft_cache, slots, ids, aux, counts)
        marks.append(self._clock())
        # Step 2: grow each request's tree from its root.
        roots = torch.tensor([r.root for r in batch], device=self.device)
        tree = grow_tree(draft, embed, self.draft_cache, slots, last_out, roots,
                         setting.num_steps, setting.topk, setting.num_draft_tokens)
        tree = self._add_lookup_branches(tree, batch)
        marks.append(self._clock())
        # Step 3: ONE target forward over all trees (each row attends to its own slot).
        logits, tree_aux = self._verify(tree, slots, lens)
        marks.append(self._clock())
        # Step 4: per-request acceptance, then keep only the accepted path in the cache.
        path, kept, bonus = self._accept(batch, tree, logits)
        self.cache.compact(slots, path, kept)
        # Step 5: emitted tokens; the accepted nodes' features feed the next draft extend.
        emitted = []
        for b, req in enumerate(batch):
            nodes = path[b, : int(kept[b])]
            tokens = torch.cat([tree.tokens[b, nodes[1:]], bonus[b : b + 1]])
            req.pending_ids, req.pending_aux = tokens, tree_aux[b, nodes]
            req.stats.verify_steps += 1
            emitted.append(tokens.tolist())
        marks.append(self._clock())
        shape = RoundShape(len(batch), setting.num_steps, setting.topk, tree.tokens.shape[1],
                           max(len(ids) for ids in ids_in))
        accepted = None if self.policy is None else tuple(
            n.cpu().numpy() for n in accepted_counts(path, kept, setting.num_draft_tokens))
        return emitted, self._timed(setting, batch, shape, marks, accepted)

    def _verify(self, tree: DraftTree, slots: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        """Target forward over the (B, D) tree tokens -> logits (B, D, V), aux (B, D, 3H)."""
        D = tree.tokens.shape[1]
        mask = cache_attention_mask(lens, tree_attention_mask(tree.parents),
                                    int(lens.max()) + D)
        positions = lens[:, None] + tree_depths(tree.parents)  # (B, D)
        write_pos = lens[:, None] + torch.arange(D, device=self.device)  # (B, D)
        return self.model(tree.tokens, positions, self.cache, slots, write_pos, mask)

    def _accept(self, batch: list[_Request], tree: DraftTree, logits: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Greedy acceptance when every request is greedy, else the lossless sampled rule
        (each sampled request uses up one uniform per emitted token)."""
        if all(r.params.greedy for r in batch):
            return accept_greedy(tree.tokens, tree.parents, logits.argmax(-1))
        B, D, V = logits.shape
        temp, top_k, top_p = self._param_tensors(batch)
        probs = probs_from_logits(logits.reshape(B * D, V), temp.repeat_interleave(D),
                                  top_k.repeat_interleave(D), top_p.repeat_interleave(D))
        uniforms = draw_uniforms([r.uniforms for r in batch], D, self.device)  # depths < D
        path, kept, bonus = accept_sampled(tree.tokens, tree.parents, probs.view(B, D, V),
                                           uniforms)
        for req, k in zip(batch, kept.tolist(), strict=True):
            if req.uniforms is not None:
                req.uniforms.consume(k)
        return path, kept, bonus

    # ------------------------------------------------------------------ helpers

    def _clock(self) -> float:
        """``self.clock()`` (perf_counter), after the device finished its queued work when
        phases are recorded or the adaptive policy times the rounds."""
        if (self.record_phases or self.policy is not None) and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    def _timed(self, setting: Setting, batch: list[_Request], shape: RoundShape,
               marks: list[float], accepted: tuple[np.ndarray, np.ndarray] | None = None
               ) -> float:
        """Book a round: ``marks`` are clock readings around its phases (plain: verify,
        accept; speculative: extend, grow, verify, accept); into ``phase_seconds`` when
        recording, into the policy in adaptive mode. Returns the round's seconds."""
        seconds = tuple(b - a for a, b in itertools.pairwise(marks))
        if self.record_phases:
            phases = ({"decode": sum(seconds)} if setting.plain else {
                "draft": seconds[0] + seconds[1], "verify": seconds[2], "accept": seconds[3]})
            self.phase_seconds.update(phases)
            self.phase_rounds.update(phases.keys())
        if self.policy is not None:
            slots = np.array([r.slot for r in batch])
            self.policy.observe(setting, slots, shape, seconds, *(accepted or ()))
        return sum(seconds)

    def _sample(self, batch: list[_Request], logits: Tensor) -> Tensor:
        """logits (B, V) -> (B,) int64 tokens drawn with each request's parameters."""
        if all(r.params.greedy for r in batch):
            return logits.argmax(-1)
        temp, top_k, top_p = self._param_tensors(batch)
        probs = probs_from_logits(logits, temp, top_k, top_p)
        uniforms = draw_uniforms([r.uniforms for r in batch], 1, self.device)[:, 0]
        for req in batch:
            if req.uniforms is not None:
                req.uniforms.consume(1)
        return sample_from_probs(probs, uniforms)

    def _param_tensors(self, batch: list[_Request]) -> tuple[Tensor, Tensor, Tensor]:
        """temperature (B,) float, top_k (B,) int64, top_p (B,) float of the batch."""
        dev = self.device
        return (torch.tensor([r.params.temperature for r in batch], device=dev),
                torch.tensor([r.params.top_k for r in batch], device=dev),
                torch.tensor([r.params.top_p for r in batch], device=dev))

    def _slots_and_lengths(self, batch: list[_Request]) -> tuple[Tensor, Tensor]:
        slots = torch.tensor([r.slot for r in batch], device=self.device)
        return slots, self.cache.lengths[slots].clone()

    def _emit(self, req: _Request, tokens: list[int], outputs: dict[str, RequestOutput]) -> None:
        """Apply stop rules to newly produced tokens, record them, finish if needed."""
        kept, reason, stop_reason = truncate_at_stop(req.output, tokens, req.params,
                                                     self.eos_ids, self._decoder(req))
        room = self.max_seq_len - len(req.prompt) - len(req.output)
        if len(kept) > room:
            kept, reason, stop_reason = kept[:room], "length", None
        elif len(kept) == room and reason is None:
            reason = "length"
        if req.stats.verify_steps and req.output:  # not the prefill token
            req.stats.decoded_tokens += len(kept)
            req.stats.accepted_tokens += min(len(kept), len(tokens) - 1)
        req.output.extend(kept)
        if reason is not None:
            self._finish(req, kept, reason, stop_reason)
            return
        outputs[req.request_id] = self._output(req, kept, None, None)

    def _finish(self, req: _Request, new: list[int], reason: str,
                stop_reason: int | str | None) -> None:
        if req in self._running:
            self._running.remove(req)
            self.cache.free(req.slot)
            self.draft_cache.lengths[req.slot] = 0
        self._ids.discard(req.request_id)
        for name in ("verify_steps", "accepted_tokens", "decoded_tokens"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(req.stats, name))
        self._finished_out.append(self._output(req, new, reason, stop_reason))

    def _output(self, req: _Request, new: list[int], reason: str | None,
                stop_reason: int | str | None) -> RequestOutput:
        return RequestOutput(req.request_id, list(new), list(req.output), reason is not None,
                             reason, stop_reason, dataclasses.replace(req.stats),
                             len(req.prompt), len(req.output))

    def _decoder(self, req: _Request) -> Callable[[list[int]], str] | None:
        """ids -> text for stop strings (the tokenizer is loaded on first need)."""
        if not req.params.stop:
            return None
        if self._tokenizer is None:
            self._tokenizer = _load_tokenizer(self.model_dir)
        tok = self._tokenizer
        return lambda ids: tok.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def _new_policy(self, num_slots: int) -> AdaptivePolicy | None:
        """The adaptive policy over ``candidate_settings`` (None in fixed mode)."""
        if self.spec is None or self.draft is None or self.spec.mode != "adaptive":
            return None
        spec = self.spec
        return AdaptivePolicy(candidate_settings(spec.num_steps, spec.eagle_topk,
                                                 spec.num_draft_tokens), num_slots,
                              max_branch=spec.ngram_tokens + spec.corpus_tokens)

    def _new_draft_cache(self, num_slots: int, max_len: int) -> KVCache:
        """A one-layer cache shaped like the draft's K/V (probed with a one-token pass)."""
        if self.draft is None:
            return KVCache(1, num_slots, 1, 1, 1, self.dtype, self.device)
        H = self.model.config.hidden_size
        x = torch.zeros(1, 1, H, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            _, (k, _) = self.draft(x, x, torch.zeros(1, 1, dtype=torch.long, device=self.device))
        return KVCache(1, num_slots, max_len, k.shape[1], k.shape[3], self.dtype, self.device)


def _check_draft_fits(draft: DraftHead | None, hidden: int, vocab: int) -> None:
    """A draft config (when the head has one) must match the target's hidden size and vocab."""
    dcfg = getattr(draft, "config", None)
    if dcfg is None:
        return
    got = (getattr(dcfg, "target_hidden_size", hidden), getattr(dcfg, "vocab_size", vocab))
    if got != (hidden, vocab):
        raise ValueError(f"the draft was built for a target with hidden size {got[0]} and vocab "
                         f"{got[1]}, but this target has {hidden} and {vocab}; use the draft "
                         "trained for this target")


def _load_tokenizer(model_dir: Path) -> object:
    """The tokenizer stored beside the model (needed only for stop strings)."""
    if not (model_dir / "tokenizer_config.json").is_file() and not (
            model_dir / "tokenizer.json").is_file():
        raise ValueError(f"stop strings need a tokenizer but {model_dir} has none: pass "
                         "Engine(tokenizer=...) or use stop_token_ids")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


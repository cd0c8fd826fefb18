"""Regenerating assistant replies with the target model itself (on-policy data).

Two backends share one interface, ``generate(prompts) -> generations``: transformers (CPU or
GPU) and SGLang (GPU nodes, imported lazily). ``regenerate`` walks multi-turn conversations turn
by turn, so every reply is generated on top of the already regenerated history.

Tool use: only text replies are regenerated (``eyas.data.validate`` empties them); an assistant
turn that calls a tool and the tool's results are kept as recorded, since the target cannot run
the tools and a call of its own would have no result to continue from. The reply after a tool
result is regenerated with that result (and the declared tools) in its prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from eyas.data.config import GenerationConfig


@dataclass(frozen=True)
class Generation:
    """One generated reply: its text, token count and why it ended ("stop", "length" or "abort")."""

    text: str
    num_tokens: int
    finish_reason: str


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[int]]) -> list[Generation]: ...


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos plus the model's generation config eos."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else ({extra} if extra is not None else set())
    if not ids:
        raise ValueError("the target's tokenizer and generation config define no eos token: set one")
    return sorted(ids)


def finish_generation(new_ids: list[int], eos: list[int], tokenizer: Any) -> Generation:
    """Cut generated ids at the first eos; "stop" when one was produced, else "length".
    The eos token counts as generated (the target produced it) but is not part of the text."""
    stop = next((i for i, t in enumerate(new_ids) if t in eos), None)
    kept = new_ids if stop is None else new_ids[:stop]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Generation(text=text, num_tokens=len(kept) + (stop is not None),
                      finish_reason="length" if stop is None else "stop")


class HFBackend:
    """transformers ``generate`` over left-padded batches; one model per actor."""

    def __init__(self, model_path: str, tokenizer: Any, cfg: GenerationConfig):
        import torch

        from eyas.targets import load_hf_model

        on_gpu = cfg.num_gpus_per_actor > 0 and torch.cuda.is_available()
        self.model, self.device = load_hf_model(model_path, cfg.dtype, on_gpu)
        self.tokenizer, self.cfg = tokenizer, cfg
        self.eos = eos_token_ids(tokenizer, self.model.generation_config)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.calls = 0
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    def _batch(self, prompts: list[list[int]]) -> tuple[Any, Any]:
        """Left-pad prompts: (B, T) ids and attention mask."""
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def generate(self, prompts: list[list[int]]) -> list[Generation]:
        """Generate for every prompt; a prompt that already fills the target's context gets an
        empty "length" reply (the stage then filters the conversation, counted)."""
        room = [self.max_positions - len(p) for p in prompts]
        live = [i for i, r in enumerate(room) if r > 0]
        out = [Generation("", 0, "length")] * len(prompts)
        if live:
            rooms = [min(self.cfg.max_new_tokens, room[i]) for i in live]
            for i, gen in zip(live, self._generate([prompts[i] for i in live], rooms), strict=True):
                out[i] = gen
        return out

    def _generate(self, prompts: list[list[int]], rooms: list[int]) -> list[Generation]:
        """One batched ``generate``; row i keeps at most ``rooms[i]`` new tokens (its context's end)."""
        import torch

        ids, mask = self._batch(prompts)
        torch.manual_seed(self.cfg.seed + self.calls)  # reproducible sampling per call
        self.calls += 1
        sample = self.cfg.temperature > 0
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max(rooms),
                do_sample=sample, temperature=self.cfg.temperature if sample else None,
                top_p=self.cfg.top_p if sample else None, top_k=None,
                eos_token_id=self.eos, pad_token_id=self.pad)
        new = out[:, ids.shape[1]:].tolist()
        return [finish_generation(row[:room], self.eos, self.tokenizer) for row, room in zip(new, rooms, strict=True)]


class EyasBackend:
    """The eyas engine (continuous batching over a slot KV cache) in this actor; CPU or GPU.

    A batch of prompts runs through one engine: a finished reply frees its slot for the next
    prompt at once, instead of waiting for the longest reply of a padded batch.
    """

    def __init__(self, model_path: str, tokenizer: Any, cfg: GenerationConfig):
        import torch

        from eyas.engine.engine import Engine
        from eyas.targets import resolve_dtype

        on_gpu = cfg.num_gpus_per_actor > 0 and torch.cuda.is_available()
        dtype = resolve_dtype(cfg.dtype, on_gpu)
        self.engine = Engine(model_path, device="cuda" if on_gpu else "cpu", dtype=dtype,
                             max_batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len)
        self.tokenizer, self.cfg = tokenizer, cfg
        self.eos = sorted(set(self.engine.eos_ids) | set(eos_token_ids(tokenizer)))
        self.calls = 0

    def generate(self, prompts: list[list[int]]) -> list[Generation]:
        """Generate for every prompt; one that already fills the context gets an empty
        "length" reply (the stage then filters the conversation, counted)."""
        from eyas.engine.sampling import SamplingParams

        limit = self.engine.max_seq_len
        live = [i for i, p in enumerate(prompts) if len(p) < limit]
        out = [Generation("", 0, "length")] * len(prompts)
        self.calls += 1
        params = [SamplingParams(max_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                 top_p=self.cfg.top_p, stop_token_ids=self.eos,
                                 seed=self.cfg.seed + self.calls * 100_003 + i) for i in live]
        for i, res in zip(live, self.engine.generate([prompts[i] for i in live], params), strict=True):
            out[i] = finish_generation(res.token_ids, self.eos, self.tokenizer)
        return out


def sglang_engine_kwargs(model_path: str, cfg: GenerationConfig) -> dict[str, Any]:
    """Arguments for ``sglang.Engine`` built from the generation config."""
    kwargs: dict[str, Any] = {"model_path": model_path, "tp_size": cfg.tp_size, "random_seed": cfg.seed,
                              "dtype": "auto" if cfg.dtype == "auto" else cfg.dtype, "log_level": "warning"}
    if cfg.mem_fraction_static is not None:
        kwargs["mem_fraction_static"] = cfg.mem_fraction_static
    return kwargs


def sglang_sampling_params(cfg: GenerationConfig) -> dict[str, Any]:
    """SGLang sampling params (greedy when temperature is 0)."""
    return {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}


def sglang_generation(out: dict[str, Any]) -> Generation:
    """One ``sglang.Engine.generate`` output dict -> ``Generation``."""
    meta = out.get("meta_info", {})
    reason = meta.get("finish_reason") or {}
    kind = reason.get("type", "length") if isinstance(reason, dict) else str(reason)
    return Generation(text=out["text"], num_tokens=int(meta.get("completion_tokens", 0)),
                      finish_reason=kind if kind in ("stop", "length", "abort") else "length")


class SGLangBackend:
    """``sglang.Engine`` in this actor (GPU nodes only; imported here, not at module load)."""

    def __init__(self, model_path: str, tokenizer: Any, cfg: GenerationConfig):
        try:
            import sglang
        except ImportError as exc:
            raise RuntimeError("data.generation.engine=sglang needs the sglang extra on GPU nodes "
                               "(pip install 'eyas[sglang]'); use engine=hf on CPU") from exc
        self.engine = sglang.Engine(**sglang_engine_kwargs(model_path, cfg))
        self.params = sglang_sampling_params(cfg)

    def generate(self, prompts: list[list[int]]) -> list[Generation]:
        outs = self.engine.generate(input_ids=prompts, sampling_params=self.params)
        return [sglang_generation(o) for o in outs]


BACKENDS: dict[str, Callable[..., GenerationBackend]] = {
    "hf": HFBackend, "eyas": EyasBackend, "sglang": SGLangBackend}


Tools = list[dict[str, Any]] | None  # one conversation's declared tools
PromptIds = Callable[[list[dict[str, Any]], Tools], list[int]]


@dataclass
class Regenerated:
    """A conversation after regeneration, with one finish reason per generated turn."""

    messages: list[dict[str, Any]]
    finish_reasons: list[str]
    generated_tokens: int


def regenerate(conversations: list[list[dict[str, Any]]], backend: GenerationBackend,
               prompt_ids: PromptIds, tools: list[Tools] | None = None) -> list[Regenerated]:
    """Fill every ``content=None`` assistant slot, turn by turn across the batch.

    ``prompt_ids(history, tools)`` renders a history ending on a user turn (or a tool result),
    with the conversation's declared ``tools`` (one entry per conversation; None: none), plus
    the generation prompt. Round r generates the r-th reply of every conversation that has one,
    in one batched call.
    """
    tools = tools or [None] * len(conversations)
    results = [Regenerated([dict(m) for m in conv], [], 0) for conv in conversations]
    while True:
        pending = [(k, res, next(i for i, m in enumerate(res.messages) if m["content"] is None))
                   for k, res in enumerate(results) if any(m["content"] is None for m in res.messages)]
        if not pending:
            return results
        gens = backend.generate([prompt_ids(res.messages[:slot], tools[k]) for k, res, slot in pending])
        for (_, res, slot), gen in zip(pending, gens, strict=True):
            res.messages[slot]["content"] = gen.text
            res.finish_reasons.append(gen.finish_reason)
            res.generated_tokens += gen.num_tokens


# Settings that do not change a reply (placement and batching) stay out of the cache key.
NOT_IN_KEY = {"batch_size", "num_actors", "num_gpus_per_actor", "num_cpus_per_actor",
              "torch_threads", "max_seq_len", "tp_size", "mem_fraction_static", "keep_truncated",
              "resume"}


class ReplyCache:
    """Finished regenerations keyed by (target, generation settings, conversation), written one
    file per batch under ``uri``: a killed or restarted data stage regenerates only what is
    missing. ``uri=None`` keeps nothing."""

    def __init__(self, uri: str | None, target: str, cfg: GenerationConfig) -> None:
        from eyas import storage

        self.uri = uri
        settings = cfg.model_dump(mode="json", exclude=NOT_IN_KEY)
        self.salt = json.dumps({"target": target, "generation": settings}, sort_keys=True)
        self.known: dict[str, Regenerated] = {}
        for f in storage.list_files(uri, ".json") if uri else []:
            for item in storage.read_json(f):
                self.known[item["key"]] = Regenerated(item["messages"], item["finish_reasons"],
                                                      item["generated_tokens"])

    def key(self, conversation: list[dict[str, Any]], tools: Tools = None) -> str:
        """The conversation's key; its declared tools count only when it has some (so keys of
        conversations without tools are those of earlier runs)."""
        text = self.salt + json.dumps(conversation, sort_keys=True, ensure_ascii=False)
        if tools:
            text += json.dumps(tools, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, conversation: list[dict[str, Any]], tools: Tools = None) -> Regenerated | None:
        return self.known.get(self.key(conversation, tools))

    def put(self, items: list[tuple[list[dict[str, Any]], Tools, Regenerated]]) -> None:
        """Persist a batch of (input conversation, its tools, result); one atomic file per batch."""
        from eyas import storage

        if not self.uri or not items:
            return
        keyed = {self.key(conv, tools): res for conv, tools, res in items}
        items = [{"key": key, "messages": res.messages, "finish_reasons": res.finish_reasons,
                  "generated_tokens": res.generated_tokens} for key, res in keyed.items()]
        name = hashlib.sha256("".join(keyed).encode()).hexdigest()[:24]
        storage.write_json(storage.join(self.uri, f"{name}.json"), items)
        self.known.update(keyed)


def regenerate_cached(conversations: list[list[dict[str, Any]]], backend: GenerationBackend,
                      prompt_ids: PromptIds, cache: ReplyCache,
                      tools: list[Tools] | None = None) -> tuple[list[Regenerated], list[bool]]:
    """``regenerate`` for the conversations the cache lacks; returns all results in order and,
    per conversation, whether it came from the cache."""
    tools = tools or [None] * len(conversations)
    found = [cache.get(c, t) for c, t in zip(conversations, tools, strict=True)]
    todo = [k for k, hit in enumerate(found) if hit is None]
    fresh = iter(regenerate([conversations[k] for k in todo], backend, prompt_ids,
                            [tools[k] for k in todo]) if todo else [])
    results = [hit if hit is not None else next(fresh) for hit in found]
    cache.put([(conversations[k], tools[k], results[k]) for k in todo])
    return results, [hit is not None for hit in found]

"""Decode speed on one target, same chat prompts, temperature 0, all rows measured in one run.
The prompts are Vicuna-bench questions: held out of every pipeline config's training data (as in
the pipelines' load test), so the head's and the drafters' acceptance is measured on unseen text.

Rows: (a) transformers ``generate()`` in fp32 and bf16 [the baseline is the faster of the two],
(b) transformers prompt-lookup assisted generation, (c) the eyas engine without speculation,
(d) the eyas engine with EAGLE-3 (chain and tree settings, with and without the n-gram lookup
branch that is verified together with the tree, with the corpus branch from the draft dir's
n-gram store of the training replies, and with ``max_speculative_batch``: rounds of
larger batches decode plainly; such rows print the share of speculative rounds; and adaptive
rows, ``SpecConfig(mode="adaptive")``: the engine picks each round's setting among plain
decoding, chains of depth 1..S and the tree, after a timing warm-up when it is built). For each
concurrency C, C requests of ``--tokens`` output tokens each run together (eos ignored so every
row emits the same number of tokens), for ``--groups`` G groups of C different prompts in turn;
tokens/s = G * C * tokens / wall and TPOT = wall / (G * tokens). Prompt lookup only supports batch
size 1 in transformers, so its C requests run one after another.

For the EAGLE-3 rows it prints what the round costs: t_1 (one plain decode step of the batch,
from row (c)), t_verify (the target forward over the D tree tokens), t_draft (draft time per
step: extend + tree growth divided by S), tau (tokens per verification), the speed-up the costs
predict, tau * t_1 / (t_verify + S * t_draft), and the efficiency = measured / predicted. An
adaptive row prints instead the cost model's predicted and the measured mean round time (and
the mean |predicted - measured| per round, relative to the measured) and the share of rounds
of each setting it chose.

Threads: one process, ``--threads`` torch threads (default 2 = both cores of the dev box). Run it
on a quiet machine: a second busy process on 2 cores slows torch 10-40x.

    .venv/bin/python bench/decode_speed.py --target smollm2-135m-instruct \
        --draft artifacts/train/draft [--concurrency 1 4] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eyas.assets import resolve_asset  # noqa: E402
from eyas.targets import resolve_dtype, resolve_target  # noqa: E402

PROMPTS = "assets:datasets/prompts/vicuna_bench_question.jsonl"  # held out of training
MAX_SEQ_LEN = 2048  # KV cache per slot: the chat prompts + --tokens fit; the model's 8192 would
#                     preallocate ~3 GB per engine at C=4
# name: (S steps, K top-k, D tree tokens, n-gram lookup branch tokens, corpus branch tokens,
#        max_speculative_batch, mode); the corpus branch needs the draft dir's ngram_store.npz
SETTINGS = {"chain 3/1/4": (3, 1, 4, 0, 0, None, "fixed"), "chain 5/1/6": (5, 1, 6, 0, 0, None, "fixed"),
            "chain 7/1/8": (7, 1, 8, 0, 0, None, "fixed"), "tree 5/4/8": (5, 4, 8, 0, 0, None, "fixed"),
            "tree 6/2/8": (6, 2, 8, 0, 0, None, "fixed"),
            "chain 3/1/4 +ngram 4": (3, 1, 4, 4, 0, None, "fixed"),
            "chain 4/1/5 +ngram 4": (4, 1, 5, 4, 0, None, "fixed"),
            "chain 5/1/6 +ngram 4": (5, 1, 6, 4, 0, None, "fixed"),
            "chain 3/1/4 +ngram 4 B<=1": (3, 1, 4, 4, 0, 1, "fixed"),
            "chain 3/1/4 +ngram 4 +corpus 4": (3, 1, 4, 4, 4, None, "fixed"),
            "chain 4/1/5 +ngram 4 +corpus 4": (4, 1, 5, 4, 4, None, "fixed"),
            "chain 3/1/4 +ngram 4 +corpus 4 B<=1": (3, 1, 4, 4, 4, 1, "fixed"),
            "adaptive 5/1/6": (5, 1, 6, 0, 0, None, "adaptive"),
            "adaptive 6/2/8": (6, 2, 8, 0, 0, None, "adaptive"),
            "adaptive 5/1/6 +ngram 4": (5, 1, 6, 4, 0, None, "adaptive"),
            "adaptive 5/1/6 +ngram 4 +corpus 4": (5, 1, 6, 4, 4, None, "adaptive")}
Knobs = tuple[int, int, int, int, int, int | None, str]
Groups = list[list[list[int]]]  # G groups of C prompts each
Row = Callable[[Groups, int], dict]


def questions(n: int) -> list[str]:
    """The first turn of the first ``n`` Vicuna-bench questions."""
    with open(resolve_asset(PROMPTS, "PROMPTS")) as f:
        return [json.loads(line)["turns"][0] for line in f if line.strip()][:n]


def chat_prompts(tokenizer, c: int) -> list[list[int]]:
    """``questions(c)`` with the target's chat template, as token ids."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, return_dict=True)["input_ids"]
            for q in questions(c)]


def timed(fn: Callable[[], dict]) -> tuple[float, dict]:
    start = time.perf_counter()
    extra = fn()
    return time.perf_counter() - start, extra


def hf_generate(model, groups: Groups, n: int) -> dict:
    """(a): each group as one left-padded batch through ``generate``."""
    for prompts in groups:
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    return {}


def hf_prompt_lookup(model, groups: Groups, n: int) -> dict:
    """(b): prompt-lookup assisted generation, batch size 1, requests in turn."""
    with torch.inference_mode():
        for p in (p for prompts in groups for p in prompts):
            model.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, prompt_lookup_num_tokens=10, pad_token_id=0)
    return {}


def eyas_generate(engine, groups: Groups, n: int) -> dict:
    """(c)/(d): the eyas engine, each group's requests batched together; per-round phase times."""
    from eyas.engine.sampling import SamplingParams

    engine.phase_seconds.clear()
    engine.phase_rounds.clear()
    engine.round_records.reset()
    outs = [o for prompts in groups
            for o in engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))]
    steps = sum(o.stats.verify_steps for o in outs)
    per_round = {k: engine.phase_seconds[k] / engine.phase_rounds[k] for k in engine.phase_rounds}
    rounds = engine.phase_rounds
    share = rounds["verify"] / max(rounds["verify"] + rounds["decode"], 1)
    return {"tau": sum(o.stats.decoded_tokens for o in outs) / steps if steps else 1.0,
            "spec_share": share, "round_time": engine.round_records.overall(),
            "settings": engine.round_records.snapshot(), **per_round}


def build_rows(model_dir: str, draft_dir: str | None, max_c: int, dtype: torch.dtype,
               prompt_lookup: bool, settings: list[str]) -> dict[str, tuple[Row, Knobs | None]]:
    from transformers import AutoModelForCausalLM

    from eyas.engine.engine import Engine, SpecConfig

    rows: dict[str, tuple[Row, Knobs | None]] = {}
    for name in ("float32", "bfloat16"):
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, name)).eval()
        rows[f"(a) transformers generate {name}"] = (lambda p, n, hf=hf: hf_generate(hf, p, n), None)
        if prompt_lookup and name == "bfloat16":
            rows["(b) transformers prompt lookup bf16"] = (
                lambda p, n, hf=hf: hf_prompt_lookup(hf, p, n), None)
    engines = {"(c) eyas engine": (Engine(model_dir, dtype=dtype, max_batch_size=max_c,
                                           max_seq_len=MAX_SEQ_LEN), None)}
    for name in settings if draft_dir else ():
        knobs = SETTINGS[name]
        adaptive = knobs[6] == "adaptive"  # timed on dummy requests when built (calibrate)
        engines[f"(d) eyas eagle3 {name}"] = (
            Engine(model_dir, SpecConfig(draft_dir, *knobs[:4], corpus_tokens=knobs[4],
                                         max_speculative_batch=knobs[5], mode=knobs[6],
                                         calibrate=adaptive),
                   dtype=dtype, max_batch_size=max_c, max_seq_len=MAX_SEQ_LEN), knobs)
    for name, (eng, knobs) in engines.items():
        eng.record_phases = True
        rows[name] = (lambda p, n, eng=eng: eyas_generate(eng, p, n), knobs)
    return rows


def cost_columns(extra: dict, knobs: Knobs, t_1: float, gain: float) -> str:
    """t_verify, t_draft per step, predicted speed-up and efficiency of one EAGLE-3 cell."""
    steps = knobs[0]
    t_verify, t_draft = extra["verify"], extra["draft"] / steps
    predicted = extra["tau"] * t_1 / (t_verify + steps * t_draft)
    return (f" t_verify {1000 * t_verify:6.1f} t_draft {1000 * t_draft:5.2f} "
            f"predicted {predicted:5.2f}x efficiency {gain / predicted:5.2f}")


def adaptive_columns(extra: dict) -> str:
    """The cost model's predicted vs the measured mean round time of an adaptive cell, and the
    share of rounds of each setting it chose."""
    from eyas.loadtest.report import format_shares

    t = extra["round_time"]
    shares = format_shares({name: s["share"] for name, s in extra["settings"].items()})
    return (f" round predicted {t['predicted_ms'] or float('nan'):6.2f} ms measured "
            f"{t['measured_ms'] or float('nan'):6.2f} ms |err| {t['error_pct'] or float('nan'):4.1f}%"
            f" rounds: {shares}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default="artifacts/train/draft", help="exported EAGLE-3 draft dir")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timed runs per cell")
    parser.add_argument("--groups", type=int, default=4,
                        help="each cell runs G groups of C different prompts, one group after another")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", help="the eyas engine's dtype")
    parser.add_argument("--no-prompt-lookup", action="store_true")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        metavar="NAME", help=f"EAGLE-3 rows to run (default all: {list(SETTINGS)})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model_dir = resolve_target(args.target, "--target")
    if not os.path.isdir(args.draft):
        raise SystemExit(f"--draft {args.draft}: no exported draft there. Run jobs/train_draft.py "
                         "first (or the pipeline), or point --draft at an exported EAGLE-3 directory.")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = build_rows(model_dir, args.draft, max(args.concurrency),
                      resolve_dtype(args.dtype, on_gpu=False), not args.no_prompt_lookup,
                      args.settings)
    print(f"target {args.target}, draft {args.draft}, {args.tokens} tokens/request, eyas "
          f"{args.dtype}, {torch.get_num_threads()} torch thread(s), {args.groups} groups of C "
          f"prompts per cell, best of {args.repeats}")
    for c in args.concurrency:
        prompts, g = chat_prompts(tok, c * args.groups), args.groups
        groups = [prompts[i * c:(i + 1) * c] for i in range(g)]
        results = {}
        for name, (fn, _) in rows.items():
            fn([prompts[:1]], 8)  # warm-up
            run = lambda fn=fn, groups=groups: fn(groups, args.tokens)  # noqa: E731
            results[name] = min((timed(run) for _ in range(args.repeats)), key=lambda r: r[0])
        base_name = min((n for n in results if n.startswith("(a)")), key=lambda n: results[n][0])
        base, plain = results[base_name][0], results["(c) eyas engine"]
        print(f"\nC={c}: baseline = {base_name}")
        print(f"{'row':38s} {'tok/s':>8s} {'TPOT ms':>8s} {'x base':>7s} {'x (c)':>6s} {'tau':>5s}")
        for name, (wall, extra) in results.items():
            tau = extra.get("tau")
            line = (f"{name:38s} {c * g * args.tokens / wall:8.1f} {1000 * wall / (g * args.tokens):8.2f} "
                    f"{base / wall:7.2f} {plain[0] / wall:6.2f} {'' if tau is None else f'{tau:5.2f}'}")
            knobs = rows[name][1]
            if knobs is not None and knobs[6] == "adaptive":
                line += adaptive_columns(extra)
            elif knobs is not None and knobs[5] is not None:
                line += f" speculative rounds {100 * extra['spec_share']:3.0f}%"
            elif knobs is not None:
                line += cost_columns(extra, knobs, plain[1]["decode"], plain[0] / wall)
            elif name == "(c) eyas engine":
                line += f"       t_1 {1000 * extra['decode']:6.1f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()

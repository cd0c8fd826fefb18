"""Decode speed on one target, same prompts, temperature 0, all rows measured in one run.

Rows: (a) transformers ``generate()`` [the baseline], (b) transformers prompt-lookup assisted
generation, (c) the eyas engine without speculation, (d) the eyas engine with EAGLE-3 (chain and
tree settings). For each concurrency C, C requests of ``--tokens`` output tokens each run
together (eos ignored so every row emits the same tokens); tokens/s = C * tokens / wall and
TPOT = wall / tokens (the time per output token each request sees). Prompt lookup only supports
batch size 1 in transformers, so its C requests run one after another.

    .venv/bin/python bench/decode_speed.py --draft artifacts/train/draft [--concurrency 1 4 16]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eyas.assets import resolve_model_path  # noqa: E402

PROMPTS = ["Once upon a time, there was a little girl named", "The dog ran to the park and",
           "Tom had a big red ball. One day,", "Lily and her mom went to the store to buy",
           "There was a small bird who wanted to fly", "Ben liked to play with his toy car. He",
           "One sunny day, a cat saw a", "Sam was sad because his friend"]
SETTINGS = {"eagle3 chain 3/1/4": (3, 1, 4), "eagle3 chain 5/1/6": (5, 1, 6), "eagle3 tree 5/4/8": (5, 4, 8)}


def prompts_for(tokenizer, c: int) -> list[list[int]]:
    return [tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(c)]


def timed(fn: Callable[[], dict]) -> tuple[float, dict]:
    start = time.perf_counter()
    extra = fn()
    return time.perf_counter() - start, extra


def hf_generate(model, tokenizer, prompts: list[list[int]], n: int) -> dict:
    """(a): one left-padded batch through ``generate``."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
    return {}


def hf_prompt_lookup(model, tokenizer, prompts: list[list[int]], n: int) -> dict:
    """(b): prompt-lookup assisted generation, batch size 1, requests in turn."""
    with torch.inference_mode():
        for p in prompts:
            model.generate(input_ids=torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, prompt_lookup_num_tokens=10, pad_token_id=0)
    return {}


def eyas_generate(engine, prompts: list[list[int]], n: int) -> dict:
    """(c)/(d): the eyas engine, all requests batched together."""
    from eyas.engine.sampling import SamplingParams

    outs = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    steps = sum(o.stats.verify_steps for o in outs)
    return {"acceptance_length": sum(o.stats.decoded_tokens for o in outs) / steps if steps else 1.0}


def build_rows(model_dir: str, draft_dir: str | None, max_c: int) -> dict[str, Callable]:
    from transformers import AutoModelForCausalLM

    from eyas.engine.engine import Engine, SpecConfig

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows: dict[str, Callable] = {
        "(a) transformers generate": lambda tok, p, n: hf_generate(hf, tok, p, n),
        "(b) transformers prompt lookup": lambda tok, p, n: hf_prompt_lookup(hf, tok, p, n),
    }
    plain = Engine(model_dir, max_batch_size=max_c)
    rows["(c) eyas engine"] = lambda tok, p, n: eyas_generate(plain, p, n)
    if draft_dir:
        for name, (s, k, d) in SETTINGS.items():
            eng = Engine(model_dir, SpecConfig(draft_dir, s, k, d), max_batch_size=max_c)
            rows[f"(d) eyas {name}"] = lambda tok, p, n, eng=eng: eyas_generate(eng, p, n)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="assets:models/stories260k")
    parser.add_argument("--draft", default="artifacts/train/draft", help="exported EAGLE-3 draft dir")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timed runs per cell")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model_dir = resolve_model_path(args.target, "--target")
    if not os.path.isdir(args.draft):
        raise SystemExit(f"--draft {args.draft}: no exported draft there. Run jobs/train_draft.py first "
                         f"(or the pipeline), or point --draft at an exported EAGLE-3 directory.")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = build_rows(model_dir, args.draft, max(args.concurrency))
    print(f"target {model_dir}, draft {args.draft}, {args.tokens} tokens/request, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print(f"{'row':34s} {'C':>3s} {'tok/s':>9s} {'TPOT ms':>9s} {'x (a)':>7s} {'accept':>7s}")
    for c in args.concurrency:
        prompts, base = prompts_for(tok, c), None
        for name, fn in rows.items():
            fn(tok, prompts[:1], 8)  # warm-up
            run = lambda fn=fn, prompts=prompts: fn(tok, prompts, args.tokens)  # noqa: E731
            best, extra = min((timed(run) for _ in range(args.repeats)), key=lambda r: r[0])
            base = base or best
            accept = extra.get("acceptance_length")
            print(f"{name:34s} {c:3d} {c * args.tokens / best:9.1f} {1000 * best / args.tokens:9.2f} "
                  f"{base / best:7.2f} {accept if accept is None else round(accept, 2)!s:>7s}")


if __name__ == "__main__":
    main()

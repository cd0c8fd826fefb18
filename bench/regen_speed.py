"""Regeneration backends side by side: reply tokens/s of transformers vs the eyas engine.

Both backends get the same chat prompts (MT-bench / Alpaca questions rendered with the target's
own template), greedy, the same ``max_new_tokens`` and the same batch size, in one process with
a fixed number of torch threads. The baseline is (a) transformers ``generate`` over left-padded
batches (the ``hf`` backend); (b) is the eyas engine with continuous batching (``eyas``).

    .venv/bin/python bench/regen_speed.py --target smollm2-135m-instruct --prompts 32
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eyas.assets import resolve_asset  # noqa: E402
from eyas.data.config import GenerationConfig  # noqa: E402
from eyas.data.regenerate import BACKENDS  # noqa: E402
from eyas.targets import resolve_target  # noqa: E402

PROMPT_FILES = ["assets:datasets/prompts/mt_bench_question.jsonl",
                "assets:datasets/prompts/eagle_alpaca_question.jsonl"]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first turn of the first ``n`` questions, rendered with the generation prompt."""
    questions = []
    for f in PROMPT_FILES:
        with open(resolve_asset(f, "PROMPT_FILES")) as fh:
            questions += [json.loads(line)["turns"][0] for line in fh if line.strip()]
    msgs = [[{"role": "user", "content": q}] for q in questions[:n]]
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, return_dict=True)["input_ids"]
            for m in msgs]


def run(backend, prompts: list[list[int]], batch: int) -> tuple[float, int]:
    """(seconds, reply tokens) for all prompts, ``batch`` per call."""
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        tokens += sum(g.num_tokens for g in backend.generate(prompts[i:i + batch]))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the actor's CPUs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    path = resolve_target(args.target, "--target")
    tok = AutoTokenizer.from_pretrained(path)
    prompts = chat_prompts(tok, args.prompts)
    print(f"target {args.target}: {len(prompts)} prompts, batch {args.batch_size}, "
          f"max_new_tokens {args.max_new_tokens}, greedy, {torch.get_num_threads()} torch threads")
    base = None
    for dtype in args.dtype:
        for name in ("hf", "eyas"):
            cfg = GenerationConfig(engine=name, dtype=dtype, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens)
            backend = BACKENDS[name](path, tok, cfg)
            backend.generate(prompts[:2])  # warm-up
            seconds, tokens = run(backend, prompts, args.batch_size)
            rate = tokens / seconds
            base = base or rate
            print(f"{name:5s} {dtype:9s} {tokens:6d} tokens {seconds:7.1f} s {rate:8.1f} tok/s "
                  f"x(hf {args.dtype[0]}) {rate / base:5.2f}")
            del backend


if __name__ == "__main__":
    main()

"""What serving costs per token: the eyas engine in this process vs the same engine behind Ray Serve.

Rows, same chat prompts, temperature 0, eos ignored, one request at a time (concurrency 1):
(a) the engine stepped in this process [the baseline], (b) the same engine configuration served
by Ray Serve (the eyas app: HTTP proxy, FastAPI replica, engine loop thread, SSE) and read with
the official ``openai`` client streaming. TPOT = (last chunk - first chunk) / (tokens - 1) per
request, median over the requests; ``overhead`` = served TPOT - in-process TPOT.

``--draft`` measures the EAGLE-3 app instead of the plain one (both rows speculate).
``--serve-threads`` sets the replica's torch threads (engine.num_threads); the in-process row
uses ``--threads``. Ray runs with ``--num-cpus`` CPUs. Run it on a quiet machine.

    .venv/bin/python bench/serve_overhead.py --target smollm2-135m-instruct [--draft DIR] \
        [--serve-threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from decode_speed import chat_prompts, questions  # noqa: E402
from eyas.targets import resolve_target  # noqa: E402


def in_process_tpot(model_dir: str, draft: str | None, prompts: list[list[int]], tokens: int,
                    dtype: str) -> list[float]:
    """(a): per-request TPOT (s) of the engine stepped here, one request at a time."""
    from eyas.engine.engine import Engine, SpecConfig
    from eyas.engine.sampling import SamplingParams

    engine = Engine(model_dir, SpecConfig(draft) if draft else None, dtype=getattr(torch, dtype),
                    max_batch_size=4)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    engine.generate([prompts[0]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    out = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
        first = last = None
        done = 0
        while engine.has_unfinished():
            for o in engine.step():
                now = time.perf_counter()
                done += len(o.new_token_ids)
                if first is None and o.new_token_ids:
                    first, first_n = now, done
                last = now
        out.append((last - first) / max(done - first_n, 1))
    return out


def served_tpot(model: str, draft: str | None, texts: list[str], tokens: int, dtype: str,
                threads: int, num_cpus: float, port: int) -> list[float]:
    """(b): per-request TPOT (s) through Ray Serve and the ``openai`` client."""
    import openai
    import ray
    from ray import serve

    from eyas.serve.app import build_app

    engine = {"device": "cpu", "dtype": dtype, "max_batch_size": 4, "max_seq_len": 2048,
              "num_threads": threads}
    app = {"model": model, "served_model_name": "m", "engine": engine,
           "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}}
    if draft:
        app["speculative"] = {"draft_path": os.path.abspath(draft)}
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app), name="overhead", route_prefix="/")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        ask = lambda text, n: client.chat.completions.create(  # noqa: E731
            model="m", messages=[{"role": "user", "content": text}], max_tokens=n,
            temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        list(ask(texts[0], 8))  # warm-up
        out = []
        for text in texts:
            times = [time.perf_counter() for c in ask(text, tokens)
                     if c.choices and c.choices[0].delta.content]
            out.append((times[-1] - times[0]) / (tokens - 1))
        return out
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default=None, help="exported EAGLE-3 draft dir (optional)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, in-process row")
    parser.add_argument("--serve-threads", type=int, nargs="+", default=[2],
                        help="replica torch threads, one served row each")
    parser.add_argument("--num-cpus", type=float, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    model_dir = resolve_target(args.target, "--target")
    texts = questions(args.requests)
    prompts = chat_prompts(AutoTokenizer.from_pretrained(model_dir), args.requests)
    base = statistics.median(in_process_tpot(model_dir, args.draft, prompts, args.tokens, args.dtype))
    print(f"target {args.target}, draft {args.draft or '-'}, {args.dtype}, {args.tokens} tokens x "
          f"{args.requests} requests, concurrency 1")
    print(f"{'row':44s} {'TPOT ms':>8s} {'overhead ms':>12s} {'x (a)':>6s}")
    print(f"{f'(a) in-process engine, {args.threads} thread(s)':44s} {1000 * base:8.2f}", flush=True)
    for threads in args.serve_threads:
        tpot = statistics.median(served_tpot(args.target, args.draft, texts, args.tokens, args.dtype,
                                             threads, args.num_cpus, args.port))
        print(f"{f'(b) Ray Serve + openai client, {threads} thread(s)':44s} {1000 * tpot:8.2f} "
              f"{1000 * (tpot - base):12.2f} {base / tpot:6.2f}", flush=True)


if __name__ == "__main__":
    main()

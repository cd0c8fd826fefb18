"""Served EAGLE-3 across load: the baseline app vs fixed speculation settings vs the adaptive policy.

One local Ray + Serve instance runs one eyas app per row below, all on the same target with the
same engine knobs (CPU, ``--dtype``, ``--threads`` torch threads, ``--max-batch`` slots):

  baseline            plain decoding [the baseline: every ratio is over it, per point]
  baseline 2          plain decoding again: the A/A control, whose ratio is this machine's noise
  fixed               chain S/1/D + n-gram branch, speculating at every batch size
  fixed B<=1          the same, speculating only while one request runs (max_speculative_batch 1)
  adaptive            adaptive S/1/S+1 + n-gram branch, calibrated at start (issue 12)

The project's own load test (``eyas.loadtest``, closed loop, point-major so each concurrency
point measures every app back to back) sends held-out Vicuna-bench chat prompts, greedy, eos
ignored, ``--tokens`` per request. The whole sweep runs ``--repeats`` times, the apps' order
rotated each time (so no app always runs first or after the same neighbour); each repeat gives
every app's ratio to that repeat's baseline at the same point. Printed per point: each app's
TPOT and output tokens/s as x baseline, the median over repeats with the range; adaptive over
the best fixed row (per repeat, then the median); adaptive's share of decode rounds per setting;
and, for the whole run, the adaptive app's predicted vs measured round time per setting (from
``/v1/server_info``). The control row's range is what this machine can resolve: a ratio inside
it is not a difference. Idle apps hold memory only. Run it on a quiet machine: the apps, the
client actor and this driver share the CPUs.

    .venv/bin/python bench/serve_sweep.py --draft artifacts/smollm2_more/train/draft \
        [--concurrencies 1 2 4 8 16 32] [--duration 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


def app_configs(args: argparse.Namespace) -> dict[str, dict]:
    """The serve-app args of every row (``eyas.serve.app.build_app``), baseline first."""
    engine = {"device": "cpu", "dtype": args.dtype, "max_batch_size": args.max_batch,
              "max_seq_len": args.max_seq_len, "num_threads": args.threads}
    chain = {"draft_path": args.draft, "num_steps": args.steps, "eagle_topk": 1,
             "num_draft_tokens": args.steps + 1, "ngram_tokens": args.ngram}
    specs = {"baseline": None,
             "baseline 2": None,
             "fixed": chain,
             "fixed B<=1": {**chain, "max_speculative_batch": 1},
             "adaptive": {**chain, "num_steps": args.adaptive_steps,
                          "num_draft_tokens": args.adaptive_steps + 1, "speculation": "adaptive"}}
    deployment = {"num_replicas": 1, "max_ongoing_requests": 2 * args.max_batch,
                  "ray_actor_options": {"num_cpus": 0.25}}
    return {name: {"model": args.target, "served_model_name": args.target, "engine": engine,
                   "speculative": spec, "max_tokens_limit": 2048, "deployment": deployment}
            for name, spec in specs.items()}


def route(name: str) -> str:
    return "/" + name.replace(" ", "").replace("<=", "le")


def rotated(names: list[str], r: int) -> list[str]:
    """The apps' measuring order in repeat ``r``."""
    k = r % len(names)
    return names[k:] + names[:k]


def serve_rows(args: argparse.Namespace) -> list[str]:
    """Start every row's app on a local Serve instance; return the app names."""
    from ray import serve

    from eyas.serve.app import build_app

    quiet = {"enable_access_log": False}
    serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=quiet)
    names = []
    for name, app in app_configs(args).items():
        print(f"[bench] starting app {name!r} at {route(name)}", flush=True)
        serve.run(build_app(app), name=f"sweep{route(name).replace('/', '-')}",
                  route_prefix=route(name), logging_config=quiet)
        names.append(name)
    return names


def load_test_config(args: argparse.Namespace, names: list[str], out: str):
    from decode_speed import PROMPTS  # held out of training
    from eyas.loadtest.config import LoadTestConfig

    url = f"http://127.0.0.1:{args.port}"
    return LoadTestConfig(
        endpoints=[{"name": n, "url": f"{url}{route(n)}/v1", "model": args.target} for n in names],
        concurrencies=args.concurrencies, requests_per_point=args.max_requests,
        duration_s=args.duration,
        workload={"kind": "prompts_file", "path": PROMPTS, "num_prompts": 80},
        max_tokens=args.tokens, temperature=0.0, ignore_eos=True, continuous_usage_stats=True,
        output=out, num_client_actors=1, client_actor_cpus=0.25)


def ratios(repeats: list[list[dict]], names: list[str]) -> dict[tuple[int, str], dict]:
    """Per (concurrency, app): the TPOT and throughput ratios to the baseline of each repeat
    (TPOT: baseline / app, so higher is faster), adaptive over each repeat's best fixed row,
    the median TPOT, tau and the last repeat's round shares."""
    out: dict[tuple[int, str], dict] = {}
    fixed = [n for n in names if n.startswith("fixed")]
    for rows in repeats:
        by = {(r["concurrency"], r["endpoint"]): r for r in rows}
        for c in sorted({r["concurrency"] for r in rows}):
            base = by[(c, "baseline")]
            tpot_x = {n: base["tpot_ms_median"] / by[(c, n)]["tpot_ms_median"] for n in names}
            for n in names:
                r = by[(c, n)]
                cell = out.setdefault((c, n), {"tpot_x": [], "thr_x": [], "tpot": [], "tau": [],
                                               "failed": 0, "vs_best": []})
                cell["tpot_x"].append(tpot_x[n])
                cell["thr_x"].append(r["output_throughput"] / base["output_throughput"])
                cell["tpot"].append(r["tpot_ms_median"])
                cell["failed"] += r["failed"]
                if r.get("acceptance_length_mean") is not None:
                    cell["tau"].append(r["acceptance_length_mean"])
                if n == "adaptive":
                    cell["vs_best"].append(tpot_x[n] / max(tpot_x[f] for f in fixed))
                    cell["shares"] = r.get("speculation_shares") or {}
    return out


def spread(values: list[float]) -> str:
    """'median [min-max]' of the repeats' ratios."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def print_table(cells: dict[tuple[int, str], dict], names: list[str]) -> None:
    """Per point and app: TPOT and throughput as x baseline (median [range] over repeats)."""
    from eyas.loadtest.report import format_shares

    print("\n| C | app | TPOT ms | TPOT x baseline | out tok/s x baseline | tau | notes |")
    print("|---|---|---|---|---|---|---|")
    for c in sorted({c for c, _ in cells}):
        for n in names:
            cell = cells[(c, n)]
            note = f"failed {cell['failed']}" if cell["failed"] else ""
            if n == "adaptive":
                note += (f" {spread(cell['vs_best'])} x best fixed; "
                         f"rounds: {format_shares(cell['shares'])}")
            tau = f"{statistics.median(cell['tau']):.2f}" if cell["tau"] else ""
            print(f"| {c} | {n} | {statistics.median(cell['tpot']):.1f} | "
                  f"{spread(cell['tpot_x'])} | {spread(cell['thr_x'])} | {tau} | {note.strip()} |")


def print_verdict(cells: dict[tuple[int, str], dict], names: list[str]) -> None:
    """Adaptive against the issue-12 bars, beside the A/A control's noise at the same point."""
    points = sorted({c for c, _ in cells})
    print("\nadaptive vs the bars (medians over repeats; control = baseline 2, the noise):")
    for c in points:
        a, ctl = cells[(c, "adaptive")], cells[(c, "baseline 2")]
        print(f"  C={c}: TPOT {spread(a['tpot_x'])} x baseline (>= 1.0), "
              f"{spread(a['vs_best'])} x best fixed (>= 0.95); control {spread(ctl['tpot_x'])}")
    top = points[-1]
    print(f"  throughput at C={top}: {spread(cells[(top, 'adaptive')]['thr_x'])} x baseline "
          f"(>= 0.95); control {spread(cells[(top, 'baseline 2')]['thr_x'])}")


def print_round_times(args: argparse.Namespace) -> None:
    """The adaptive app's cost model over the whole sweep: per setting, the predicted and the
    measured mean round time and the mean |error| (``/v1/server_info``)."""
    from eyas.loadtest.client import make_target
    from eyas.loadtest.runner import server_info

    target = make_target(f"http://127.0.0.1:{args.port}{route('adaptive')}/v1", True, None)
    rounds = server_info(target)["backend_info"]["speculation_rounds"]
    print("\nadaptive app, whole run: setting | share | predicted ms | measured ms | "
          "mean error | mean |error| per round")
    for name, r in sorted(rounds.items(), key=lambda kv: -kv[1]["share"]):
        pred, meas, err = r["predicted_ms"], r["measured_ms"], r["error_pct"]
        if pred is None or meas is None:
            print(f"  {name} | {r['share']:.1%} | - | - | - | -")
            continue
        print(f"  {name} | {r['share']:.1%} | {pred:.1f} | {meas:.1f} | "
              f"{100 * (pred - meas) / meas:+.1f}% | {err:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", required=True, help="exported EAGLE-3 draft dir")
    parser.add_argument("--concurrencies", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds issued per point")
    parser.add_argument("--repeats", type=int, default=3, help="whole sweeps, app order rotated")
    parser.add_argument("--max-requests", type=int, default=256, help="cap per point")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="fixed rows: chain S/1/S+1")
    parser.add_argument("--adaptive-steps", type=int, default=5)
    parser.add_argument("--ngram", type=int, default=4, help="n-gram branch nodes (0 = off)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per replica")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-cpus", type=float, default=2)
    parser.add_argument("--port", type=int, default=8012)
    args = parser.parse_args()
    args.draft = os.path.abspath(args.draft)

    import ray
    from ray import serve

    from eyas.loadtest.runner import run_load_test
    from eyas.runtime import quiet_ray_data

    quiet_ray_data()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    print(f"[bench] apps: CPU, {args.dtype}, {args.threads} torch threads each, "
          f"{args.max_batch} slots; load: Vicuna-bench, greedy, {args.tokens} tokens, "
          f"{args.duration:.0f} s per point, {args.repeats} repeats", flush=True)
    try:
        names = serve_rows(args)
        repeats = []
        with tempfile.TemporaryDirectory() as out:
            for r in range(args.repeats):
                order = rotated(names, r)
                print(f"[bench] repeat {r + 1}/{args.repeats}: {', '.join(order)}", flush=True)
                cfg = load_test_config(args, order, os.path.join(out, str(r)))
                repeats.append(run_load_test(cfg).rows)
        cells = ratios(repeats, names)
        print_table(cells, names)
        print_verdict(cells, names)
        print_round_times(args)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()

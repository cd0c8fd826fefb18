"""The Python half of bench/gpu_check.sh: engine numerics and per-round decode costs on a random
Llama, then one table with the gpu-marked tests' results.

    python bench/gpu_check.py run --device cuda --size 1b --work DIR --rows ROWS.jsonl
    python bench/gpu_check.py table --rows ROWS.jsonl [--junit TESTS.xml] [--step NAME=RC ...]
    python bench/gpu_check.py run --device cpu --size tiny --work /tmp/g --rows /tmp/g/rows.jsonl

The target is a random-weight Llama written to ``--work`` (no hub, no tokenizer): ``1b`` has
Llama-3.2-1B's shapes (16 layers, H=2048, vocab 128256, tied), ``tiny`` is 8 layers of H=64.
Rows (one JSON object per line, appended as each finishes, so a timed-out run keeps its rows):

- numerics: one forward of T tokens through the eyas engine's ``Transformer`` and through
  transformers' ``LlamaForCausalLM`` on the same device, fp32 and bf16. Relative L2 error of the
  logits against transformers fp32, and top-1 agreement. fp32 passes under 1e-4; eyas bf16
  passes within 2x of transformers' own bf16 error (bf16 rounding, not a wrong kernel).
- decode: the eyas engine plain vs EAGLE-3 with a random head (chain 3/1/4, tree 5/4/8), C
  requests of N tokens together (``bench/decode_speed.eyas_generate``). Per round: t_1 (one
  plain decode step), t_verify, t_draft per step, and the acceptance length at which EAGLE-3's
  round pays for itself, ``(t_verify + S * t_draft) / t_1``. A random head accepts about
  nothing, so these are costs, not speed-ups.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/decode_speed.py

SIZES = {  # LlamaConfig fields
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "max_position_embeddings": 4096, "tie_word_embeddings": True,
           "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 8,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
             "max_position_embeddings": 512, "tie_word_embeddings": True},
}
SETTINGS = {"chain 3/1/4": (3, 1, 4), "tree 5/4/8": (5, 4, 8)}  # S steps, K top-k, D tree tokens


def append_row(rows: Path, section: str, check: str, result: str, ok: bool | None = None) -> None:
    """One table row, appended and flushed at once."""
    with rows.open("a") as f:
        f.write(json.dumps({"section": section, "check": check, "result": result, "ok": ok}) + "\n")
    print(f"[gpu_check] {section:9s} {check:34s} {result}", flush=True)


def make_target(directory: Path, size: str, device: str) -> Path:
    """A random-weight Llama (bf16 on disk) in ``directory``; returns it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (directory / "config.json").is_file():
        return directory
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SIZES[size])).to(torch.bfloat16)
    model.save_pretrained(str(directory))
    return directory


def make_draft(target: Path, directory: Path) -> Path:
    """A random EAGLE-3 head for ``target`` (default aux layers, 32k draft vocab) in ``directory``."""
    from eyas.draft.model import DraftConfig, Eagle3Draft
    from eyas.draft.vocab import build_vocab_mapping
    from eyas.export.writer import save_draft

    config = DraftConfig.from_target_config(json.loads((target / "config.json").read_text()), 32000)
    torch.manual_seed(1)
    draft = Eagle3Draft(config)
    counts = torch.randint(0, 1000, (config.vocab_size,))
    draft.set_vocab_mapping(*build_vocab_mapping(counts, config.draft_vocab_size))
    save_draft(draft, directory, dtype="bfloat16")
    return directory


@torch.no_grad()
def eyas_logits(target: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ids (1, T) -> the eyas engine's logits (T, V) fp32, one causal forward."""
    from eyas.engine.kv_cache import cache_attention_mask
    from eyas.engine.model import Transformer

    model = Transformer.from_pretrained(target, dtype, ids.device)
    T, dev = ids.shape[1], ids.device
    pos, slot = torch.arange(T, device=dev)[None], torch.zeros(1, dtype=torch.long, device=dev)
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None]  # (1, T, T)
    mask = cache_attention_mask(slot, causal, T)  # (1, T, T)
    logits, _ = model(ids, pos, model.new_cache(1, T), slot, pos, mask)
    return logits[0].float()


@torch.no_grad()
def hf_logits(target: Path, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ids (1, T) -> transformers' logits (T, V) fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype).to(ids.device).eval()
    return model(ids).logits[0].float()


def compare(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, top-1 agreement) of logits (T, V) against a reference (T, V)."""
    rel = ((got - ref).norm() / ref.norm()).item()
    return rel, (got.argmax(-1) == ref.argmax(-1)).float().mean().item()


def numerics(target: Path, device: str, tokens: int, rows: Path) -> None:
    """The numerics rows: eyas and transformers, fp32 and bf16, against transformers fp32."""
    gen = torch.Generator().manual_seed(2)
    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, vocab, (1, tokens), generator=gen).to(device)
    ref = hf_logits(target, ids, torch.float32)
    hf_bf16, _ = compare(hf_logits(target, ids, torch.bfloat16), ref)
    append_row(rows, "numerics", "transformers bf16 vs fp32", f"rel {hf_bf16:.2e}")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rel, top1 = compare(eyas_logits(target, ids, dtype), ref)
        bound = 1e-4 if dtype == torch.float32 else 2 * hf_bf16
        append_row(rows, "numerics", f"eyas {name} vs transformers fp32",
                   f"rel {rel:.2e} (<= {bound:.1e}), top-1 {100 * top1:.1f}%", rel <= bound)


def decode_costs(target: Path, draft: Path, device: str, concurrency: list[int], tokens: int,
                 rows: Path) -> None:
    """The decode rows: eyas plain, then EAGLE-3 per setting, at each concurrency."""
    from decode_speed import eyas_generate
    from eyas.engine.engine import Engine, SpecConfig

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    engines = {"plain": (Engine(str(target), device=device, dtype=dtype,
                                max_batch_size=max(concurrency)), None)}
    for name, knobs in SETTINGS.items():
        engines[f"eagle3 {name}"] = (Engine(str(target), SpecConfig(str(draft), *knobs),
                                            device=device, dtype=dtype,
                                            max_batch_size=max(concurrency)), knobs)
    for c in concurrency:
        gen = torch.Generator().manual_seed(c)
        prompts = [torch.randint(3, vocab, (tokens,), generator=gen).tolist() for _ in range(c)]
        t_1 = 0.0
        for name, (engine, knobs) in engines.items():
            engine.record_phases = True
            eyas_generate(engine, [prompts[:1]], 4)  # warm-up
            start = time.perf_counter()
            extra = eyas_generate(engine, [prompts], tokens)
            rate = c * tokens / (time.perf_counter() - start)
            if knobs is None:
                t_1 = extra["decode"]
                result = f"{rate:8.1f} tok/s  t_1 {1000 * t_1:.2f} ms"
            else:
                result = round_costs(extra, knobs[0], t_1, rate)
            append_row(rows, "decode", f"{name} C={c}", result)


def round_costs(extra: dict[str, float], steps: int, t_1: float, rate: float) -> str:
    """An EAGLE-3 row: tok/s, t_verify, t_draft per step, break-even acceptance length, tau."""
    t_verify, t_draft = extra["verify"], extra["draft"] / steps
    break_even = (t_verify + steps * t_draft) / t_1
    return (f"{rate:8.1f} tok/s  t_verify {1000 * t_verify:.2f} ms  t_draft "
            f"{1000 * t_draft:.2f} ms/step  break-even tau {break_even:.2f} (tau {extra['tau']:.2f})")


def junit_rows(junit: Path) -> list[dict[str, Any]]:
    """One row per test case of a pytest junit XML file."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")),
                       "passed")
        why = next((child.get("message", "") for child in case if child.tag == "skipped"), "")
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        out.append({"section": "gpu tests", "check": name,
                    "result": f"{outcome} {why[:60]}".strip(),
                    "ok": None if outcome == "skipped" else outcome == "passed"})
    return out


def print_table(rows: list[dict[str, Any]]) -> bool:
    """Print the one table; returns whether nothing failed."""
    width = max([len(r["check"]) for r in rows] + [5])
    print(f"\n{'section':10s} {'check':{width}s} {'ok':4s} result")
    for r in rows:
        mark = {True: "ok", False: "FAIL", None: ""}[r["ok"]]
        print(f"{r['section']:10s} {r['check']:{width}s} {mark:4s} {r['result']}")
    return not any(r["ok"] is False for r in rows)


def table(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for line in args.rows.read_text().splitlines()] if args.rows.is_file() else []
    if args.junit is not None and args.junit.is_file():
        rows += junit_rows(args.junit)
    for step in args.step:
        name, _, rc = step.partition("=")
        rows.append({"section": "step", "check": name, "result": f"exit {rc}", "ok": rc == "0"})
    return 0 if print_table(rows) else 1


def run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (use --device cpu --size tiny "
                         "for the dry run)")
    args.work.mkdir(parents=True, exist_ok=True)
    target = make_target(args.work / f"llama-{args.size}", args.size, args.device)
    draft = make_draft(target, args.work / f"draft-{args.size}")
    numerics(target, args.device, args.tokens, args.rows)
    decode_costs(target, draft, args.device, args.concurrency, args.tokens, args.rows)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="build the random target and head, append the rows")
    r.add_argument("--device", default="cuda")
    r.add_argument("--size", choices=sorted(SIZES), default="1b")
    r.add_argument("--work", type=Path, required=True, help="folder for the random target and head")
    r.add_argument("--rows", type=Path, required=True, help="JSON lines file the rows go to")
    r.add_argument("--tokens", type=int, default=128, help="prompt and output tokens per request")
    r.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    t = sub.add_parser("table", help="print the rows and the tests' results as one table")
    t.add_argument("--rows", type=Path, required=True)
    t.add_argument("--junit", type=Path, default=None)
    t.add_argument("--step", action="append", default=[], help="NAME=EXIT_CODE of a step")
    args = parser.parse_args()
    return run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    sys.exit(main())

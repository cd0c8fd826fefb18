"""Peak memory of feature capture on CPU: every hidden state vs the three hooked aux layers.

Rows, each measured in a fresh subprocess on the same seeded random Llama decoder stack:
(a) the baseline, the capture before hooks: ``model(..., output_hidden_states=True)`` keeps all
N + 1 hidden states (B, T, H) alive until the aux layers and the final state are picked out;
(b) ``eyas.features.capture.capture_batch``: forward hooks keep only the three aux layer
outputs, and the final norm's output is ``last_hidden_state``.

Each child builds the model, runs a 16-token warm-up forward, reads its resident memory (the
baseline), captures one batch of ``--seq`` random tokens and reads its peak resident memory
(``getrusage`` ru_maxrss). The table shows the peak growth over the loaded model, the hidden
states each row must hold at its peak, and the ratio of (a) to (b); both rows print a checksum of
the captured features, which must agree.

    .venv/bin/python bench/capture_memory.py                    # 32 layers, hidden 512, seq 2048
    .venv/bin/python bench/capture_memory.py --layers 16 --seq 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from eyas.draft.model import aux_ids_to_hidden_states_indices  # noqa: E402
from eyas.features.capture import capture_batch, pad_right, resolve_aux_layer_ids  # noqa: E402

VARIANTS = {"all_states": "(a) output_hidden_states=True (baseline)",
            "hooks": "(b) eyas capture_batch: 3 hooked layers + final norm"}
MIB = 1 << 20


def page_rss_bytes() -> int:
    """This process's resident memory now (/proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(args: argparse.Namespace) -> Any:
    """A seeded random Llama decoder stack (no lm_head) in ``args.dtype``, in eval mode."""
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 3, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 128, vocab_size=args.vocab,
                      max_position_embeddings=args.seq)
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, args.dtype))
    return LlamaModel(cfg).eval()


@torch.no_grad()
def capture_all_states(model: Any, seqs: list[list[int]], indices: list[int],
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The capture before hooks (the baseline): all N + 1 states are alive at once."""
    ids, mask = pad_right(seqs, device)  # (B, T), (B, T)
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    aux = torch.cat([out.hidden_states[i] for i in indices], dim=-1)  # (B, T, 3H)
    hidden = out.last_hidden_state  # (B, T, H)
    return [(aux[b, : len(s)], hidden[b, : len(s)]) for b, s in enumerate(seqs)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this process; its memory figures and a checksum of its features."""
    torch.set_num_threads(args.threads)
    model = build_model(args)
    indices = aux_ids_to_hidden_states_indices(resolve_aux_layer_ids(None, args.layers))
    capture = capture_batch if args.variant == "hooks" else capture_all_states
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).tolist()
    capture(model, [s[:16] for s in seqs], indices, device)  # warm-up: kernels, allocator
    base = page_rss_bytes()
    rows = capture(model, seqs, indices, device)
    peak = peak_rss_bytes()
    checksum = sum(float(a.double().sum() + h.double().sum()) for a, h in rows)
    return {"variant": args.variant, "base_mib": base / MIB, "peak_mib": peak / MIB,
            "growth_mib": (peak - base) / MIB, "checksum": checksum,
            "attn": model.config._attn_implementation}


def run_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """``measure`` for ``variant`` in a fresh Python process (a clean peak-RSS counter)."""
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--seq", str(args.seq), "--batch", str(args.batch),
           "--vocab", str(args.vocab), "--dtype", args.dtype, "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def states_mib(args: argparse.Namespace, n_states: int) -> float:
    """Memory of ``n_states`` hidden states (B, T, H) in ``args.dtype``."""
    itemsize = torch.tensor([], dtype=getattr(torch, args.dtype)).element_size()
    return n_states * args.batch * args.seq * args.hidden * itemsize / MIB


def print_table(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    """The rows, what each keeps at its peak, and the ratio against the baseline (a)."""
    kept = {"all_states": args.layers + 1, "hooks": 4}
    print(f"random Llama: {args.layers} layers, hidden {args.hidden}, batch {args.batch} x seq "
          f"{args.seq}, {args.dtype}, attention {results['hooks']['attn']}, "
          f"{args.threads} thread(s)")
    print(f"{'variant':<52} {'model MiB':>9} {'peak MiB':>9} {'growth MiB':>10} "
          f"{'states MiB':>10} {'checksum':>14}")
    for name, label in VARIANTS.items():
        r = results[name]
        print(f"{label:<52} {r['base_mib']:>9.0f} {r['peak_mib']:>9.0f} {r['growth_mib']:>10.0f} "
              f"{states_mib(args, kept[name]):>10.0f} {r['checksum']:>14.6g}")
    base, hooks = results["all_states"]["growth_mib"], results["hooks"]["growth_mib"]
    print(f"peak growth (a) / (b): {base / max(hooks, 1e-9):.2f}x "
          f"({base - hooks:.0f} MiB less with hooks)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512, help="a multiple of 128")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    results = {name: run_child(name, args) for name in VARIANTS}
    print_table(args, results)


if __name__ == "__main__":
    main()

"""Summed statistics -> the acceptance report (JSON) and its side-by-side table."""

from __future__ import annotations

from typing import Any


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def drafter_report(walks: dict[str, dict[str, Any]], depth: int) -> dict[str, Any]:
    """tau per chain depth, and the per-position acceptance of the deepest chain (P(guess j
    accepted | guesses before it accepted)) with its unconditional rate (accepted / rounds)."""
    deepest = walks[str(depth)]
    return {
        "tau": {str(d): _ratio(walks[str(d)]["tokens"], walks[str(d)]["rounds"]) for d in range(1, depth + 1)},
        "accept_rate": [_ratio(a, r) for a, r in zip(deepest["accepted"], deepest["reached"], strict=True)],
        "accept_rate_per_round": [_ratio(a, deepest["rounds"]) for a in deepest["accepted"]],
        "rounds": {str(d): walks[str(d)]["rounds"] for d in range(1, depth + 1)},
    }


def summarize(stats: dict[str, Any], depth: int) -> dict[str, Any]:
    """The report: per reference, per drafter, tau at each depth and acceptance per position;
    the teacher-forced TTT accuracy per step; how often the data equals the target's argmax."""
    return {
        "depths": list(range(1, depth + 1)),
        "rows": stats["rows"],
        "reply_tokens": stats["reply_tokens"],
        "data_equals_target_argmax": _ratio(stats["argmax_agree"], stats["argmax_total"]),
        "ttt_acc": [_ratio(h, c) for h, c in zip(stats["ttt_hits"], stats["ttt_counts"], strict=True)],
        "references": {ref: {name: drafter_report(walks, depth) for name, walks in by_name.items()}
                       for ref, by_name in stats["walks"].items()},
    }


def format_table(report: dict[str, Any]) -> str:
    """tau per depth and acceptance per position, EAGLE-3 head vs n-gram, for each reference."""
    lines = [f"rows {report['rows']}, reply tokens {report['reply_tokens']}, data == target argmax "
             f"{report['data_equals_target_argmax']}",
             "ttt_acc (teacher forced): " + " ".join(f"{a}" for a in report["ttt_acc"]),
             "tau: tokens per target verification with chains of depth k (1 = no drafting); head+ngram "
             "verifies both chains at once (the engine's ngram_tokens option), head+ngram+corpus also the "
             "chain of the draft's n-gram store of the training replies (corpus_tokens); "
             f"acc_k: P(guess k accepted | guesses before it were), chains of depth {report['depths'][-1]}"]
    for ref, drafters in report["references"].items():
        corpus = "head+ngram+corpus" in drafters  # the draft dir has an n-gram store
        lines.append(f"reference = {ref}")
        lines.append(f"  {'k':>2}  {'tau head':>9} {'tau ngram':>9} {'tau head+ngram':>14}  "
                     + (f"{'tau corpus':>10} {'tau head+ngram+corpus':>21}  " if corpus else "")
                     + f"{'acc_k head':>10} {'acc_k ngram':>11}")
        for i, d in enumerate(report["depths"]):
            head, ngram, both = drafters["head"], drafters["ngram"], drafters["head+ngram"]
            extra = (f"{drafters['corpus']['tau'][str(d)]!s:>10} "
                     f"{drafters['head+ngram+corpus']['tau'][str(d)]!s:>21}  " if corpus else "")
            lines.append(f"  {d:>2}  {head['tau'][str(d)]!s:>9} {ngram['tau'][str(d)]!s:>9} "
                         f"{both['tau'][str(d)]!s:>14}  {extra}{head['accept_rate'][i]!s:>10} "
                         f"{ngram['accept_rate'][i]!s:>11}")
    return "\n".join(lines)

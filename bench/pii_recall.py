"""Recall and precision per info type of the local PII detector, and its false redactions.

    nice -n 19 .venv/bin/python bench/pii_recall.py [--n 1500] [--min-score 0.4] [--dataset FILE.json]

The labelled set is generated deterministically from the shared assets' PII folder (presidio
templates + our own contexts, FakeNameGenerator identities, every card brand and length,
international phone formats; ``eyas.pii.synth``); ``--dataset`` scores a presidio-research JSON
file instead. False redactions are counted on ``--sft-n`` sentences of the SFT and prompt sets,
which hold no personal data, and reported per 1,000 sentences. The detector looks for the default
info types (``PiiConfig().info_types``); ``--all`` adds every other type it supports (URL, ...).
Only counts are printed, never a matched value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")  # no suffix-list download

from eyas.assets import assets_root  # noqa: E402
from eyas.pii.config import PiiConfig  # noqa: E402
from eyas.pii.evaluate import false_redactions, pooled_recall, recall_per_entity  # noqa: E402
from eyas.pii.local import LocalPiiBackend, local_info_types  # noqa: E402
from eyas.pii.synth import NER_TYPES, STRUCTURED_TYPES, labelled_sentences, sft_sentences  # noqa: E402


def fmt(value: float) -> str:
    return "   -" if math.isnan(value) else f"{value:4.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--n", type=int, default=1500, help="generated labelled sentences")
    parser.add_argument("--sft-n", type=int, default=1000, help="non-PII sentences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-score", type=float, nargs="+", default=[PiiConfig().min_score])
    parser.add_argument("--all", action="store_true", help="every type the detector supports")
    args = parser.parse_args(argv)
    root = assets_root()
    if root is None:
        parser.error("the shared asset folder was not found: set EYAS_ASSETS")
    if args.dataset is not None:
        samples = json.loads(args.dataset.read_text(encoding="utf-8"))
    else:
        samples = labelled_sentences(root, args.n, args.seed)
    sentences = sft_sentences(root, args.sft_n, args.seed)
    types = sorted(set(local_info_types()) | set(PiiConfig().info_types)) if args.all \
        else PiiConfig().info_types

    for min_score in args.min_score:
        backend = LocalPiiBackend(PiiConfig(info_types=types, min_score=min_score))
        t0 = time.perf_counter()
        report = recall_per_entity(backend, samples)
        ms = (time.perf_counter() - t0) * 1000 / len(samples)
        false = false_redactions(backend, sentences)
        print(f"\nmin_score={min_score}, NER model: {getattr(backend, 'ner_model', None) or 'none'}; "
              f"{len(samples)} labelled sentences ({ms:.1f} ms each, {1000 / ms:.0f}/s), "
              f"{len(sentences)} non-PII sentences")
        print(f"{'info type':<46} {'support':>7} {'recall':>6} {'prec':>6} {'pred':>5} {'false/1k':>8}")
        for t in sorted(set(report) | set(false)):
            row = report.get(t, {"recall": math.nan, "precision": math.nan, "support": 0.0, "predicted": 0.0})
            per_1k = 1000 * false.get(t, 0) / max(len(sentences), 1)
            print(f"{t:<46} {int(row['support']):7d} {fmt(row['recall']):>6} {fmt(row['precision']):>6} "
                  f"{int(row['predicted']):5d} {per_1k:8.1f}")
        predicted = sum(r["predicted"] for r in report.values())
        correct = sum(r["precision"] * r["predicted"] for r in report.values() if r["predicted"])
        print(f"structured recall (pooled over {', '.join(STRUCTURED_TYPES)}): "
              f"{pooled_recall(report, STRUCTURED_TYPES):.3f}")
        for t in NER_TYPES:
            print(f"{t} recall: {fmt(report.get(t, {'recall': math.nan})['recall'])}")
        print(f"precision over all predicted spans: {correct / predicted if predicted else math.nan:.3f}; "
              f"false redactions per 1,000 non-PII sentences: "
              f"{1000 * sum(false.values()) / max(len(sentences), 1):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

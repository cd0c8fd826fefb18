"""Recall and precision per info type of the local PII detector on presidio-research sentences.

    .venv/bin/python bench/pii_recall.py [DATASET.json] [--min-score 0.5 0.4]

DATASET defaults to the shared assets' ``datasets/pii/presidio_generated_small.json``. The
detector looks for every type it supports (URL included), once per ``--min-score``, and the
thresholds are printed side by side. Only counts are printed, never a matched value.
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
from eyas.pii.evaluate import recall_per_entity  # noqa: E402
from eyas.pii.local import LocalPiiBackend, local_info_types  # noqa: E402

DATASET = Path("datasets") / "pii" / "presidio_generated_small.json"


def default_dataset() -> Path | None:
    root = assets_root()
    return root / DATASET if root is not None else None


def fmt(value: float) -> str:
    return "   -" if math.isnan(value) else f"{value:4.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", nargs="?", type=Path, default=default_dataset())
    parser.add_argument("--min-score", type=float, nargs="+", default=[0.5, 0.4])
    args = parser.parse_args(argv)
    if args.dataset is None or not args.dataset.is_file():
        parser.error(f"dataset {args.dataset} not found: pass the path of a presidio-research "
                     "generated JSON file (or set EYAS_ASSETS)")
    samples = json.loads(args.dataset.read_text(encoding="utf-8"))

    reports = {}
    for min_score in args.min_score:
        backend = LocalPiiBackend(PiiConfig(info_types=local_info_types(), min_score=min_score))
        t0 = time.perf_counter()
        reports[min_score] = recall_per_entity(backend, samples)
        ms = (time.perf_counter() - t0) * 1000 / len(samples)
        print(f"min_score={min_score}: {ms:.1f} ms per sentence")

    types = sorted({t for report in reports.values() for t in report})
    print(f"\n{args.dataset.name}: {len(samples)} sentences; R recall, P precision, "
          "n predicted spans, each at min_score @s\n")
    head = "".join(f" {'R@' + str(s):>6} {'P@' + str(s):>6} {'n@' + str(s):>6}" for s in reports)
    print(f"{'info type':<28} {'support':>7}{head}")
    for t in types:
        support = next(int(r[t]["support"]) for r in reports.values() if t in r)
        cells = ""
        for report in reports.values():
            row = report.get(t, {"recall": math.nan, "precision": math.nan, "predicted": 0.0})
            recall, precision = fmt(row["recall"]), fmt(row["precision"])
            cells += f" {recall:>6} {precision:>6} {int(row['predicted']):6d}"
        print(f"{t:<28} {support:7d}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

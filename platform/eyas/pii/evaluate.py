"""Recall and precision of a PII backend per info type on labelled sentences.

Samples follow presidio-research's generated format: ``{"full_text": str, "spans":
[{"entity_type", "start_position", "end_position", ...}]}``. Labels are mapped to the canonical
(Cloud DLP) names; a labelled type the backend never finds (names, addresses with the local
detector) is reported with recall 0 so a gap is visible rather than hidden.

Matching is by overlap: a labelled span counts as found when a predicted span of the same type
overlaps it, which is what matters for redaction (any overlap hides most of the value).
Predictions are first merged like the scrubber merges them (``merge_findings``), so an e-mail's
domain is not counted as a separate URL false positive.
"""

from __future__ import annotations

from typing import Any

from eyas.pii.base import PiiBackend, Span, merge_findings
from eyas.pii.local import PRESIDIO_TO_CANONICAL

# presidio-research labels that are not presidio entity names, mapped onto Cloud DLP names.
DATASET_TO_CANONICAL = {
    **PRESIDIO_TO_CANONICAL,
    "ADDRESS": "STREET_ADDRESS",
    # The generator's DOMAIN_NAME values are full URLs ("http://www.example.co.uk/").
    "DOMAIN_NAME": "URL",
    # Honorifics/job titles ("Mr.", "Dr."); Cloud DLP has no such type, the name is kept.
    "TITLE": "TITLE",
}


def canonical_label(entity_type: str) -> str:
    """The canonical info type of a dataset label (unknown labels are kept as they are)."""
    return DATASET_TO_CANONICAL.get(entity_type, entity_type)


def _overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    return a_start < b_end and b_start < a_end


def _gold_spans(sample: dict[str, Any], index: int) -> list[tuple[str, int, int]]:
    try:
        return [
            (canonical_label(s["entity_type"]), int(s["start_position"]), int(s["end_position"]))
            for s in sample["spans"]
        ]
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"sample #{index} is not in presidio-research format (full_text, spans[entity_type, "
            f"start_position, end_position]): missing {exc}"
        ) from exc


def _count(
    gold: list[tuple[str, int, int]], pred: list[Span], counts: dict[str, list[int]]
) -> None:
    # counts[type] = [support, found (recall numerator), predicted, correct predictions]
    for info_type, start, end in gold:
        row = counts.setdefault(info_type, [0, 0, 0, 0])
        row[0] += 1
        row[1] += any(p.label == info_type and _overlaps(start, end, p.start, p.end) for p in pred)
    for p in pred:
        row = counts.setdefault(p.label, [0, 0, 0, 0])
        row[2] += 1
        row[3] += any(t == p.label and _overlaps(s, e, p.start, p.end) for t, s, e in gold)


def recall_per_entity(backend: PiiBackend, samples: list[dict]) -> dict[str, dict[str, float]]:
    """Per canonical type: ``recall``, ``precision``, ``support`` (labelled spans), ``predicted``.

    Recall is NaN for a type with no labelled span, precision NaN for a type never predicted.
    """
    texts = [sample["full_text"] for sample in samples]
    findings = backend.find(texts)
    counts: dict[str, list[int]] = {}
    for i, (sample, text_findings) in enumerate(zip(samples, findings, strict=True)):
        _count(_gold_spans(sample, i), merge_findings(text_findings), counts)
    nan = float("nan")
    return {
        info_type: {
            "recall": found / support if support else nan,
            "precision": correct / predicted if predicted else nan,
            "support": float(support),
            "predicted": float(predicted),
        }
        for info_type, (support, found, predicted, correct) in sorted(counts.items())
    }


def pooled_recall(report: dict[str, dict[str, float]], info_types: list[str] | tuple[str, ...]) -> float:
    """Recall over every labelled span of ``info_types`` together (micro average)."""
    support = sum(report[t]["support"] for t in info_types if t in report)
    found = sum(report[t]["recall"] * report[t]["support"] for t in info_types
                if t in report and report[t]["support"])
    return found / support if support else float("nan")


def false_redactions(backend: PiiBackend, sentences: list[str]) -> dict[str, int]:
    """Spans the scrubber would redact per info type in text known to hold no personal data."""
    counts: dict[str, int] = {}
    for text_findings in backend.find(sentences):
        for span in merge_findings(text_findings):
            counts[span.label] = counts.get(span.label, 0) + 1
    return dict(sorted(counts.items()))

"""Findings, the detector interface, and the policy that turns findings into scrubbed text.

A backend returns, for each text, the PII it found as ``Finding``s: an info type, character
offsets and a score, never the matched value. Nothing here logs or stores a matched value:
reports only count hits per info type, so PII stays inside the dataset it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from eyas.pii.config import PiiConfig, Policy


class PiiBackendError(RuntimeError):
    """A detector failed (service unreachable, quota, bad response); the message says what to do."""


class PiiAuthError(PiiBackendError):
    """A detector refused our credentials; the message names the project and credentials."""


@dataclass(frozen=True)
class Finding:
    """One detected span: ``text[start:end]`` (character offsets) is of ``info_type``."""

    info_type: str
    start: int
    end: int
    score: float


class PiiBackend(Protocol):
    """A PII detector: one list of findings per input text, in input order."""

    def find(self, texts: list[str]) -> list[list[Finding]]: ...


@dataclass(frozen=True)
class Span:
    """Overlapping findings merged into one region; ``label`` is the strongest finding's type."""

    start: int
    end: int
    label: str
    info_types: frozenset[str]


@dataclass
class ScrubbedConversation:
    """A conversation after the policy: redacted messages, hit counts, and drop reasons.

    ``drop_types`` non-empty means the conversation must be dropped; its messages are still
    redacted so that a caller who writes it anyway leaks nothing.
    """

    messages: list[dict[str, str]]
    hits: dict[str, int] = field(default_factory=dict)
    drop_types: list[str] = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        return bool(self.drop_types)

    @property
    def reason(self) -> str:
        """Why the conversation was dropped (info types only, never values); "" if kept."""
        return f"contains PII of type {', '.join(self.drop_types)}" if self.drop_types else ""


def placeholder(info_type: str) -> str:
    """The text that replaces a redacted span, e.g. ``[EMAIL_ADDRESS]``."""
    return f"[{info_type}]"


def _strongest(findings: list[Finding]) -> Finding:
    # Highest score wins; a tie goes to the longer span (an e-mail beats the domain inside it),
    # then to the type name so the result does not depend on backend order.
    return max(findings, key=lambda f: (f.score, f.end - f.start, f.info_type))


def merge_findings(findings: list[Finding]) -> list[Span]:
    """Merge overlapping findings of one text into disjoint spans, sorted by start.

    Spans that merely touch (``a.end == b.start``) stay separate so each keeps its own label.
    """
    spans: list[Span] = []
    group: list[Finding] = []
    group_end = -1
    for f in sorted(findings, key=lambda f: (f.start, -f.end)):
        if group and f.start >= group_end:
            spans.append(_span_of(group))
            group = []
        group.append(f)
        group_end = max(group_end, f.end) if len(group) > 1 else f.end
    if group:
        spans.append(_span_of(group))
    return spans


def _span_of(group: list[Finding]) -> Span:
    return Span(
        start=min(f.start for f in group),
        end=max(f.end for f in group),
        label=_strongest(group).info_type,
        info_types=frozenset(f.info_type for f in group),
    )


def check_findings(text_index: int, text: str, findings: list[Finding]) -> None:
    """Raise if a backend returned offsets outside its text (a backend bug, never PII)."""
    for f in findings:
        if not 0 <= f.start < f.end <= len(text):
            raise PiiBackendError(
                f"text #{text_index} (length {len(text)}): finding {f.info_type} has offsets "
                f"[{f.start}, {f.end}) outside the text; the backend mis-mapped its offsets"
            )


def redact(text: str, spans: list[Span]) -> str:
    """Replace each span of ``text`` by its label's placeholder (spans disjoint and sorted)."""
    pieces: list[str] = []
    pos = 0
    for span in spans:
        pieces.append(text[pos : span.start])
        pieces.append(placeholder(span.label))
        pos = span.end
    pieces.append(text[pos:])
    return "".join(pieces)


def _span_policy(span: Span, cfg: PiiConfig) -> Policy:
    # The stricter policy wins inside a merged span: a drop-type hit must not escape the drop
    # just because an overlapping finding of another type scored higher.
    policies = {cfg.policy_for(t) for t in span.info_types}
    return "drop" if "drop" in policies else "redact"


def apply_policy(
    messages: list[dict[str, str]], findings: list[list[Finding]], cfg: PiiConfig
) -> ScrubbedConversation:
    """Apply ``cfg``'s policy to one conversation given the findings of each message's content."""
    out_messages: list[dict[str, str]] = []
    hits: dict[str, int] = {}
    drop_types: set[str] = set()
    for message, message_findings in zip(messages, findings, strict=True):
        spans = merge_findings(message_findings)
        for span in spans:
            hits[span.label] = hits.get(span.label, 0) + 1
            if _span_policy(span, cfg) == "drop":
                drop_types.update(t for t in span.info_types if cfg.policy_for(t) == "drop")
        out_messages.append({**message, "content": redact(message["content"], spans)})
    return ScrubbedConversation(
        messages=out_messages, hits=dict(sorted(hits.items())), drop_types=sorted(drop_types)
    )


def _contents(conversations: list[list[dict[str, str]]]) -> list[str]:
    texts: list[str] = []
    for ci, conversation in enumerate(conversations):
        for mi, message in enumerate(conversation):
            content = message.get("content")
            if not isinstance(content, str):
                raise TypeError(
                    f"conversation #{ci}, message #{mi}: content is {type(content).__name__}, "
                    "expected str; normalize messages to {'role': ..., 'content': str} first"
                )
            texts.append(content)
    return texts


def scrub_conversations(
    conversations: list[list[dict[str, str]]], backend: PiiBackend, cfg: PiiConfig
) -> list[ScrubbedConversation]:
    """Detect PII in every message of a batch and apply the policy per conversation.

    All message contents go to the backend in one ``find`` call: a remote detector then packs
    them into as few requests as its limits allow.
    """
    texts = _contents(conversations)
    findings = backend.find(texts)
    if len(findings) != len(texts):
        raise PiiBackendError(
            f"backend {type(backend).__name__} returned {len(findings)} results for "
            f"{len(texts)} texts; it must return one list of findings per text"
        )
    for i, (text, text_findings) in enumerate(zip(texts, findings, strict=True)):
        check_findings(i, text, text_findings)
    results: list[ScrubbedConversation] = []
    pos = 0
    for conversation in conversations:
        n = len(conversation)
        results.append(apply_policy(conversation, findings[pos : pos + n], cfg))
        pos += n
    return results


def total_hits(results: list[ScrubbedConversation]) -> dict[str, int]:
    """Hits per info type summed over conversations: what a stage report may contain."""
    totals: dict[str, int] = {}
    for result in results:
        for info_type, count in result.hits.items():
            totals[info_type] = totals.get(info_type, 0) + count
    return dict(sorted(totals.items()))


def build_backend(cfg: PiiConfig) -> PiiBackend | None:
    """The detector named by ``cfg.backend`` (heavy setup happens here), or None for "none"."""
    if cfg.backend == "none":
        return None
    if cfg.backend == "local":
        from eyas.pii.local import LocalPiiBackend

        return LocalPiiBackend(cfg)
    if cfg.backend == "dlp":
        from eyas.pii.dlp import DlpPiiBackend

        return DlpPiiBackend(cfg)
    raise ValueError(f"pii.backend {cfg.backend!r} is not one of 'local', 'dlp', 'none'")

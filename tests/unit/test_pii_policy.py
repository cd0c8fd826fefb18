"""PII policy: merging findings, redact/drop, batching into one find call, config validation.

A stub backend returns hand-placed findings, so these tests need no detector.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from eyas.config import ConfigError, validate_config
from eyas.pii.base import (
    Finding,
    PiiBackendError,
    Span,
    build_backend,
    merge_findings,
    redact,
    scrub_conversations,
    total_hits,
)
from eyas.pii.config import DlpConfig, PiiConfig
from eyas.pii.evaluate import recall_per_entity


class StubBackend:
    """Finds fixed substrings; records every call's texts."""

    def __init__(self, needles: dict[str, str]) -> None:
        self.needles = needles  # substring -> info type
        self.calls: list[list[str]] = []

    def find(self, texts: list[str]) -> list[list[Finding]]:
        self.calls.append(list(texts))
        out = []
        for text in texts:
            found = []
            for needle, info_type in self.needles.items():
                start = text.find(needle)
                while start >= 0:
                    found.append(Finding(info_type, start, start + len(needle), 0.9))
                    start = text.find(needle, start + 1)
            out.append(found)
        return out


EMAIL = "ada@example.org"
SSN = "078-05-1120"
CFG = PiiConfig(info_types=["EMAIL_ADDRESS", "US_SOCIAL_SECURITY_NUMBER", "URL"])


def conv(*contents: str) -> list[dict[str, str]]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


def test_merge_findings_overlapping_nested_and_touching():
    findings = [
        Finding("URL", 4, 15, 0.5),            # inside the e-mail: merged, e-mail wins
        Finding("EMAIL_ADDRESS", 0, 15, 1.0),
        Finding("PHONE_NUMBER", 15, 20, 0.4),  # touches: stays separate
        Finding("IP_ADDRESS", 30, 40, 0.6),
        Finding("URL", 35, 50, 0.6),           # partial overlap, same score: longer wins
    ]
    assert merge_findings(findings) == [
        Span(0, 15, "EMAIL_ADDRESS", frozenset({"EMAIL_ADDRESS", "URL"})),
        Span(15, 20, "PHONE_NUMBER", frozenset({"PHONE_NUMBER"})),
        Span(30, 50, "URL", frozenset({"IP_ADDRESS", "URL"})),
    ]
    assert merge_findings([]) == []


def test_redact_replaces_spans_with_typed_placeholders():
    text = f"mail {EMAIL} now"
    spans = merge_findings([Finding("EMAIL_ADDRESS", 5, 5 + len(EMAIL), 1.0)])
    assert redact(text, spans) == "mail [EMAIL_ADDRESS] now"


def test_redact_policy_and_hits_and_one_find_call():
    backend = StubBackend({EMAIL: "EMAIL_ADDRESS", SSN: "US_SOCIAL_SECURITY_NUMBER"})
    conversations = [conv(f"I am {EMAIL}", "Noted."), conv("hello"), conv(f"{EMAIL} {SSN} {EMAIL}")]
    out = scrub_conversations(conversations, backend, CFG)
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 4  # every message in one call
    assert out[0].messages == [{"role": "user", "content": "I am [EMAIL_ADDRESS]"},
                               {"role": "assistant", "content": "Noted."}]
    assert out[0].hits == {"EMAIL_ADDRESS": 1} and not out[0].dropped
    assert out[1].messages == conv("hello") and out[1].hits == {}
    assert out[2].messages[0]["content"] == (
        "[EMAIL_ADDRESS] [US_SOCIAL_SECURITY_NUMBER] [EMAIL_ADDRESS]")
    assert out[2].hits == {"EMAIL_ADDRESS": 2, "US_SOCIAL_SECURITY_NUMBER": 1}
    assert total_hits(out) == {"EMAIL_ADDRESS": 3, "US_SOCIAL_SECURITY_NUMBER": 1}


def test_drop_policy_names_types_and_still_redacts():
    cfg = CFG.model_copy(update={"policy": {"US_SOCIAL_SECURITY_NUMBER": "drop"}})
    backend = StubBackend({EMAIL: "EMAIL_ADDRESS", SSN: "US_SOCIAL_SECURITY_NUMBER"})
    out = scrub_conversations([conv("hi", f"SSN {SSN}"), conv(EMAIL)], backend, cfg)
    assert out[0].dropped and out[0].drop_types == ["US_SOCIAL_SECURITY_NUMBER"]
    assert out[0].reason == "contains PII of type US_SOCIAL_SECURITY_NUMBER"
    assert SSN not in out[0].messages[1]["content"]  # a caller writing it anyway leaks nothing
    assert not out[1].dropped and out[1].messages[0]["content"] == "[EMAIL_ADDRESS]"


def test_default_policy_drop_applies_to_unlisted_types():
    cfg = CFG.model_copy(update={"default_policy": "drop", "policy": {"EMAIL_ADDRESS": "redact"}})
    backend = StubBackend({EMAIL: "EMAIL_ADDRESS", SSN: "US_SOCIAL_SECURITY_NUMBER"})
    kept, dropped = scrub_conversations([conv(EMAIL), conv(SSN)], backend, cfg)
    assert not kept.dropped and dropped.drop_types == ["US_SOCIAL_SECURITY_NUMBER"]


def test_stricter_policy_wins_inside_a_merged_span():
    # The URL loses the label to the e-mail, but its drop policy still drops the conversation.
    cfg = CFG.model_copy(update={"policy": {"URL": "drop"}})
    backend = StubBackend({EMAIL: "EMAIL_ADDRESS", "example.org": "URL"})
    (out,) = scrub_conversations([conv(f"to {EMAIL}")], backend, cfg)
    assert out.messages[0]["content"] == "to [EMAIL_ADDRESS]"
    assert out.drop_types == ["URL"] and out.hits == {"EMAIL_ADDRESS": 1}


def test_non_ascii_text_is_redacted_at_character_offsets():
    text = f"Grüße 🙂 — schreib an {EMAIL}, danke"
    backend = StubBackend({EMAIL: "EMAIL_ADDRESS"})
    (out,) = scrub_conversations([conv(text)], backend, CFG)
    assert out.messages[0]["content"] == "Grüße 🙂 — schreib an [EMAIL_ADDRESS], danke"


def test_bad_inputs_and_backend_bugs_raise_clear_errors():
    backend = StubBackend({})
    with pytest.raises(TypeError, match="conversation #0, message #1: content is NoneType"):
        scrub_conversations([[{"role": "user", "content": "x"}, {"role": "assistant"}]],
                            backend, CFG)

    class OffByOne(StubBackend):
        def find(self, texts):
            return [[Finding("EMAIL_ADDRESS", 0, len(t) + 1, 1.0)] for t in texts]

    with pytest.raises(PiiBackendError, match=r"text #0 \(length 3\).*outside the text"):
        scrub_conversations([conv("abc")], OffByOne({}), CFG)

    class TooFew(StubBackend):
        def find(self, texts):
            return []

    with pytest.raises(PiiBackendError, match="returned 0 results for 1 texts"):
        scrub_conversations([conv("abc")], TooFew({}), CFG)


def test_config_validation_names_the_bad_key():
    with pytest.raises(ConfigError, match=r"PHONE_NUMBER.*not in info_types"):
        validate_config(PiiConfig, {"info_types": ["EMAIL_ADDRESS"],
                                    "policy": {"PHONE_NUMBER": "drop"}})
    with pytest.raises(ConfigError, match="dlp.project"):
        validate_config(PiiConfig, {"backend": "dlp"})
    with pytest.raises(ConfigError, match="'email' is not a Cloud DLP info type name"):
        validate_config(PiiConfig, {"info_types": ["email"]})
    with pytest.raises(ConfigError, match="policy.EMAIL_ADDRESS"):
        validate_config(PiiConfig, {"policy": {"EMAIL_ADDRESS": "mask"}})
    with pytest.raises(ConfigError, match="dlp.endpoint"):
        validate_config(PiiConfig, {"backend": "dlp", "dlp": {"endpoint": "http://x/"}})
    with pytest.raises(ConfigError, match="dlp.batch_size"):
        validate_config(PiiConfig, {"dlp": {"batch_size": 60_000}})
    # Valid: a test endpoint needs no project; DLP with a project needs no endpoint.
    validate_config(PiiConfig, {"backend": "dlp", "dlp": {"endpoint": "127.0.0.1:1"}})
    cfg = validate_config(PiiConfig, {"backend": "dlp", "dlp": {"project": "acme-pii"}})
    assert cfg.dlp == DlpConfig(project="acme-pii")
    assert cfg.policy_for("EMAIL_ADDRESS") == "redact"


def test_backend_none_builds_nothing_and_imports_stay_light():
    assert build_backend(PiiConfig(backend="none")) is None
    code = ("import sys, eyas.pii.config, eyas.pii.base, eyas.pii.evaluate, eyas.pii.local, "
            "eyas.pii.dlp; heavy = [m for m in ('presidio_analyzer', 'spacy', 'grpc', "
            "'google.cloud.dlp_v2') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_recall_per_entity_counts_overlaps_and_reports_missed_types():
    samples = [
        {"full_text": f"mail {EMAIL} or Ada Lovelace",
         "spans": [{"entity_type": "EMAIL_ADDRESS", "start_position": 5, "end_position": 20},
                   {"entity_type": "PERSON", "start_position": 24, "end_position": 36}]},
        {"full_text": f"SSN {SSN}", "spans": []},
    ]
    backend = StubBackend({EMAIL: "EMAIL_ADDRESS", "example.org": "URL",
                           SSN: "US_SOCIAL_SECURITY_NUMBER"})
    report = recall_per_entity(backend, samples)
    assert report["EMAIL_ADDRESS"] == {"recall": 1.0, "precision": 1.0, "support": 1.0,
                                       "predicted": 1.0}
    assert report["PERSON_NAME"]["recall"] == 0.0 and math.isnan(report["PERSON_NAME"]["precision"])
    assert "URL" not in report  # merged into the e-mail, as the scrubber would
    ssn = report["US_SOCIAL_SECURITY_NUMBER"]
    assert math.isnan(ssn["recall"]) and ssn["precision"] == 0.0 and ssn["predicted"] == 1.0

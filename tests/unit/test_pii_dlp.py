"""Cloud DLP backend against a local gRPC fake that speaks the real DLP protocol.

The real ``DlpServiceClient`` sends real ``InspectContentRequest`` messages to
``tests/dlp_fake.py`` over an insecure channel: batching, retries, auth errors and offsets on
non-ASCII text are checked end to end without Google.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from dlp_fake import FakeDlpServer
from eyas.pii.base import PiiAuthError, PiiBackendError, build_backend, scrub_conversations
from eyas.pii.config import DlpConfig, PiiConfig
from eyas.pii.dlp import DlpPiiBackend, split_text
from eyas.pii.evaluate import recall_per_entity

EMAIL = "jürgen.müller@exämple.de"
PHONE = "+49 30 1234567"


def dlp_cfg(endpoint: str, **dlp: object) -> PiiConfig:
    """DLP config for the fake: two info types, tiny backoff so retries take milliseconds."""
    section = {"endpoint": endpoint, "initial_backoff_s": 0.001, "max_retries": 3, **dlp}
    return PiiConfig(backend="dlp", info_types=["EMAIL_ADDRESS", "PHONE_NUMBER"],
                     dlp=DlpConfig(**section))


@pytest.fixture
def backend_for():
    """Build DLP backends for a fake and close their channels after the test."""
    made: list[DlpPiiBackend] = []

    def make(fake: FakeDlpServer, max_request_bytes: int | None = None, **dlp: object):
        kwargs = {"max_request_bytes": max_request_bytes} if max_request_bytes else {}
        backend = DlpPiiBackend(dlp_cfg(fake.endpoint, **dlp), **kwargs)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def spans(text: str, findings) -> list[tuple[str, str]]:
    return [(f.info_type, text[f.start : f.end]) for f in findings]


def test_one_table_request_with_config_info_types_and_non_ascii_offsets(backend_for):
    texts = [f"Grüße 🙂 — schreib an {EMAIL} oder ruf {PHONE} an", "nichts hier", "", EMAIL]
    with FakeDlpServer() as fake:
        backend = backend_for(fake, min_likelihood="LIKELY")
        found = backend.find(texts)
    assert spans(texts[0], found[0]) == [("EMAIL_ADDRESS", EMAIL), ("PHONE_NUMBER", PHONE)]
    assert found[1] == [] and found[2] == []
    assert spans(texts[3], found[3]) == [("EMAIL_ADDRESS", EMAIL)]
    (request,) = fake.requests
    assert fake.rows_per_request() == [3]  # the empty text is not sent
    assert [t.name for t in request.inspect_config.info_types] == ["EMAIL_ADDRESS", "PHONE_NUMBER"]
    assert request.inspect_config.min_likelihood.name == "LIKELY"
    assert not request.inspect_config.include_quote
    assert request.parent == "projects/eyas-local/locations/global"


def test_byte_ranges_alone_are_converted_to_characters(backend_for):
    text = f"Ünïcødé 🙂🙂 {EMAIL}"
    with FakeDlpServer(codepoint_ranges=False) as fake:
        (found,) = backend_for(fake).find([text])
    assert spans(text, found) == [("EMAIL_ADDRESS", EMAIL)]


def test_non_ascii_conversation_is_redacted_at_the_right_place(backend_for):
    conversation = [{"role": "user", "content": f"📧 {EMAIL}, Tel. {PHONE} — danke"}]
    with FakeDlpServer() as fake:
        backend = backend_for(fake)
        (out,) = scrub_conversations([conversation], backend, backend.cfg)
    assert out.messages[0]["content"] == "📧 [EMAIL_ADDRESS], Tel. [PHONE_NUMBER] — danke"


def test_batch_size_splits_requests_and_keeps_order(backend_for):
    texts = [f"row {i} mail user{i}@example.com" for i in range(25)]
    with FakeDlpServer() as fake:
        found = backend_for(fake, batch_size=10).find(texts)
    assert fake.rows_per_request() == [10, 10, 5]
    assert [spans(t, f) for t, f in zip(texts, found, strict=True)] == [
        [("EMAIL_ADDRESS", f"user{i}@example.com")] for i in range(25)]


def test_request_bytes_split_batches_and_long_texts_are_chunked(backend_for):
    texts = ["ä" * 300 + f" a{i}@example.com" for i in range(6)]  # ~620 bytes each
    long_text = "ö " * 3000 + EMAIL + " " + "ß" * 2000 + " z@example.com"
    with FakeDlpServer() as fake:
        found = backend_for(fake, max_request_bytes=2048).find(texts + [long_text])
    assert all(sum(len(r.item.table.rows[i].values[0].string_value.encode()) for i in
                   range(len(r.item.table.rows))) <= 2048 for r in fake.requests)
    assert len(fake.requests) > 4
    assert [spans(t, f) for t, f in zip(texts, found[:6], strict=True)] == [
        [("EMAIL_ADDRESS", f"a{i}@example.com")] for i in range(6)]
    assert spans(long_text, found[6]) == [("EMAIL_ADDRESS", EMAIL),
                                          ("EMAIL_ADDRESS", "z@example.com")]


def test_split_text_chunks_cover_the_text_and_fit_the_limit():
    text = "€" * 1000 + "x" * 1000
    chunks = split_text(7, text, max_bytes=1024)
    assert all(len(c.text.encode()) <= 1024 and c.text_index == 7 for c in chunks)
    assert all(text[c.offset : c.offset + len(c.text)] == c.text for c in chunks)
    assert chunks[0].offset == 0 and chunks[-1].offset + len(chunks[-1].text) == len(text)


def test_truncated_findings_are_fetched_again_in_smaller_batches(backend_for):
    texts = [f"u{i}@example.com and v{i}@example.com" for i in range(4)]
    with FakeDlpServer(max_findings=3) as fake:
        found = backend_for(fake).find(texts)
    assert [len(f) for f in found] == [2, 2, 2, 2]
    # 4 rows (8 hits > 3) -> halves of 2 rows (4 hits > 3) -> single rows (2 hits each).
    assert fake.rows_per_request() == [4, 2, 1, 1, 2, 1, 1]


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_transient_failures_are_retried(backend_for, code, caplog):
    caplog.set_level(logging.DEBUG)
    with FakeDlpServer(fail_first=3, fail_code=code) as fake:
        (found,) = backend_for(fake, max_retries=3).find([f"mail {EMAIL}"])
    assert len(found) == 1 and fake.calls == 4
    assert caplog.text.count("retry") == 3 and "retry 3/3" in caplog.text


def test_gives_up_after_max_retries_with_a_clear_error(backend_for):
    with FakeDlpServer(fail_first=100) as fake:
        backend = backend_for(fake, max_retries=2)
        with pytest.raises(PiiBackendError, match=r"after 3 attempts \(503 ServiceUnavailable\)"
                           rf".*endpoint {fake.endpoint}.*max_retries"):
            backend.find(["a@example.com"])
    assert fake.calls == 3


def test_unreachable_endpoint_fails_after_retries():
    from conftest import free_port

    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    backend = DlpPiiBackend(dlp_cfg(endpoint, max_retries=1))
    try:
        with pytest.raises(PiiBackendError, match=f"after 2 attempts.*{endpoint}"):
            backend.find(["a@example.com"])
    finally:
        backend.close()


def test_permission_denied_names_project_and_credentials_without_retrying(backend_for):
    with FakeDlpServer(deny=True) as fake:
        backend = backend_for(fake, project="acme-pii")
        with pytest.raises(PiiAuthError) as info:
            backend.find(["a@example.com"])
    message = str(info.value)
    assert "403 PermissionDenied" in message and "'acme-pii'" in message
    assert "GOOGLE_APPLICATION_CREDENTIALS" in message and "roles/dlp.user" in message
    assert fake.calls == 1


def test_unknown_info_type_is_a_clear_error():
    with FakeDlpServer() as fake:
        cfg = dlp_cfg(fake.endpoint).model_copy(update={"info_types": ["EMAIL_ADDRESS", "EMAIL"]})
        backend = DlpPiiBackend(cfg)
        try:
            with pytest.raises(PiiBackendError, match=r"info type name \"EMAIL\".*pii.info_types"):
                backend.find(["a@example.com"])
        finally:
            backend.close()
    assert fake.calls == 1  # not retried


def test_build_backend_dlp_and_policy_drop(backend_for):
    with FakeDlpServer() as fake:
        cfg = dlp_cfg(fake.endpoint).model_copy(update={"policy": {"PHONE_NUMBER": "drop"}})
        backend = build_backend(cfg)
        try:
            assert isinstance(backend, DlpPiiBackend)
            out = scrub_conversations([[{"role": "user", "content": f"call {PHONE}"}],
                                       [{"role": "user", "content": EMAIL}]], backend, cfg)
        finally:
            backend.close()
    assert out[0].drop_types == ["PHONE_NUMBER"] and not out[1].dropped
    assert len(fake.requests) == 1  # both conversations in one request


def test_no_pii_value_in_logs_errors_or_reports(backend_for, caplog):
    caplog.set_level(logging.DEBUG)
    conversations = [[{"role": "user", "content": f"I am {EMAIL}, call {PHONE}"}]] * 3
    samples = [{"full_text": f"mail {EMAIL}",
                "spans": [{"entity_type": "EMAIL_ADDRESS", "start_position": 5,
                           "end_position": 5 + len(EMAIL)}]}]
    with FakeDlpServer(fail_first=2, fail_code=grpc.StatusCode.RESOURCE_EXHAUSTED) as fake:
        backend = backend_for(fake, batch_size=2)
        out = scrub_conversations(conversations, backend, backend.cfg)
        report = recall_per_entity(backend, samples)
    assert report["EMAIL_ADDRESS"]["recall"] == 1.0
    assert "retry" in caplog.text  # the retries were logged ...
    for value in (EMAIL, PHONE, "müller", "1234567"):  # ... but no value, anywhere
        assert value not in caplog.text
        assert value not in repr([(o.messages, o.hits, o.reason) for o in out])
        assert value not in repr(report)

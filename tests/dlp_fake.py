"""A local gRPC fake of Google Cloud DLP's ``InspectContent`` for tests.

It speaks the real protocol: the service name ``google.privacy.dlp.v2.DlpService`` and the
google-cloud-dlp package's own message classes (de)serialize requests and responses, so the
real ``DlpServiceClient`` talks to it over an insecure channel. Its "detector" is two regexes
(e-mail, phone). It can fail the first N calls (UNAVAILABLE / RESOURCE_EXHAUSTED), deny every
call (PERMISSION_DENIED), cap findings per request (``findings_truncated``) and leave out the
codepoint range (byte range only); it rejects unknown info types, and records every request.
"""

from __future__ import annotations

import re
import threading
from concurrent import futures

import grpc
from google.cloud import dlp_v2

SERVICE = "google.privacy.dlp.v2.DlpService"
PATTERNS = {
    "EMAIL_ADDRESS": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "PHONE_NUMBER": re.compile(r"\+?\d[\d ()-]{6,}\d"),
}
# Types the fake accepts but never finds; any other name is rejected like DLP does.
SILENT_INFO_TYPES = {
    "PERSON_NAME", "STREET_ADDRESS", "CREDIT_CARD_NUMBER", "US_SOCIAL_SECURITY_NUMBER",
}


class FakeDlpServer:
    """Start with ``with FakeDlpServer(...) as fake:``; ``fake.endpoint`` is "127.0.0.1:PORT"."""

    def __init__(
        self,
        fail_first: int = 0,
        fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        deny: bool = False,
        max_findings: int | None = None,
        codepoint_ranges: bool = True,
    ) -> None:
        self.fail_first = fail_first
        self.fail_code = fail_code
        self.deny = deny
        self.max_findings = max_findings
        self.codepoint_ranges = codepoint_ranges
        self.calls = 0
        self.requests: list[dlp_v2.InspectContentRequest] = []
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None
        self.endpoint = ""

    def __enter__(self) -> FakeDlpServer:
        handler = grpc.unary_unary_rpc_method_handler(
            self._inspect_content,
            request_deserializer=dlp_v2.InspectContentRequest.deserialize,
            response_serializer=dlp_v2.InspectContentResponse.serialize,
        )
        generic = grpc.method_handlers_generic_handler(SERVICE, {"InspectContent": handler})
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers((generic,))
        port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"127.0.0.1:{port}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.stop(grace=None)

    def rows_per_request(self) -> list[int]:
        """How many table rows each successful-or-not recorded request carried."""
        return [len(r.item.table.rows) for r in self.requests]

    def _inspect_content(
        self, request: dlp_v2.InspectContentRequest, context: grpc.ServicerContext
    ) -> dlp_v2.InspectContentResponse:
        with self._lock:
            self.calls += 1
            call = self.calls
            self.requests.append(request)
        if self.deny:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "Permission 'dlp.inspectContent' denied on project")
        if call <= self.fail_first:
            context.abort(self.fail_code, f"fake failure {call}/{self.fail_first}")
        unknown = [t.name for t in request.inspect_config.info_types
                   if t.name not in PATTERNS and t.name not in SILENT_INFO_TYPES]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"Invalid built-in info type name \"{unknown[0]}\".")
        findings = self._findings(request)
        truncated = self.max_findings is not None and len(findings) > self.max_findings
        if truncated:
            findings = findings[: self.max_findings]
        result = dlp_v2.InspectResult(findings=findings, findings_truncated=truncated)
        return dlp_v2.InspectContentResponse(result=result)

    def _findings(self, request: dlp_v2.InspectContentRequest) -> list[dlp_v2.Finding]:
        wanted = [t.name for t in request.inspect_config.info_types if t.name in PATTERNS]
        if request.inspect_config.min_likelihood == dlp_v2.Likelihood.VERY_LIKELY:
            return []  # the fake reports everything as LIKELY
        if "table" in request.item:
            rows = request.item.table.rows
            cells = [(i, row.values[0].string_value) for i, row in enumerate(rows)]
        else:
            cells = [(None, request.item.value)]
        quote = request.inspect_config.include_quote
        return [
            self._finding(name, match, text, row, quote)
            for row, text in cells
            for name in wanted
            for match in PATTERNS[name].finditer(text)
        ]

    def _finding(self, name: str, match: re.Match, text: str, row: int | None,
                 quote: bool) -> dlp_v2.Finding:
        byte_start = len(text[: match.start()].encode("utf-8"))
        byte_end = byte_start + len(match.group().encode("utf-8"))
        location = dlp_v2.Location(byte_range=dlp_v2.Range(start=byte_start, end=byte_end))
        if self.codepoint_ranges:
            location.codepoint_range = dlp_v2.Range(start=match.start(), end=match.end())
        if row is not None:
            record = dlp_v2.RecordLocation(field_id=dlp_v2.FieldId(name="text"),
                                           table_location=dlp_v2.TableLocation(row_index=row))
            location.content_locations = [dlp_v2.ContentLocation(record_location=record)]
        return dlp_v2.Finding(info_type=dlp_v2.InfoType(name=name),
                              likelihood=dlp_v2.Likelihood.LIKELY, location=location,
                              quote=match.group() if quote else "")

